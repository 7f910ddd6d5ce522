"""tools/plan.py --indexed PREFIX: plan an existing Megatron IndexedDataset (written here with
megatron-core's own IndexedDatasetBuilder), lengths per document, loss tokens from a mask."""

import numpy as np
import pytest

from megatron_hbp.data.token_files import TokenFileError, read_indexed


def _write(prefix, docs, dtype):
    """docs: list of documents, each a list of sequences (lists of ints)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for doc in docs:
        for seq in doc:
            b.add_item(torch.tensor(seq, dtype=torch.int64))
        b.end_document()
    b.finalize(str(prefix) + ".idx")
    return str(prefix)


DOCS = [[[5, 6, 7], [8, 9]], [[1, 2, 3, 4]], [[7], [7], [7]], [[100] * 10]]
MASK = [[[0, 0, 1], [1, 1]], [[0, 0, 0, 1]], [[0], [1], [0]], [[1] * 10]]


@pytest.mark.parametrize("block", [2, 3, 1 << 24])
def test_lengths_and_loss_tokens_by_hand(tmp_path, block):
    tok = _write(tmp_path / "d_text_document", DOCS, np.uint16)
    mask = _write(tmp_path / "d_mask", MASK, np.uint8)
    lengths, loss = read_indexed(tok)
    assert lengths.tolist() == [5, 4, 3, 10] and loss.tolist() == [5, 4, 3, 10]
    lengths, loss = read_indexed(tok + ".idx", mask + ".bin", block=block)
    assert lengths.tolist() == [5, 4, 3, 10] and loss.tolist() == [3, 1, 1, 10]


def test_our_token_files_are_plannable(tmp_path):
    from megatron_hbp.data import preprocess
    from megatron_hbp.data.testing import openai_line, write_jsonl

    lines = [
        openai_line(("user", "hi " * (i + 1)), ("assistant", "hello there " * (2 * i + 1))) for i in range(20)
    ]
    info = preprocess(write_jsonl(tmp_path / "c.jsonl", lines), tmp_path / "si.npz", template="plain").info
    lengths, loss = read_indexed(tmp_path / "si.tokens", tmp_path / "si.loss_mask", block=7)
    assert lengths.tolist() == info.lengths.tolist() and loss.tolist() == info.loss_tokens.tolist()


def test_bad_prefixes(tmp_path):
    tok = _write(tmp_path / "d", DOCS, np.uint16)
    with pytest.raises(
        TokenFileError,
        match=r"IndexedDataset .*nope: .*nope\.idx does not exist; pass the IndexedDataset prefix",
    ):
        read_indexed(tmp_path / "nope")
    other = _write(tmp_path / "m", MASK[:3], np.uint8)
    with pytest.raises(
        TokenFileError, match=r"loss mask .*m\.idx has 6 sequences of other lengths than the 7 of"
    ):
        read_indexed(tok, other)
    (tmp_path / "d.bin").write_bytes((tmp_path / "d.bin").read_bytes()[:-4])
    with pytest.raises(TokenFileError, match=r"d\.bin has 40 bytes, its index needs 44 \(truncated\)"):
        read_indexed(tok)


def test_cli_plans_an_indexed_dataset(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    from megatron_hbp import load_plan

    spec = importlib.util.spec_from_file_location(
        "plan_cli", Path(__file__).resolve().parents[2] / "tools" / "plan.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = np.random.default_rng(0)
    docs = [[list(rng.integers(0, 50000, int(n)))] for n in rng.integers(10, 900, 300)]
    tok = _write(tmp_path / "big", docs, np.uint16)
    cfg = tmp_path / "p.yaml"
    cfg.write_text("groups:\n  - {pack_length: 1024}\nworld_size: 2\ntokens_per_step: 4096\n")
    assert mod.main(["--indexed", tok, "--config", str(cfg), "--output", str(tmp_path / "out")]) == 0
    plan = load_plan(tmp_path / "out" / "plan.npz")
    plan.check_lengths(np.array([len(d[0]) for d in docs]))  # raises when the plan is of other lengths
    capsys.readouterr()
    assert (
        mod.main(
            ["--indexed", str(tmp_path / "missing"), "--config", str(cfg), "--output", str(tmp_path / "o2")]
        )
        == 2
    )
    assert "error: IndexedDataset" in capsys.readouterr().err


def test_simulate_and_select_groups_read_an_indexed_dataset(tmp_path):
    """tools/simulate.py and tools/select_groups.py share costmodel.cli's inputs: --indexed too."""
    import argparse

    from megatron_hbp.configio import ConfigError
    from megatron_hbp.costmodel.cli import add_input_args, read_inputs

    tok = _write(tmp_path / "d_text_document", DOCS, np.uint16)
    mask = _write(tmp_path / "d_mask", MASK, np.uint8)
    p = argparse.ArgumentParser()
    add_input_args(p)
    lengths, loss, desc = read_inputs(p.parse_args(["--indexed", tok, "--loss-mask", mask]))
    assert lengths.tolist() == [5, 4, 3, 10] and loss.tolist() == [3, 1, 1, 10] and tok in desc
    with pytest.raises(ConfigError, match=r"nope\.idx does not exist"):
        read_inputs(p.parse_args(["--indexed", str(tmp_path / "nope")]))
    with pytest.raises(ConfigError, match="--loss-mask goes with --indexed"):
        read_inputs(p.parse_args(["--synth", "tulu3_longcite", "--loss-mask", mask]))
