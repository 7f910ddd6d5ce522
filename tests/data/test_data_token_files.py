"""Token files: Megatron IndexedDataset layout (checked against megatron-core's own reader and
writer), hand-checked ids and masks, atomic writes, --no-tokens, and each bad input."""

import shutil

import numpy as np
import pytest

from megatron_hbp.data import SFTDataset, load_sample_info, preprocess
from megatron_hbp.data.testing import openai_line, sharegpt_line, write_jsonl, write_wordlevel_tokenizer
from megatron_hbp.data.token_files import (
    TokenDataset,
    TokenFileError,
    check_token_files,
    open_sft_dataset,
    token_dtype,
    token_paths,
    write_idx,
)

WORDS = ["System", "User", "Assistant", ":", "hi", "hello", "there", "be", "brief"]
# ids: <unk>=0 <s>=1 </s>=2 System=3 User=4 Assistant=5 :=6 hi=7 hello=8 there=9 be=10 brief=11
LINES = [
    openai_line(("user", "hi"), ("assistant", "hello there")),
    "",
    sharegpt_line(("system", "be brief"), ("human", "hi"), ("gpt", "hi")),
    "{not json",
    openai_line(
        ("user", "hello hello hello hello"), ("assistant", "hi"), ("user", "hi"), ("assistant", "there")
    ),
    openai_line(("user", "hello " * 12), ("assistant", "hi")),  # no loss token within 12: dropped
]
IDS = [
    [1, 4, 6, 7, 5, 6, 8, 9, 2],
    [1, 3, 6, 10, 11, 4, 6, 7, 5, 6, 7, 2],
    [1, 4, 6, 8, 8, 8, 8, 5, 6, 7, 2, 4],  # 18 tokens truncated to 12
]
MASKS = [[0] * 6 + [1] * 3, [0] * 10 + [1, 1], [0] * 9 + [1, 1, 0]]


def _build(tmp_path, tok, name="chat.jsonl", lines=LINES, out="si.npz", **kw):
    path = write_jsonl(tmp_path / name, lines)
    kw.setdefault("max_length", 12)
    kw.setdefault("on_error", "skip")
    return preprocess(path, tmp_path / out, tokenizer=tok, **kw).info


@pytest.mark.parametrize("name,workers", [("chat.jsonl", 1), ("chat.jsonl.gz", 2)])
def test_bytes_by_hand_and_megatron_reads_them(tmp_path, tok, name, workers):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    info = _build(tmp_path, tok, name, workers=workers, chunk_bytes=64)
    assert info.lengths.tolist() == [9, 12, 12]
    paths = token_paths(tmp_path / "si.npz")
    assert paths.tokens == str(tmp_path / "si.tokens") and paths.meta == str(tmp_path / "si.tokens.json")
    # 12-word vocabulary: one byte per token id; the .bin is the samples back to back
    raw = np.fromfile(paths.tokens + ".bin", np.uint8)
    assert raw.tolist() == sum(IDS, [])
    assert np.fromfile(paths.loss_mask + ".bin", np.uint8).tolist() == sum(MASKS, [])
    tokens, masks = IndexedDataset(paths.tokens), IndexedDataset(paths.loss_mask)
    assert len(tokens) == len(masks) == 3 and tokens.index.dtype == np.uint8
    assert [tokens[i].tolist() for i in range(3)] == IDS
    assert [masks[i].tolist() for i in range(3)] == MASKS
    assert tokens.sequence_lengths.tolist() == [9, 12, 12] and tokens.document_indices.tolist() == [
        0,
        1,
        2,
        3,
    ]
    ds = TokenDataset(tmp_path / "si.npz")
    assert [ds[i].input_ids.tolist() for i in range(3)] == IDS and ds[0].input_ids.dtype == np.int32
    assert [ds[i].loss_mask.tolist() for i in range(3)] == MASKS and ds[-1].loss_mask.dtype == np.uint8
    with pytest.raises(IndexError):
        ds[3]
    assert not list(tmp_path.glob("*.tmp"))
    assert info.stats["disk_bytes"]["token_bin"] == 33 and info.stats["disk_bytes"]["loss_mask_bin"] == 33


def test_idx_bytes_equal_megatron_builder(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    seqs = [np.array([5, 300, 7], np.int64), np.array([65535], np.int64), np.array([1, 2], np.int64)]
    for dt in (np.uint16, np.int32, np.uint8):
        s = [x % 256 for x in seqs] if dt == np.uint8 else seqs
        b = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=dt)
        for x in s:
            b.add_item(torch.from_numpy(x))
            b.end_document()
        b.finalize(str(tmp_path / "ref.idx"))
        with open(tmp_path / "ours.idx", "wb") as f:
            write_idx(f, [len(x) for x in s], dt)
        assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes(), dt


def test_token_dtype():
    assert token_dtype(256) == np.uint8 and token_dtype(257) == np.uint16
    assert (
        token_dtype(65536) == np.uint16 and token_dtype(65537) == np.int32 and token_dtype(128256) == np.int32
    )


def test_real_tokenizer_matches_jsonl_path(tmp_path):
    rng = np.random.default_rng(1)
    words = ["the", "quick", "brown", "fox", "naïve", "café", "—", "東京", "tokens\n", "dogs;"]
    lines = []
    for _ in range(40):
        q = " ".join(rng.choice(words, rng.integers(1, 30)))
        a = " ".join(rng.choice(words, rng.integers(1, 80)))
        lines.append(openai_line(("system", "s"), ("user", q), ("assistant", a)))
    path = write_jsonl(tmp_path / "c.jsonl", lines)
    for template in ("plain", "llama3"):
        info = preprocess(path, tmp_path / f"{template}.npz", template=template, max_length=60).info
        assert np.fromfile(tmp_path / f"{template}.tokens.bin", np.uint16).size == info.lengths.sum()
        tds, jds = TokenDataset(info), SFTDataset(info)
        for i in range(len(info)):
            a, b = tds[i], jds[i]
            assert (
                a.input_ids.tolist() == b.input_ids.tolist() and a.loss_mask.tolist() == b.loss_mask.tolist()
            )
        assert isinstance(open_sft_dataset(tmp_path / f"{template}.npz"), TokenDataset)


def test_no_tokens_then_tokens(tmp_path, tok):
    _build(tmp_path, tok)
    assert check_token_files(load_sample_info(tmp_path / "si.npz")) is not None
    path = tmp_path / "chat.jsonl"
    r = preprocess(
        path, tmp_path / "si.npz", tokenizer=tok, max_length=12, on_error="skip", force=True, tokens=False
    )
    assert not r.reused and "disk_bytes" not in r.info.stats
    assert not [
        p for p in tmp_path.iterdir() if p.name.startswith("si.") and p.name != "si.npz"
    ]  # stale ones removed
    assert isinstance(open_sft_dataset(tmp_path / "si.npz"), SFTDataset)  # the JSONL fallback
    # same inputs, tokens wanted: the cached sample info is not enough
    r = preprocess(path, tmp_path / "si.npz", tokenizer=tok, max_length=12, on_error="skip")
    assert not r.reused and r.changes == ["token files missing"]
    assert preprocess(path, tmp_path / "si.npz", tokenizer=tok, max_length=12, on_error="skip").reused


def test_a_failed_run_leaves_no_files(tmp_path, tok):
    from megatron_hbp.data import DataError

    with pytest.raises(DataError, match="chat.jsonl:4: malformed JSON"):
        _build(tmp_path, tok, on_error="raise", chunk_bytes=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl", "tok"]


# ------------------------------------------------------------------ bad inputs, each named in one line


def _truncate_bin(tmp_path):
    p = tmp_path / "si.tokens.bin"
    p.write_bytes(p.read_bytes()[:-5])


def _other_dataset_idx(tmp_path, tok):
    _build(tmp_path, tok, "other.jsonl", LINES[:3], out="other.npz")  # 2 samples
    shutil.copy(tmp_path / "other.tokens.idx", tmp_path / "si.tokens.idx")


def _other_tokenizer(tmp_path, tok):
    # the same data tokenised with another vocabulary (another word order): its token files
    other = write_wordlevel_tokenizer(tmp_path / "tok2" / "tokenizer.json", WORDS[::-1])
    (tmp_path / "o").mkdir()
    preprocess(
        tmp_path / "chat.jsonl", tmp_path / "o" / "si.npz", tokenizer=other, max_length=12, on_error="skip"
    )
    for f in ("si.tokens.bin", "si.tokens.idx", "si.loss_mask.bin", "si.loss_mask.idx", "si.tokens.json"):
        shutil.copy(tmp_path / "o" / f, tmp_path / f)


def _same_lengths_other_idx(tmp_path, tok):
    # an index with the right count and lengths that is not the one written with the .json
    p = tmp_path / "si.loss_mask.idx"
    with open(p, "wb") as f:
        write_idx(f, load_sample_info(tmp_path / "si.npz").lengths, np.uint8)
        f.write(b"\0")


@pytest.mark.parametrize(
    "case,needle",
    [
        ("truncated_bin", r"si\.tokens\.bin has 28 bytes, its index needs 33 \(truncated\)"),
        ("other_dataset_idx", r"si\.tokens\.idx holds 2 samples, sample info .*si\.npz has 3"),
        ("other_tokenizer", r"si\.tokens\.json: token files were written for fingerprint \w+, sample info"),
        ("meta_missing", r"si\.tokens\.json is missing"),
        ("replaced_idx", r"si\.loss_mask\.idx is not the index written with"),
        ("not_an_idx", r"si\.tokens\.idx is not a Megatron IndexedDataset index"),
    ],
)
def test_bad_token_files(tmp_path, tok, case, needle):
    _build(tmp_path, tok)
    if case == "truncated_bin":
        _truncate_bin(tmp_path)
    elif case == "other_dataset_idx":
        _other_dataset_idx(tmp_path, tok)
    elif case == "other_tokenizer":
        _other_tokenizer(tmp_path, tok)
    elif case == "meta_missing":
        (tmp_path / "si.tokens.json").unlink()
    elif case == "replaced_idx":
        _same_lengths_other_idx(tmp_path, tok)
    else:
        (tmp_path / "si.tokens.idx").write_bytes(b"hello")
    info = load_sample_info(tmp_path / "si.npz")
    for fn in (check_token_files, TokenDataset, open_sft_dataset):
        with pytest.raises(TokenFileError, match=needle) as e:
            fn(info)
        assert "\n" not in str(e.value) and "rerun tools/preprocess_lengths.py" in str(e.value)
    # the next preprocessing run notices and rewrites them
    r = preprocess(
        tmp_path / "chat.jsonl", tmp_path / "si.npz", tokenizer=tok, max_length=12, on_error="skip"
    )
    assert not r.reused and r.changes[0].startswith("token files do not match")
    assert check_token_files(load_sample_info(tmp_path / "si.npz")) is not None


def test_changed_loss_mask_is_detected_on_access(tmp_path, tok):
    _build(tmp_path, tok)
    p = tmp_path / "si.loss_mask.bin"
    b = bytearray(p.read_bytes())
    b[0] = 1  # same size, one more loss token in sample 0
    p.write_bytes(bytes(b))
    from megatron_hbp.data import DataChangedError

    ds = TokenDataset(tmp_path / "si.npz")
    assert ds[1].input_ids.tolist() == IDS[1]
    with pytest.raises(
        DataChangedError, match=r"si\.loss_mask\.bin: sample 0 has 4 loss tokens, sample info says 3"
    ):
        ds[0]


def test_cli_no_tokens_and_disk_summary(tmp_path, tok, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "pl", Path(__file__).resolve().parents[2] / "tools" / "preprocess_lengths.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = write_jsonl(tmp_path / "chat.jsonl", LINES)
    base = [
        "--data",
        str(path),
        "--tokenizer",
        str(tok),
        "--max-length",
        "12",
        "--on-error",
        "skip",
        "--no-progress",
    ]
    assert mod.main([*base, "--output", str(tmp_path / "a.npz")]) == 0
    out = capsys.readouterr().out
    assert "disk: sample info" in out and "token ids 0.1 kB (1 B/token), loss mask 0.1 kB" in out, out
    assert mod.main([*base, "--output", str(tmp_path / "b.npz"), "--no-tokens"]) == 0
    assert "no token files (--no-tokens)" in capsys.readouterr().out
    assert (tmp_path / "a.tokens.bin").is_file() and not (tmp_path / "b.tokens.bin").exists()
