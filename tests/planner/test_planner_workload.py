"""``megatron_hbp.planner.workload``: each rank's share of every step, against hand-computed values,
and the consumers' numbers (metrics, simulator, trainer's logged pairs / CP bytes) unchanged from
the code before the workload existed (values recorded by running main 5c335d6)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from megatron_hbp.planner import GroupConfig, Plan, PlanConfig, build_plan, load_plan
from megatron_hbp.planner.plan import lengths_digest
from megatron_hbp.planner.workload import cp_comm_bytes, derive_workload, step_denominators


def _hand_plan() -> Plan:
    """world 4. Step 0: group 0 (cp 1), 4 replicas x 1 mb: packs [3,4], [6], [] (empty), [2,2,1].
    Step 1: group 1 (cp 2), 2 replicas x 1 mb: packs [5], [8,3].
    Step 2: group 2 (cp 4, 1 recomputed layer), 1 replica x 2 mb: packs [10], [16,1]."""
    cfg = PlanConfig(
        groups=[
            GroupConfig(pack_length=16, cp=1),
            GroupConfig(pack_length=24, cp=2),
            GroupConfig(pack_length=32, cp=4, recompute_layers=1),
        ],
        world_size=4,
        micro_batches_per_step=1,
    )
    lengths = np.array([3, 4, 6, 2, 2, 1, 5, 8, 3, 10, 16, 1], dtype=np.int32)
    arrays = {
        "samples": np.arange(12, dtype=np.int32),
        "lengths": lengths,
        "pack_offsets": np.array([0, 2, 3, 3, 6, 7, 9, 10, 12], dtype=np.int64),
        "pack_loss_tokens": np.array([5, 6, 0, 3, 4, 0, 9, 10], dtype=np.int64),
        "step_pack_offsets": np.array([0, 4, 6, 8], dtype=np.int64),
        "step_group": np.array([0, 1, 2], dtype=np.int32),
        "step_micro_batches": np.array([1, 1, 2], dtype=np.int32),
        "step_epoch": np.zeros(3, dtype=np.int32),
        "step_loss_tokens": np.array([14, 4, 19], dtype=np.int64),
        "dropped_indices": np.zeros(0, np.int64),
        "dropped_reasons": np.zeros(0, np.int8),
        "dropped_epochs": np.zeros(0, np.int32),
    }
    return Plan(
        config=cfg, arrays=arrays, num_samples=12, fingerprint=None, lengths_sha256=lengths_digest(lengths)
    )


SAMPLE_LOSS = np.array([2, 3, 6, 0, 2, 1, 4, 0, 0, 9, 10, 0])  # sums per pack: the plan's pack_loss_tokens


def test_workload_layout_by_hand():
    wl = _hand_plan().workload
    assert wl.step_cp.tolist() == [1, 2, 4]
    assert wl.step_recompute_layers.tolist() == [0, 0, 1]
    assert wl.step_tokens.tolist() == [18, 16, 27]
    assert wl.pack_step.tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    assert wl.pack_replica.tolist() == [0, 1, 2, 3, 0, 1, 0, 0]
    assert wl.pack_micro_batch.tolist() == [0, 0, 0, 0, 0, 0, 0, 1]
    assert wl.pack_tokens.tolist() == [7, 6, 0, 5, 5, 11, 10, 17]
    # padding: cp 1 none; cp 2 to multiples of 4 (5->8, 3->4); cp 4 to multiples of 8 (10->16, 1->8)
    assert wl.padded_lengths.tolist() == [3, 4, 6, 2, 2, 1, 8, 8, 4, 16, 16, 8]
    assert wl.pack_padded_tokens.tolist() == [7, 6, 0, 5, 8, 12, 16, 24]
    assert wl.pack_sum_sq.tolist() == [25, 36, 0, 9, 25, 73, 100, 257]
    assert wl.pack_pairs.tolist() == [16, 21, 0, 7, 15, 42, 55, 137]  # Σ l(l+1)/2
    # one entry per (pack, CP rank); world rank = replica * cp + cp rank
    assert wl.entry_offsets.tolist() == [0, 1, 2, 3, 4, 6, 8, 12, 16]
    assert wl.entry_rank.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3]
    assert wl.entry_cp_rank.tolist() == [0, 0, 0, 0, 0, 1, 0, 1, 0, 1, 2, 3, 0, 1, 2, 3]


def test_zigzag_and_ulysses_pairs_by_hand():
    wl = _hand_plan().workload
    # cp 2 (4 chunks, rank r holds chunks r and 3-r), query q has q+1 pairs:
    #   l=5 padded 8, chunks of 2: 1+2, 3+4, 5, 0 -> rank 0: 3, rank 1: 12
    #   l=8: 3, 7, 11, 15 -> 18, 18; l=3 padded 4, chunks of 1: 1, 2, 3, 0 -> 1, 5; pack [8,3] -> 19, 23
    # cp 4 (8 chunks of 2, rank r holds r and 7-r): l=10: 3, 7, 11, 15, 19, 0, 0, 0 -> 3, 7, 11, 34
    #   l=16: 3, 7, ..., 31 -> 34 each; l=1 padded 8: 1 on rank 0 -> pack [16,1]: 35, 34, 34, 34
    assert wl.entry_zigzag_pairs.tolist() == [16, 21, 0, 7, 3, 12, 19, 23, 3, 7, 11, 34, 35, 34, 34, 34]
    ag = wl.entry_pairs("allgather")
    assert wl.rank_values(ag, 0).tolist() == [16, 21, 0, 7]
    assert wl.rank_values(ag, 1).tolist() == [3, 12, 19, 23]
    assert wl.rank_values(ag, 2).tolist() == [3 + 35, 7 + 34, 11 + 34, 34 + 34]
    uly = wl.entry_pairs("ulysses")  # whole documents on H/c heads: pack total / c on every rank
    assert wl.rank_values(uly, 0).tolist() == [16, 21, 0, 7]  # cp 1: the same whatever the backend
    assert wl.rank_values(uly, 1).tolist() == [7.5, 7.5, 21, 21]
    assert wl.rank_values(uly, 2).tolist() == [48.0] * 4  # 55/4 + 137/4
    with pytest.raises(ValueError, match="cp_impl 'ring' unknown"):
        wl.entry_pairs("ring")


def _one_replica_step(packs: list[list[int]], cp: int) -> Plan:
    """A one-step plan: one replica of ``cp`` ranks running ``packs`` as its micro-batches."""
    lengths = np.array([x for p in packs for x in p], dtype=np.int32)
    off = np.concatenate([[0], np.cumsum([len(p) for p in packs])]).astype(np.int64)
    cfg = PlanConfig(
        groups=[GroupConfig(pack_length=64, cp=cp)], world_size=cp, micro_batches_per_step=len(packs)
    )
    arrays = {
        "samples": np.arange(len(lengths), dtype=np.int32),
        "lengths": lengths,
        "pack_offsets": off,
        "pack_loss_tokens": np.zeros(len(packs), dtype=np.int64),
        "step_pack_offsets": np.array([0, len(packs)], dtype=np.int64),
        "step_group": np.zeros(1, dtype=np.int32),
        "step_micro_batches": np.array([len(packs)], dtype=np.int32),
        "step_epoch": np.zeros(1, dtype=np.int32),
        "step_loss_tokens": np.zeros(1, dtype=np.int64),
        "dropped_indices": np.zeros(0, np.int64),
        "dropped_reasons": np.zeros(0, np.int8),
        "dropped_epochs": np.zeros(0, np.int32),
    }
    return Plan(
        config=cfg,
        arrays=arrays,
        num_samples=len(lengths),
        fingerprint=None,
        lengths_sha256=lengths_digest(lengths),
    )


def _rank_pairs(packs, cp, cp_impl="allgather") -> list[float]:
    wl = _one_replica_step(packs, cp).workload
    return wl.rank_values(wl.entry_pairs(cp_impl), 0).tolist()


def test_rank_attention_pairs_cp1_and_zigzag_cp2():
    """(Moved from tests/mcore/test_mcore_metrics.py, where the trainer recounted them per step.)"""
    # cp 1: a document of n tokens has n (n + 1) / 2 causal pairs: 6 + 10
    assert _rank_pairs([[3, 4]], 1) == [16]
    # cp 2, one 8-token document in 4 chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    # Token at position p sees p + 1 keys: chunk pairs 3, 7, 11, 15 -> ranks 3 + 15 and 7 + 11.
    assert _rank_pairs([[8]], 2) == [18, 18]
    # two micro-batches add up
    assert _rank_pairs([[3], [4]], 1) == [16]
    # Ulysses: every rank of a cp 2 group runs whole documents on half the heads: 36 / 2 pairs
    # (lengths 5 and 3: 15 + 6 = 21 -> 10.5 whatever the rank), in all-head units
    assert _rank_pairs([[8]], 2, "ulysses") == [18, 18]
    assert _rank_pairs([[5, 3]], 2, "ulysses") == [10.5, 10.5]
    # cp 1 steps are the same whatever the CP backend
    assert _rank_pairs([[3, 4]], 1, "ulysses") == [16]


def test_fewer_launch_ranks_accumulate_replicas():
    wl = _hand_plan().workload
    ag = wl.entry_pairs("allgather")
    # 2 launch ranks for a 4-rank plan: step 0 (cp 1): rank 0 runs replicas 0 and 2, rank 1 replicas 1, 3
    assert wl.rank_packs(0, 0, 2).tolist() == [0, 2] and wl.rank_packs(0, 1, 2).tolist() == [1, 3]
    assert wl.rank_values(ag, 0, 2).tolist() == [16 + 0, 21 + 7]
    # step 1 (cp 2): one replica slot, both replicas on it; CP rank = launch rank
    assert wl.rank_packs(1, 0, 2).tolist() == [4, 5]
    assert wl.rank_values(ag, 1, 2).tolist() == [3 + 19, 12 + 23]


def test_group_max_sum_sq_and_denominators_by_hand():
    plan = _hand_plan()
    wl = plan.workload
    assert wl.group_max_sum_sq(plan.arrays["step_group"], 3).tolist() == [36.0, 73.0, 257.0]
    assert step_denominators(plan.arrays, wl, "step_token_mean").tolist() == [14, 4, 19]
    assert step_denominators(plan.arrays, wl, "micro_batch_mean").tolist() == [3, 1, 2]  # packs with loss
    # samples with loss tokens: step 0 samples 0,1,2,4,5; step 1 sample 6; step 2 samples 9, 10
    assert step_denominators(plan.arrays, wl, "sample_mean", SAMPLE_LOSS).tolist() == [5, 1, 2]
    with pytest.raises(ValueError, match="sample_mean needs sample_loss_tokens"):
        step_denominators(plan.arrays, wl, "sample_mean")
    with pytest.raises(ValueError, match="loss_normalization 'token' unknown"):
        step_denominators(plan.arrays, wl, "token")


def test_group_max_sum_sq_matches_packs():
    """(Moved from tests/mcore/test_mcore_checkpoint.py: the trainer's memory pre-flight reads it.)"""
    plan = build_plan(
        np.array([10, 20, 30, 5, 60, 100, 150, 200, 7, 9]),
        None,
        PlanConfig(
            groups=[GroupConfig(pack_length=64), GroupConfig(pack_length=256)],
            world_size=2,
            micro_batches_per_step=1,
        ),
    )
    want = np.zeros(2)
    for st in plan:
        for r in st.replicas:
            for mb in r.micro_batches:
                for pk in mb.packs:
                    want[st.group] = max(want[st.group], float((pk.lengths.astype(np.int64) ** 2).sum()))
    assert want.min() > 0
    np.testing.assert_array_equal(plan.workload.group_max_sum_sq(plan.arrays["step_group"], 2), want)


def test_cp_comm_bytes_by_hand():
    # all-gather, cp 2, 12 padded tokens: local 6; block = 2 (K,V) * 6 * 2 kv heads * 16 * 2 B = 768;
    # passes = 2 layers fwd + 1 recomputed + 2*2 backward = 7; (c-1) = 1 -> 5376
    kw = dict(num_heads=8, num_kv_heads=2, head_dim=16, num_layers=2, recompute_layers=1, dtype_bytes=2)
    assert cp_comm_bytes([12], 2, cp_impl="allgather", **kw).tolist() == [5376]
    # Ulysses, cp 2: each rank receives m = 1 K/V head; per forward pass q|k|v: 6 tokens * (8 + 2*1*2)
    # heads * 16 = 1152 elements, half leave the rank (576); output 6 * 8 * 16 = 768, half leaves (384):
    # 960 per pass, (2 + 1) forward + 2 backward passes = 4800 elements = 9600 B
    assert cp_comm_bytes([12], 2, cp_impl="ulysses", **kw).tolist() == [9600]
    assert cp_comm_bytes([12, 7], 1, cp_impl="ulysses", **kw).tolist() == [0, 0]  # CP 1 sends nothing
    with pytest.raises(ValueError, match="num_tokens 7 is not divisible by cp_size 2"):
        cp_comm_bytes([12, 7], 2, cp_impl="allgather", **kw)


def test_trainer_data_path_reads_the_workload():
    from megatron_hbp.mcore.data import rank_work_items

    items = rank_work_items(_hand_plan(), 3)
    # rank 3: step 0 pack [2,2,1]; step 1 replica 1 (pack [8,3]) as CP rank 1; step 2 both packs, CP rank 3
    assert [(i.step, i.micro_batch, i.cp, i.cp_rank) for i in items] == [
        (0, 0, 1, 0),
        (1, 0, 2, 1),
        (2, 0, 4, 3),
        (2, 1, 4, 3),
    ]
    assert [i.padded_lengths.tolist() for i in items] == [[2, 2, 1], [8, 4], [16], [16, 8]]
    assert [i.sample_indices.tolist() for i in items] == [[3, 4, 5], [7, 8], [9], [10, 11]]


def test_saved_plan_derives_the_same_workload(tmp_path):
    plan = _fixed_plan()
    loaded = load_plan(plan.save(tmp_path / "plan.npz"))
    a, b = plan.workload, loaded.workload
    for name in a.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_inconsistent_plan_arrays_are_a_clear_error():
    plan = _hand_plan()
    arrays = dict(plan.arrays, step_pack_offsets=np.array([0, 4, 6, 7], dtype=np.int64))
    with pytest.raises(ValueError, match="step_pack_offsets covers 7 packs, pack_offsets 8"):
        derive_workload(arrays, [1, 2, 4], [0, 0, 1], 4)


# ---------------------------------------------------------------------------------------------
# The consumers' numbers, unchanged: values recorded on main 5c335d6 (before the workload) by
# running its code (mcore.metrics.rank_attention_pairs over mcore.data.rank_work_items,
# mcore.train.group_sum_sq_lengths, cp.cp_comm_bytes / cp.ulysses_comm_bytes as the trainer
# called them, planner.metrics.compute_metrics, costmodel.simulate.simulate_plan).


def _fixed_plan() -> Plan:
    rng = np.random.default_rng(16)
    lengths = np.concatenate([rng.integers(1, 60, 40), rng.integers(60, 120, 10), rng.integers(120, 250, 6)])
    loss = (lengths * rng.uniform(0.2, 1.0, len(lengths))).astype(np.int64)
    cfg = PlanConfig(
        groups=[
            GroupConfig(pack_length=64, cp=1),
            GroupConfig(pack_length=128, cp=2, recompute_layers=1),
            GroupConfig(pack_length=256, cp=4),
        ],
        world_size=4,
        micro_batches_per_step=2,
        seed=3,
    )
    return build_plan(lengths, loss, cfg)


MAIN_5C335D6 = {
    "step_cp": [1, 4, 2, 1, 4, 2, 1, 4],
    "step_loss_tokens": [27, 250, 148, 314, 164, 263, 276, 329],
    "group_sum_sq": [3600.0, 13725.0, 59540.0],
    "pairs_allgather": [
        [441.0, 0.0, 0.0, 0.0],
        [12308.0, 14958.0, 14960.0, 14983.0],
        [3276.0, 3648.0, 3276.0, 3642.0],
        [3142.0, 3187.0, 3074.0, 2983.0],
        [9484.0, 11136.0, 11136.0, 11136.0],
        [5238.0, 5712.0, 4500.0, 4872.0],
        [2099.0, 2226.0, 2242.0, 2296.0],
        [7349.0, 8825.0, 8826.0, 8823.0],
    ],
    "pairs_ulysses": [
        [441.0, 0.0, 0.0, 0.0],
        [14302.25, 14302.25, 14302.25, 14302.25],
        [3462.0, 3462.0, 3459.0, 3459.0],
        [3142.0, 3187.0, 3074.0, 2983.0],
        [10723.0, 10723.0, 10723.0, 10723.0],
        [5475.0, 5475.0, 4686.0, 4686.0],
        [2099.0, 2226.0, 2242.0, 2296.0],
        [8455.75, 8455.75, 8455.75, 8455.75],
    ],
    "comm_rank0_allgather": [0, 294912, 57344, 0, 294912, 114688, 0, 294912],
    "comm_rank0_ulysses": [0, 294912, 102400, 0, 294912, 204800, 0, 294912],
    "metrics": {"ABR": 0.11117297188935711, "DBR": 0.10545595296300235, "CR": 0.6896232242124768, "PR": 0.1396484375},
    "cp_rank_balance": [None, 1.0474030016870923, 1.043299839724451],
    "sim_ring": {
        "step_times": [
            0.0020312593102794095, 0.004056503504774997, 0.002036029782082922, 0.004050026132218229,
            0.004056499679125179, 0.004059554715353217, 0.004050022097773112, 0.004056497922613744,
        ],
        "compute_s": 0.02829343642631626,
        "cp_comm_s": 2.9333149194798196e-06,
        "balanced_s": 0.028296367003637888,
    },
    "sim_allgather": {
        "step_times": [
            0.0020312593102794095, 0.0040565905484141246, 0.002036053122099512, 0.004050026132218229,
            0.004056564792365526, 0.004059591541573218, 0.004050022097773112, 0.004056549334721395,
        ],
        "compute_s": 0.02829350231201501,
        "cp_comm_s": 3.131164444444444e-06,
        "balanced_s": 0.02829662806060728,
    },
    "sim_ulysses": {
        "step_times": [
            0.0020312593102794095, 0.004056273440769087, 0.002036058727373872, 0.004050026132218229,
            0.004056254812226071, 0.0040596059105669725, 0.004050022097773112, 0.0040562430121103615,
        ],
        "compute_s": 0.028293426280332042,
        "cp_comm_s": 2.29376e-06,
        "balanced_s": 0.02829571541409113,
    },
}  # fmt: skip


def test_trainer_numbers_unchanged_on_a_fixed_plan():
    plan, want = _fixed_plan(), MAIN_5C335D6
    wl = plan.workload
    assert wl.step_cp.tolist() == want["step_cp"]
    assert wl.step_loss_tokens.tolist() == want["step_loss_tokens"]
    assert wl.group_max_sum_sq(plan.arrays["step_group"], 3).tolist() == want["group_sum_sq"]
    for impl in ("allgather", "ulysses"):
        got = [wl.rank_values(wl.entry_pairs(impl), s).tolist() for s in range(plan.num_steps)]
        assert got == want[f"pairs_{impl}"], impl  # exact: the trainer logs these floats


def test_trainer_cp_bytes_unchanged_on_a_fixed_plan():
    pytest.importorskip("torch")
    from megatron_hbp.mcore.metrics import step_rank_work
    from megatron_hbp.model_config import ModelConfig

    plan = _fixed_plan()
    # 8 heads, 2 K/V heads, head_dim 16, 2 layers, bf16 (the model the values were recorded with)
    mc = ModelConfig(
        name="w", num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=8,
        num_query_groups=2, vocab_size=64, max_position_embeddings=256,
    )  # fmt: skip
    assert mc.head_dim == 16
    for impl in ("allgather", "ulysses"):
        got = [
            step_rank_work(plan.workload, s, dp_rank=0, dp_size=4, cp_impl=impl, model_cfg=mc)[1]
            for s in range(plan.num_steps)
        ]
        assert got == MAIN_5C335D6[f"comm_rank0_{impl}"], impl


def test_metrics_and_simulator_unchanged_on_a_fixed_plan():
    from megatron_hbp.costmodel import CostModel, TrainingSetup
    from megatron_hbp.costmodel.simulate import simulate_plan
    from megatron_hbp.planner.metrics import compute_metrics

    plan, want = _fixed_plan(), MAIN_5C335D6
    m = compute_metrics(plan)
    assert {k: m[k] for k in ("ABR", "DBR", "CR", "PR")} == want["metrics"]
    assert [g["cp_rank_max_over_mean"] for g in m["per_group"]] == want["cp_rank_balance"]
    for impl in ("ring", "allgather", "ulysses"):
        r = simulate_plan(plan, CostModel("tiny", "h100_sxm", num_gpus=4, setup=TrainingSetup(cp_impl=impl)))
        assert r.step_times.tolist() == want[f"sim_{impl}"]["step_times"], impl
        assert (r.compute_s, r.cp_comm_s, r.extra["balanced_s"]) == (
            want[f"sim_{impl}"]["compute_s"],
            want[f"sim_{impl}"]["cp_comm_s"],
            want[f"sim_{impl}"]["balanced_s"],
        ), impl


@pytest.mark.slow
def test_million_sample_plan_workload_is_fast():
    rng = np.random.default_rng(0)
    lengths = np.minimum(np.exp(rng.normal(6.5, 1.2, 1_000_000)).astype(np.int64) + 1, 131072)
    cfg = PlanConfig(
        groups=[
            GroupConfig(pack_length=16384, cp=1),
            GroupConfig(pack_length=32768, cp=2),
            GroupConfig(pack_length=131072, cp=8, recompute_layers=28),
        ],
        world_size=32,
        tokens_per_step=2**21,
    )
    plan = build_plan(lengths, None, cfg)
    t0 = time.process_time()
    wl = plan.workload
    cpu = time.process_time() - t0
    assert cpu < 5.0, f"deriving the workload of a 1M-sample plan took {cpu:.2f} s of CPU"  # 0.1 s measured
    assert int(wl.step_tokens.sum()) == int(plan.arrays["lengths"].sum(dtype=np.int64))
    assert int(wl.pack_pairs.sum()) == int(wl.entry_zigzag_pairs.sum())  # zigzag splits every pack exactly
