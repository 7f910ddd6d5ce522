"""build_plan end to end: GreedyFill and last-step policies by hand, the every-sample-once property,
determinism, plan files, fingerprints, bad inputs and bad configs."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import megatron_hbp
from megatron_hbp.configio import ConfigError
from megatron_hbp.planner import (
    GroupConfig,
    PlanConfig,
    PlanFormatError,
    PlanInputError,
    PlanMismatchError,
    build_plan,
    load_plan,
    load_plan_config,
)


def cfg(groups, **kw):
    kw.setdefault("world_size", 1)
    kw.setdefault("micro_batches_per_step", 1)
    return PlanConfig(groups=[GroupConfig(**g) for g in groups], **kw)


def packs_of(plan):
    """[(step, replica, mb, sample list)] in plan order."""
    out = []
    for s in plan:
        for r in s.replicas:
            for k, mb in enumerate(r.micro_batches):
                for p in mb.packs:
                    out.append((s.index, r.index, k, p.sample_indices.tolist()))
    return out


def test_greedy_fill_takes_short_samples_into_long_packs():
    # group 1 (16): sample 0 (12) alone leaves 4 free; GreedyFill puts one 3 there (best fit, largest
    # first); group 0 (8) packs what is left: the other 3 and the 2.
    plan = build_plan(np.array([12, 3, 3, 2]), None, cfg([{"pack_length": 8}, {"pack_length": 16}]))
    packs = {tuple(sorted(p[3])) for p in packs_of(plan)}
    assert packs in ({(0, 1), (2, 3)}, {(0, 2), (1, 3)})
    assert plan.stats["greedy_fill_samples"] == [0, 1]
    long_step = next(s for s in plan if s.group == 1)
    assert long_step.num_tokens == 15 and long_step.loss_tokens == 15


def test_no_greedy_fill_keeps_groups_apart():
    plan = build_plan(
        np.array([12, 3, 3, 2]), None, cfg([{"pack_length": 8}, {"pack_length": 16}], greedy_fill=False)
    )
    assert sorted(tuple(sorted(p[3])) for p in packs_of(plan)) == [(0,), (1, 2, 3)]


def test_too_long_is_dropped_with_reason_or_raises():
    c = cfg([{"pack_length": 8}])
    plan = build_plan(np.array([5, 9, 3]), None, c)
    d = plan.dropped
    assert d.indices.tolist() == [1] and d.reasons.tolist() == ["too_long"]
    with pytest.raises(PlanInputError, match="longer than the largest group.*index 1, length 9"):
        build_plan(np.array([5, 9, 3]), None, cfg([{"pack_length": 8}], too_long="error"))


def _two_replica_cfg(last_step):
    return cfg([{"pack_length": 10}], world_size=2, micro_batches_per_step=2, last_step=last_step)


LENGTHS_5_PACKS = np.array([10, 10, 10, 9, 4])  # BFD: 5 packs [10] [10] [10] [9] [4]


def test_last_step_drop():
    # 2 replicas x 2 mb = 4 packs per step; 5 packs -> one step; one pack (= one sample here) is
    # dropped, chosen at random: not the least full one ([4]) every time.
    plan = build_plan(LENGTHS_5_PACKS, None, _two_replica_cfg("drop"))
    assert (
        plan.num_steps == 1 and len(plan.dropped) == 1 and plan.dropped.reasons.tolist() == ["partial_step"]
    )
    placed = sorted(plan.arrays["samples"].tolist() + plan.dropped.indices.tolist())
    assert placed == [0, 1, 2, 3, 4]
    counts = np.zeros(5, int)
    for seed in range(500):
        c = cfg([{"pack_length": 10}], world_size=2, micro_batches_per_step=2, last_step="drop", seed=seed)
        counts[build_plan(LENGTHS_5_PACKS, None, c).dropped.indices] += 1
    # Uniform: 100 expected per sample; binomial(500, 0.2) sd ~ 9, so 60..140 is > 4 sd wide.
    assert counts.sum() == 500 and counts.min() >= 60 and counts.max() <= 140, counts


def test_last_step_drop_never_leaves_a_group_without_steps():
    # 3 packs < 4 per step: "drop" would drop the whole group; it runs one shrunk step instead.
    plan = build_plan(np.array([10, 9, 4]), None, _two_replica_cfg("drop"))
    assert plan.num_steps == 1 and len(plan.dropped) == 0
    assert [s.micro_batches_per_replica for s in plan] == [2]
    assert sorted(len(p[3]) for p in packs_of(plan)) == [0, 1, 1, 1]


def test_last_step_pad():
    plan = build_plan(LENGTHS_5_PACKS, None, _two_replica_cfg("pad"))
    assert plan.num_steps == 2 and len(plan.dropped) == 0
    sizes = [sorted(len(p[3]) for p in packs_of(plan) if p[0] == s) for s in range(2)]
    assert sorted(sizes) == [[0, 0, 0, 1], [1, 1, 1, 1]]  # the extra step: one real pack, three empty
    assert [s.micro_batches_per_replica for s in plan] == [2, 2]


def test_last_step_shrink():
    # 7 packs: one full step (4) + 3 left: shrink -> a step with ceil(3 / 2) = 2 micro-batches
    # per replica, 3 real packs and 1 empty one; nothing dropped.
    lengths = np.array([10, 10, 10, 10, 9, 8, 4])
    plan = build_plan(lengths, None, _two_replica_cfg("shrink"))
    assert [s.micro_batches_per_replica for s in plan] == [2, 2] and len(plan.dropped) == 0
    sizes = sorted(sorted(len(p[3]) for p in packs_of(plan) if p[0] == s) for s in range(2))
    assert sizes == [[0, 1, 1, 1], [1, 1, 1, 1]]
    # 6 packs: 2 left -> 1 micro-batch per replica, no empty pack.
    plan = build_plan(lengths[:6], None, _two_replica_cfg("shrink"))
    assert sorted(s.micro_batches_per_replica for s in plan) == [1, 2] and len(plan.dropped) == 0
    assert all(len(p[3]) == 1 for p in packs_of(plan))


def test_default_last_step_drops_nothing():
    c = cfg([{"pack_length": 10}], world_size=2, micro_batches_per_step=2)
    assert c.last_step == "shrink"
    plan = build_plan(np.array([10, 10, 10, 10, 9, 8, 4]), None, c)
    assert len(plan.dropped) == 0 and sorted(plan.arrays["samples"].tolist()) == list(range(7))


@st.composite
def plan_cases(draw):
    n = draw(st.integers(1, 60))
    lengths = draw(st.lists(st.integers(1, 40), min_size=n, max_size=n))
    two = draw(st.booleans())
    cp_long = draw(st.sampled_from([1, 2]))
    groups = [{"pack_length": 16, "cp": 1}]
    if two:
        groups.append({"pack_length": 32, "cp": cp_long})
    kw = dict(
        world_size=draw(st.sampled_from([2, 4])),
        micro_batches_per_step=draw(st.integers(1, 2)),
        packer=draw(st.sampled_from(["isf", "bfd"])),
        balance=draw(st.sampled_from(["none", "sort", "lpt"])),
        greedy_fill=draw(st.booleans()),
        last_step=draw(st.sampled_from(["drop", "pad", "shrink"])),
        curriculum_steps=draw(st.integers(0, 3)),
        epochs=draw(st.integers(1, 2)),
        seed=draw(st.integers(0, 3)),
    )
    return np.array(lengths), cfg(groups, **kw)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan_cases())
def test_every_sample_exactly_once_per_epoch_or_dropped(case):
    lengths, c = case
    loss = (lengths // 2).astype(np.int32)
    plan = build_plan(lengths, loss, c)
    a = plan.arrays
    max_len = c.groups[-1].pack_length
    d = plan.dropped
    for e in range(c.epochs):
        steps = np.nonzero(a["step_epoch"] == e)[0]
        placed = []
        for s in steps:
            step = plan.step(int(s))
            grp = c.groups[step.group]
            assert len(step.replicas) == c.world_size // grp.cp
            total_loss, empty = 0, 0
            for r in step.replicas:
                assert len(r.micro_batches) == step.micro_batches_per_replica
                for mb in r.micro_batches:
                    for p in mb.packs:
                        placed += p.sample_indices.tolist()
                        assert (p.lengths == lengths[p.sample_indices]).all()
                        assert p.cu_seqlens_padded[-1] <= grp.pack_length
                        assert (p.padded_lengths % grp.pad_multiple == 0).all()
                        assert (p.padded_lengths >= p.lengths).all()
                        assert p.loss_tokens == int(loss[p.sample_indices].sum())
                        total_loss += p.loss_tokens
                        empty += len(p) == 0
            # empty packs only fill a group's last step: pad -> any number, shrink (and drop's
            # one-step rule) -> fewer than one per replica
            if c.last_step != "pad":
                assert empty < len(step.replicas)
            assert step.loss_tokens == total_loss
        de = d.epochs == e
        dropped = d.indices[de].tolist()
        # exactly once: placed and dropped are disjoint and together cover every sample once
        assert sorted(placed + dropped) == list(range(len(lengths)))
        for i, reason in zip(d.indices[de], d.reasons[de]):
            assert reason == ("too_long" if lengths[i] > max_len else "partial_step")
        if c.last_step in ("pad", "shrink"):  # nothing but too_long is ever dropped
            assert all(lengths[i] > max_len for i in dropped)


def test_curriculum_in_a_built_plan():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(1, 9, 200), rng.integers(9, 17, 30)])
    c = cfg([{"pack_length": 8}, {"pack_length": 16}], curriculum_steps=5, greedy_fill=False)
    plan = build_plan(lengths, None, c)
    groups = plan.arrays["step_group"].tolist()
    assert groups[:5] == [0] * 5 and 1 in groups


def _big_cfg(**kw):
    base = dict(
        groups=[{"pack_length": 256}, {"pack_length": 1024, "cp": 2}],
        world_size=4,
        micro_batches_per_step=2,
        curriculum_steps=3,
        epochs=2,
        seed=11,
    )
    base.update(kw)
    return cfg(base.pop("groups"), **base)


def test_determinism_byte_identical_plan_files(tmp_path):
    rng = np.random.default_rng(5)
    lengths = np.concatenate([rng.integers(1, 200, 3000), rng.integers(200, 1000, 40)])
    p1 = build_plan(lengths, None, _big_cfg()).save(tmp_path / "a" / "plan.npz")
    p2 = build_plan(lengths, None, _big_cfg()).save(tmp_path / "b" / "plan.npz")
    p3 = build_plan(lengths, None, _big_cfg(seed=12)).save(tmp_path / "c" / "plan.npz")
    assert p1.read_bytes() == p2.read_bytes()
    assert p1.read_bytes() != p3.read_bytes()


def test_save_load_roundtrip_and_fingerprint(tmp_path):
    rng = np.random.default_rng(5)
    lengths = rng.integers(1, 300, 500)
    plan = build_plan(lengths, None, _big_cfg(), fingerprint="abc123")
    path = plan.save(tmp_path / "plan.npz")
    back = load_plan(path, fingerprint="abc123", lengths=lengths)
    assert megatron_hbp.load_plan(path).fingerprint == "abc123"
    for k, v in plan.arrays.items():
        assert back.arrays[k].dtype == v.dtype and (back.arrays[k] == v).all(), k
    assert back.config == plan.config and back.num_steps == plan.num_steps
    s, t = plan.step(3), back.step(3)
    assert s.replicas[1].micro_batches[1].packs[0].sample_indices.tolist() == (
        t.replicas[1].micro_batches[1].packs[0].sample_indices.tolist()
    )
    with pytest.raises(PlanMismatchError, match="fingerprint 'abc123' but is used with 'zzz'"):
        load_plan(path, fingerprint="zzz")
    with pytest.raises(PlanMismatchError, match="rebuild the plan"):
        back.check_lengths(lengths + 1)
    bare = build_plan(lengths, None, _big_cfg())
    with pytest.raises(PlanMismatchError, match="bare lengths"):
        bare.check_fingerprint("abc123")


def test_load_rejects_other_versions_and_files(tmp_path):
    plan = build_plan(np.arange(1, 50), None, _big_cfg())
    path = plan.save(tmp_path / "plan.npz")
    with np.load(path) as z:
        data = {k: z[k] for k in z.files}
    meta = json.loads(str(data["meta"]))
    meta["version"] = 99
    data["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "v99.npz", **data)
    with pytest.raises(PlanFormatError, match="version 99, this code reads version 1"):
        load_plan(tmp_path / "v99.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(PlanFormatError, match="not a readable plan"):
        load_plan(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError, match="tools/plan.py"):
        load_plan(tmp_path / "missing.npz")
    assert zipfile.is_zipfile(path)


def test_plan_file_is_compact(tmp_path):
    lengths = np.random.default_rng(0).integers(1, 200, 20000)
    path = build_plan(lengths, None, _big_cfg(epochs=1)).save(tmp_path / "plan.npz")
    assert path.stat().st_size < 20000 * 10  # < 10 bytes per sample


@pytest.mark.parametrize(
    ("lengths", "match"),
    [
        (np.array([3, 0, 2]), "length <= 0 .*index 1"),
        (np.array([3, -4]), "length <= 0 .*index 1, length -4"),
        (np.array([], dtype=np.int64), "empty"),
        (np.array([1.5, 2.0]), "integers"),
        (np.ones((2, 2), dtype=np.int64), "1-D"),
    ],
)
def test_bad_lengths(lengths, match):
    with pytest.raises(PlanInputError, match=match):
        build_plan(lengths, None, cfg([{"pack_length": 8}]))


def test_bad_loss_tokens():
    with pytest.raises(PlanInputError, match="outside \\[0, length\\].*index 1"):
        build_plan(np.array([3, 4]), np.array([1, 5]), cfg([{"pack_length": 8}]))
    with pytest.raises(PlanInputError, match="shape"):
        build_plan(np.array([3, 4]), np.array([1]), cfg([{"pack_length": 8}]))


@pytest.mark.parametrize(
    ("groups", "kw", "match"),
    [
        ([{"pack_length": 100, "cp": 8}], {"world_size": 8}, "multiple of 2\\*cp=16.*pack_length=112"),
        ([{"pack_length": 64, "cp": 4}], {"world_size": 6}, "cp=4 does not divide world_size=6"),
        ([{"pack_length": 64}, {"pack_length": 32}], {}, "strictly increasing"),
        ([{"pack_length": 64}], {"packer": "ffd"}, "packer 'ffd' unknown.*isf, bfd"),
        ([{"pack_length": 64}], {"balance": "kk"}, "balance 'kk' unknown"),
        ([{"pack_length": 64}], {"last_step": "keep"}, "last_step 'keep' unknown"),
        ([{"pack_length": 64}], {"tokens_per_step": 128}, "exactly one of micro_batches_per_step"),
        ([{"pack_length": 64, "cp": 2}], {"world_size": 2, "tokens_per_gpu": 64}, "set pack_length=128"),
        ([{"pack_length": 0}], {}, "pack_length must be positive"),
        ([], {}, "at least one"),
    ],
)
def test_bad_configs(groups, kw, match):
    with pytest.raises(ConfigError, match=match):
        cfg(groups, **kw)


def test_tokens_per_step_resolves_micro_batches_and_rejects_non_multiples():
    c = PlanConfig(
        groups=[GroupConfig(pack_length=16), GroupConfig(pack_length=128, cp=8)],
        world_size=32,
        tokens_per_step=32 * 16 * 4,
    )
    # 2048 tokens: 32 replicas x 16 x 4 micro-batches; 4 replicas x 128 x 4 micro-batches
    assert (c.replicas(0), c.micro_batches(0), c.replicas(1), c.micro_batches(1)) == (32, 4, 4, 4)
    with pytest.raises(ConfigError, match="not a multiple of groups\\[1\\]'s micro-batch capacity.*1024"):
        PlanConfig(
            groups=[GroupConfig(pack_length=16), GroupConfig(pack_length=256, cp=8)],
            world_size=32,
            tokens_per_step=32 * 16,
        )


def test_yaml_unknown_key_and_shipped_configs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("groups: [{pack_length: 64}]\nworld_size: 1\nmicro_batches_per_step: 1\nbalanse: sort\n")
    with pytest.raises(ConfigError, match="unknown key.*'balanse' \\(did you mean 'balance'\\?\\)"):
        load_plan_config(bad)
    hbp = load_plan_config("configs/plan_hbp_16k_128k.yaml")
    assert [(g.pack_length, g.cp, g.recompute_layers) for g in hbp.groups] == [
        (16384, 1, 28),
        (131072, 8, 28),
    ]
    assert hbp.world_size == 32
    isf = load_plan_config("configs/plan_isf_128k.yaml")
    assert isf.packer == "isf" and [(g.pack_length, g.cp) for g in isf.groups] == [(131072, 8)]
    demo = load_plan_config("configs/plan_demo.yaml")
    assert demo.world_size == 2 and max(g.pack_length for g in demo.groups) <= 16384
