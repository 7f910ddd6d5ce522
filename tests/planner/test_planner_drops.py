"""Every sample accounted for: the default last step drops nothing (1M-sample chat-heavy mix with
the shipped HBP config), ``last_step: drop`` drops at random per epoch (2-epoch overlap near
chance), a group with samples never gets 0 steps, and the drop report / warning line."""

import subprocess
import sys
from pathlib import Path

import numpy as np

from megatron_hbp.planner import build_plan
from megatron_hbp.planner.build import drop_summary
from megatron_hbp.planner.config import GroupConfig, PlanConfig, load_plan_config

ROOT = Path(__file__).resolve().parents[2]
HBP = ROOT / "configs" / "plan_hbp_16k_128k.yaml"


def chat_heavy(n, seed=0):
    """37 % of samples of 3..20 tokens (greetings, 'thanks'), chat log-normal (median 700) and
    0.2 % long documents up to 128K: median ~300, as in the corpus of the bug report."""
    rng = np.random.default_rng(seed)
    n_tiny, n_long = int(0.37 * n), n // 500
    tiny = rng.integers(3, 21, n_tiny)
    chat = np.clip(np.rint(np.exp(rng.normal(np.log(700), 1.0, n - n_tiny - n_long))), 21, 16384)
    long = rng.integers(16385, 131072, n_long, endpoint=True)
    x = np.concatenate([tiny, chat, long]).astype(np.int32)
    return x[rng.permutation(n)]


def test_shipped_hbp_config_drops_nothing_on_a_chat_heavy_mix():
    lengths = chat_heavy(1_000_000)
    assert 250 <= np.median(lengths) <= 350 and abs((lengths <= 20).mean() - 0.37) < 0.001
    cfg = load_plan_config(HBP)
    assert cfg.last_step == "shrink"
    plan = build_plan(lengths, None, cfg)
    assert len(plan.dropped) == 0
    assert np.array_equal(np.sort(plan.arrays["samples"]), np.arange(len(lengths)))  # each exactly once
    assert plan.stats["drops"]["warning"] is None and plan.stats["drops"]["fraction"] == 0.0


def test_drop_is_random_per_epoch():
    # The bug: the least-full packs were dropped, and after best-fit decreasing those hold the
    # shortest samples, so the same tiny samples were dropped in every epoch (4339 of ~5950).
    lengths = chat_heavy(1_000_000)
    plan = build_plan(lengths, None, load_plan_config(HBP, {"last_step": "drop", "epochs": 2}))
    d = plan.dropped
    assert set(d.reasons.tolist()) == {"partial_step"}
    e0, e1 = d.indices[d.epochs == 0], d.indices[d.epochs == 1]
    assert len(e0) > 200 and len(e1) > 200
    chance = len(e0) * len(e1) / len(lengths)  # expected overlap of two independent random sets
    overlap = len(np.intersect1d(e0, e1))
    assert overlap <= 3 * chance + 20, (overlap, chance)
    # Dropped samples are not the shortest ones: their median is near the data's.
    assert np.median(lengths[d.indices]) > 0.5 * np.median(lengths)
    # Every sample of each epoch is placed or dropped, exactly once.
    for e in (0, 1):
        steps = np.nonzero(plan.arrays["step_epoch"] == e)[0]
        spo, poff = plan.arrays["step_pack_offsets"], plan.arrays["pack_offsets"]
        a, b = poff[spo[steps[0]]], poff[spo[steps[-1] + 1]]
        both = np.concatenate([plan.arrays["samples"][a:b], d.indices[d.epochs == e]])
        assert np.array_equal(np.sort(both), np.arange(len(lengths)))
    # More than 0.1 % dropped: the warning line, with the counts by length bucket.
    ds = plan.stats["drops"]
    assert ds["fraction"] == len(d) / 2_000_000 > 0.001
    assert ds["warning"].startswith(f"warning: the plan drops {len(d)} of 2000000 sample-epochs")
    assert "dropped by length: 1-16 tokens" in ds["warning"] and "last_step: shrink" in ds["warning"]
    assert sum(v[0] for v in ds["by_length"].values()) == len(d)
    assert ds["by_length"]["17-32"][1] == 2 * int(((lengths > 16) & (lengths <= 32)).sum())


def small_two_group_cfg(**kw):
    # What select_groups wrote for a small data set: 2M-token steps, a long group with CP 4.
    return PlanConfig(
        groups=[GroupConfig(pack_length=16384), GroupConfig(pack_length=65536, cp=4)],
        world_size=8,
        tokens_per_step=2097152,
        **kw,
    )


def small_data(seed=0):
    rng = np.random.default_rng(seed)
    short = np.clip(np.rint(np.exp(rng.normal(np.log(600), 1.0, 2000))), 8, 16384)
    long = rng.integers(16385, 65536, 20, endpoint=True)
    return np.concatenate([short, long]).astype(np.int32)


def test_a_group_never_gets_zero_steps():
    # 16K group: 8 replicas x 16 micro-batches = 128 packs per step; 64K group: 2 x 16 = 32.
    # This data fills neither: with "drop" both groups used to get 0 steps (everything dropped).
    lengths = small_data()
    for policy in ("drop", "shrink", "pad"):
        plan = build_plan(lengths, None, small_two_group_cfg(last_step=policy))
        assert sorted(plan.arrays["step_group"].tolist()) == [0, 1], policy
        assert len(plan.dropped) == 0, policy
        assert np.array_equal(np.sort(plan.arrays["samples"]), np.arange(len(lengths)))
        for s in plan:
            assert s.micro_batches_per_replica <= 16


def test_drop_summary_by_hand():
    cfg = PlanConfig(
        groups=[GroupConfig(pack_length=64), GroupConfig(pack_length=256)],
        world_size=1,
        micro_batches_per_step=1,
        epochs=2,
    )
    lengths = np.array([10, 20, 100, 200, 300])  # buckets 1-16, 17-32, 65-128, 129-256, 257-512
    gid = np.array([0, 0, 1, 1, 2])
    arrays = {
        # epoch 0: sample 4 too long (reason 0), group 1 (samples 2, 3) lost whole (reason 1);
        # epoch 1: sample 4 too long, sample 0 dropped.
        "dropped_indices": np.array([4, 2, 3, 4, 0]),
        "dropped_reasons": np.array([0, 1, 1, 0, 1], np.int8),
        "dropped_epochs": np.array([0, 0, 0, 1, 1]),
    }
    s = drop_summary(lengths, gid, arrays, cfg)
    assert s["by_length"] == {
        "1-16": [1, 2],
        "17-32": [0, 2],
        "65-128": [1, 2],
        "129-256": [1, 2],
        "257-512": [2, 2],
    }
    assert s["fraction"] == 0.5 and s["whole_groups_dropped"] == [[0, 1]]
    assert (
        "whole groups lost (epoch, group): (0, 1)" in s["warning"]
        and "too_long 2, partial_step 3" in s["warning"]
    )
    none = {k: v[:0] for k, v in arrays.items()}
    assert drop_summary(lengths, gid, none, cfg)["warning"] is None


def test_plan_cli_prints_the_warning(tmp_path):
    lengths = small_data()
    np.save(tmp_path / "l.npy", np.concatenate([lengths, np.full(10, 70000, np.int32)]))  # 10 too long
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        "groups:\n  - {pack_length: 16384}\n  - {pack_length: 65536, cp: 4}\n"
        "world_size: 8\ntokens_per_step: 2097152\n"
    )
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "plan.py"),
            "--config",
            str(cfg),
            "--lengths",
            str(tmp_path / "l.npy"),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    warn = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert warn == [
        "warning: the plan drops 10 of 2030 sample-epochs (0.49 %: too_long 10); dropped by length: "
        "65537-131072 tokens 10/10; add a larger group or preprocess with --max-length to keep the too_long samples"
    ]
    assert (
        "Dropped samples by length (tokens: dropped / planned sample-epochs): 65537-131072: 10/10."
        in r.stdout
    )


def test_select_groups_then_plan_round_trip(tmp_path):
    # The bug: select_groups wrote `last_step: drop` with 2M-token steps for a small data set and
    # the plan gave the long group 0 steps, dropping every sample over 16K without a warning.
    rng = np.random.default_rng(0)
    short = np.clip(np.rint(np.exp(rng.normal(np.log(300), 1.0, 3000))), 8, 16384)
    lengths = np.concatenate([short, rng.integers(16385, 60000, 30)]).astype(np.int32)
    np.save(tmp_path / "l.npy", lengths)

    def tool(name, *args):
        r = subprocess.run(
            [sys.executable, str(ROOT / "tools" / name), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    tool(
        "select_groups.py",
        "--lengths",
        tmp_path / "l.npy",
        "--model",
        "llama_1b",
        "--num-gpus",
        8,
        "--output",
        tmp_path / "sel.yaml",
    )
    for over in ("", ":last_step=drop"):
        r = tool(
            "plan.py",
            "--lengths",
            tmp_path / "l.npy",
            "--config",
            f"{tmp_path / 'sel.yaml'}{over}",
            "--output",
            tmp_path / f"plan{over}",
            "--json",
        )
        rep = __import__("json").loads(r.stdout)
        groups = rep["per_group"]
        assert len(groups) >= 2 and groups[-1]["pack_length"] > 16384
        assert all(g["num_steps"] >= 1 for g in groups), groups  # no group without steps
        assert sum(g["num_samples"] for g in groups) + rep["num_dropped"] == len(lengths)
        if not over:
            assert rep["num_dropped"] == 0 and "warning:" not in r.stderr
        assert rep["drops"]["whole_groups_dropped"] == []
