"""The trainer's packed batches built from token files (mmap) equal those built from the JSONL
(tokenised on access), for every micro-batch of every rank of the first 20 plan steps, with CP 1
and CP 2; the demo data and a generated .jsonl.gz corpus. And a token file that does not match
its sample info stops the trainer at pre-flight with a one-line error naming the file."""

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from megatron_hbp.data import SFTDataset, preprocess
from megatron_hbp.data.token_files import TokenDataset, open_sft_dataset
from megatron_hbp.mcore.data import MicroBatchDataset, rank_work_items

ROOT = Path(__file__).resolve().parents[2]
STEPS = 20
FIELDS = ("tokens", "labels", "loss_mask", "loss_weight", "position_ids", "cu_seqlens", "cu_seqlens_padded")


def _plan(info, cp: int, groups=None, **kw):
    from megatron_hbp.configio import from_dict
    from megatron_hbp.planner import PlanConfig, build_plan

    raw = yaml.safe_load((ROOT / "configs" / "plan_demo.yaml").read_text())
    raw["groups"] = [dict(g, cp=cp, recompute_layers=0) for g in (groups or raw["groups"])]
    raw.update(kw)
    return build_plan(
        info.lengths, info.loss_tokens, from_dict(PlanConfig, raw), fingerprint=info.fingerprint
    )


def _compare(info, plan, cp: int) -> int:
    """Every micro-batch of every rank of the first STEPS steps; returns how many were compared."""
    assert plan.num_steps >= STEPS
    tok_ds, jsonl_ds = TokenDataset(info), SFTDataset(info)
    n = 0
    for norm in ("step_token_mean", "sample_mean"):
        for dp_rank in range(plan.world_size):
            items = rank_work_items(plan, dp_rank, 0, STEPS)
            assert {it.cp for it in items} == {cp}
            a = MicroBatchDataset(items, tok_ds, pad_id=0, loss_normalization=norm)
            b = MicroBatchDataset(items, jsonl_ds, pad_id=0, loss_normalization=norm)
            for i in range(len(items)):
                x, y = a[i], b[i]
                for f in FIELDS:
                    assert torch.equal(getattr(x, f), getattr(y, f)), (dp_rank, i, f)
                assert x.lengths == y.lengths and x.padded_lengths == y.padded_lengths
                assert x.sample_indices == y.sample_indices and x.denominator == y.denominator
                assert x.loss_tokens == y.loss_tokens > 0 and x.cp_rank == dp_rank % cp
                n += 1
    return n


@pytest.fixture(scope="module")
def demo_info(tmp_path_factory):
    from megatron_hbp.data.demo import ensure_demo_data

    d = tmp_path_factory.mktemp("tokdemo")
    return preprocess(ensure_demo_data(), d / "si.npz", template="plain", workers=2, progress=False).info


@pytest.mark.parametrize("cp", [1, 2])
def test_demo_batches_from_token_files_equal_jsonl(demo_info, cp):
    plan = _plan(demo_info, cp)
    assert _compare(demo_info, plan, cp) >= 2 * STEPS * plan.world_size


@pytest.mark.parametrize("cp", [1, 2])
def test_gz_corpus_batches_equal_and_no_decompressed_copy(tmp_path, cp):
    import gzip

    rng = random.Random(3)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "packing",
        "long",
        "sequences",
        "naïve",
        "東京",
        "—",
    ]
    lines = []
    for _ in range(400):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(3, 60)))
        a = " ".join(rng.choice(words) for _ in range(rng.randint(5, 400)))
        lines.append(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        )
    data = tmp_path / "data" / "c.jsonl.gz"
    data.parent.mkdir()
    data.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    info = preprocess(data, tmp_path / "si.npz", template="llama3", max_length=1000, progress=False).info
    plan = _plan(info, cp, groups=[{"pack_length": 1024}, {"pack_length": 2048}], tokens_per_step=4096)
    tok = TokenDataset(info)
    for dp_rank in range(plan.world_size):
        items = rank_work_items(plan, dp_rank, 0, STEPS)
        ds = MicroBatchDataset(items, tok, pad_id=0, loss_normalization="step_token_mean")
        for i in range(len(items)):
            ds[i]
    assert not (tmp_path / ".decompressed").exists()  # the token path never decompresses the .gz
    assert isinstance(open_sft_dataset(info), TokenDataset)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert _compare(info, plan, cp) >= 2 * STEPS * plan.world_size
    # The JSONL path read an unnamed copy: nothing new on disk, before or after it is freed.
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (tmp_path / ".decompressed").exists()


# ---------------------------------------------------------------------------- trainer pre-flight


@pytest.mark.parametrize(
    "case,needle",
    [
        ("truncated_bin", r"si\.tokens\.bin has \d+ bytes, its index needs \d+ \(truncated\)"),
        ("other_tokenizer", r"si\.tokens\.json: token files were written for fingerprint"),
        ("none", None),
    ],
)
def test_trainer_preflight_checks_token_files(tmp_path, gloo, case, needle):
    from megatron_hbp.data.testing import write_wordlevel_tokenizer
    from megatron_hbp.mcore.config import DataConfig, PlanSource, TrainConfig
    from megatron_hbp.mcore.train import TrainSetupError, preflight

    rng = random.Random(0)
    words = ["a", "b", "c", "d"]
    lines = [
        json.dumps({"messages": [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(2, 9)))},
                                 {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(2, 30)))}]})
        for _ in range(24)
    ]  # fmt: skip
    data = tmp_path / "c.jsonl"
    data.write_text("\n".join(lines) + "\n")
    info = preprocess(data, tmp_path / "si.npz", template="plain", progress=False).info
    _plan(info, 1, groups=[{"pack_length": 512}], world_size=1, tokens_per_step=512).save(
        tmp_path / "plan.npz"
    )
    data.unlink()  # with token files the JSONL is not needed
    if case == "truncated_bin":
        p = tmp_path / "si.tokens.bin"
        p.write_bytes(p.read_bytes()[:-2])
    elif case == "other_tokenizer":
        tok = write_wordlevel_tokenizer(tmp_path / "tok" / "tokenizer.json", words)
        (tmp_path / "o").mkdir()
        data.write_text("\n".join(lines) + "\n")
        preprocess(data, tmp_path / "o" / "si.npz", tokenizer=tok, template="plain", progress=False)
        for f in ("si.tokens.bin", "si.tokens.idx", "si.loss_mask.bin", "si.loss_mask.idx", "si.tokens.json"):
            (tmp_path / f).write_bytes((tmp_path / "o" / f).read_bytes())
    cfg = TrainConfig(
        model="tiny", data=DataConfig(sample_info=str(tmp_path / "si.npz"), num_workers=0),
        plan=PlanSource(path=str(tmp_path / "plan.npz")), dtype="fp32",
    )  # fmt: skip
    if needle is None:
        prep = preflight(cfg, 1, 0)
        assert prep.sample_info.fingerprint == info.fingerprint
        return
    with pytest.raises(TrainSetupError, match=needle) as e:
        preflight(replace(cfg), 1, 0)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


# ------------------------------------------------------- the demo trains bitwise alike from both


def _demo_losses(rank: int, world: int, work: str, steps: int) -> dict:
    """In a launched process (tests/distributed.py): train the tiny model on the demo data for
    ``steps`` plan steps from the token files and from the JSONL; the losses of both runs."""
    from megatron_hbp.data.token_files import open_sft_dataset
    from megatron_hbp.mcore.config import DataConfig, OptimizerConfig, PlanSource, TrainConfig
    from megatron_hbp.mcore.train import run

    out = {}
    for name in ("si", "si_jsonl"):
        info = str(Path(work) / f"{name}.npz")
        cfg = TrainConfig(
            model="tiny", data=DataConfig(sample_info=info, num_workers=1),
            plan=PlanSource(path=str(Path(work) / "plan.npz")), dtype="fp32", max_steps=steps,
            optimizer=OptimizerConfig(lr=2e-3, warmup_steps=1, clip_grad=1.0),
        )  # fmt: skip
        out[name] = {"reader": type(open_sft_dataset(info)).__name__, "losses": [r["loss"] for r in run(cfg)]}
    return out


@pytest.mark.slow
def test_demo_trains_bitwise_equal_from_token_files_and_jsonl(demo_info, tmp_path):
    """The demo data trains from its token files by default (preprocessing writes them) and gives
    bitwise the losses of the JSONL path (the same sample info built with --no-tokens)."""
    from tests.distributed import run_ranks

    work = Path(demo_info.path).parent
    src = demo_info.files
    jsonl = preprocess(src, tmp_path / "si_jsonl.npz", template="plain", progress=False, tokens=False).info
    assert jsonl.fingerprint == demo_info.fingerprint
    (work / "si_jsonl.npz").write_bytes((tmp_path / "si_jsonl.npz").read_bytes())
    _plan(demo_info, 1, groups=[{"pack_length": 2048}], world_size=1, tokens_per_step=4096).save(
        work / "plan.npz"
    )
    steps = 3
    (got,) = run_ranks(1, _demo_losses, (work, steps), timeout=900)
    assert got["si"]["reader"] == "TokenDataset" and got["si_jsonl"]["reader"] == "SFTDataset", got
    assert len(got["si"]["losses"]) == steps
    assert got["si"]["losses"] == got["si_jsonl"]["losses"], got  # bitwise (JSON keeps float64 exactly)
    assert got["si"]["losses"][-1] < got["si"]["losses"][0]  # it trains (lr > 0)
