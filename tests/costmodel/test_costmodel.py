"""Cost model: FLOPs, memory, time, communication and the recompute search, against hand calculations.

The small model used throughout ("mini"): L=2, h=64, f=176, a=4 heads, g=2 KV heads, d=16,
V=1000. By hand:
  q = a d = 64, kv = g d = 32
  layer GEMM params = h (q + 2kv) + q h + 3 h f = 64*128 + 64*64 + 3*64*176 = 8192 + 4096 + 33792 = 46080
  F_d = 2 * 46080 = 92160 FLOPs per token and layer (forward)
  F_v = 2 h V = 128000 FLOPs per token (output layer, forward)
  F_a = 4 a d = 256 FLOPs per causal pair and layer (forward)
  N = L (46080 + 2h) + 2 V h + h = 2*46208 + 128000 + 64 = 220480 parameters
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_hbp.configio import ConfigError
from megatron_hbp.costmodel import (
    AnalyticProfiler,
    CalibrationPoint,
    CostModel,
    Efficiency,
    HardwareProfile,
    TrainingSetup,
    calibrate,
    greedy_profile_ckpt,
    load_hardware,
    zigzag_attention_pairs,
)
from megatron_hbp.model_config import ModelConfig, load_model_config

MINI = ModelConfig(
    name="mini",
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=176,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=1000,
)
N_MINI = 220480
# A made-up GPU with round numbers: 0.93696 TFLOP/s makes one token's fwd+bwd (k=0) of MINI
# take exactly 1 us (6*92160 + 3*128000 = 936960 FLOPs).
UNIT_GPU = HardwareProfile(
    name="unit",
    bf16_dense_tflops=0.93696,
    hbm_gb_per_s=26.4576,  # 12 N bytes of weight streaming = 2,645,760 B -> 0.1 ms
    memory_gib=1.0,
    nvlink_gb_per_s=1.0,
    internode_gb_per_s=0.5,
    gpus_per_node=8,
)
UNIT_EFF = Efficiency(
    dense_mfu=1.0,
    attention_mfu=1.0,
    hbm_efficiency=1.0,
    nvlink_efficiency=1.0,
    network_efficiency=1.0,
    microbatch_overhead_s=0.0,
    cp_compute_efficiency=1.0,
)
NO_OVERLAP = TrainingSetup(overlap_cp_comm=False, overlap_dp_comm=False, memory_reserve_gib=0.0)
ATTN_S_PER_PAIR = 3.5 * 2 * 256 / 0.93696e12  # (1 + 2.5) L F_a / peak


def unit_model(num_gpus=2, **setup):
    s = TrainingSetup(**{**NO_OVERLAP.__dict__, **setup})
    return CostModel(MINI, UNIT_GPU, num_gpus=num_gpus, setup=s, efficiency=UNIT_EFF)


def test_parameter_count_matches_hand():
    assert MINI.num_parameters() == N_MINI


def test_flops_against_hand_calculation():
    cm = unit_model()
    assert cm.dense_fwd_flops_per_token_layer() == 92160
    assert cm.logits_fwd_flops_per_token() == 128000
    assert cm.attention_fwd_flops_per_pair_layer() == 256
    # 10 tokens, no recompute: 10 * (3*2*92160 + 3*128000) = 9,369,600
    assert cm.dense_flops(10) == 9_369_600
    # one recomputed layer adds one forward of a layer: + 10 * 92160
    assert cm.dense_flops(10, 1) == 10_291_200
    # 10 pairs: 10 * (3.5 * 2) * 256 = 17,920; + one recomputed layer forward (10 * 256)
    assert cm.attention_flops(10) == 17_920
    assert cm.attention_flops(10, 1) == 20_480


def test_flops_scale_with_tensor_parallel():
    cm = unit_model(num_gpus=2, tensor_parallel=2)
    assert cm.dense_fwd_flops_per_token_layer() == 46080
    assert cm.attention_fwd_flops_per_pair_layer() == 128


def brute_pairs(lengths, cp):
    """Enumerate every causal pair of every document and the rank of its query."""
    out = np.zeros(cp, dtype=np.int64)
    for ln in lengths:
        m = 2 * cp
        padded = -(-ln // m) * m if cp > 1 else ln
        chunk = padded // (2 * cp) if cp > 1 else padded
        for q in range(ln):
            if cp == 1:
                r = 0
            else:
                j = q // chunk
                r = j if j < cp else 2 * cp - 1 - j
            out[r] += q + 1
    return out


@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
def test_zigzag_pairs_against_enumeration(cp):
    rng = np.random.default_rng(cp)
    packs = [rng.integers(1, 70, rng.integers(0, 5)) for _ in range(12)] + [np.array([1]), np.array([], int)]
    flat = np.concatenate(packs).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in packs])])
    got = zigzag_attention_pairs(flat, offsets, cp)
    assert got.shape == (len(packs), cp)
    for p, docs in enumerate(packs):
        np.testing.assert_array_equal(got[p], brute_pairs(docs, cp))


def test_zigzag_pairs_match_kernel_reference():
    torch = pytest.importorskip("torch")
    from megatron_hbp.kernels.attention_cost import attention_cost_reference

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 5000, 200)
    offsets = np.array([0, 3, 3, 50, 120, 200])
    for cp in (1, 2, 4, 8):
        ref = attention_cost_reference(torch.from_numpy(lengths), torch.from_numpy(offsets), cp).numpy()
        np.testing.assert_array_equal(zigzag_attention_pairs(lengths, offsets, cp), ref)


@pytest.mark.parametrize(
    ("lengths", "offsets", "cp", "match"),
    [
        (np.array([1.5]), np.array([0, 1]), 1, "integer"),
        (np.array([-1]), np.array([0, 1]), 1, ">= 0"),
        (np.array([3, 4]), np.array([0, 3]), 1, "non-decreasing"),  # past the last document
        (np.array([3, 4]), np.array([0, 2, 1]), 1, "non-decreasing"),
        (np.array([3]), np.array([0, 1]), 0, "cp must be"),
    ],
)
def test_zigzag_pairs_bad_input(lengths, offsets, cp, match):
    with pytest.raises(ValueError, match=match):
        zigzag_attention_pairs(lengths, offsets, cp)


def test_microbatch_time_hand_case_cp1():
    cm = unit_model()
    # one pack, docs [1000, 600]: 1600 tokens -> 1.6 ms dense (> 0.1 ms weight streaming);
    # pairs 1000*1001/2 + 600*601/2 = 500500 + 180300 = 680800
    pairs = zigzag_attention_pairs(np.array([1000, 600]), np.array([0, 2]), 1)
    assert pairs[0, 0] == 680800
    t = cm.microbatch_time([1600], pairs, 1, 0)
    assert t[0] == pytest.approx(1.6e-3 + 680800 * ATTN_S_PER_PAIR, rel=1e-12)


def test_microbatch_time_small_pack_is_weight_bound():
    cm = unit_model()
    # 50 tokens: 50 us of GEMMs but 0.1 ms to stream 12 bytes x N of weights and grads
    t = cm.microbatch_time([50], [[50 * 51 // 2]], 1, 0)
    assert t[0] == pytest.approx(1e-4 + 1275 * ATTN_S_PER_PAIR, rel=1e-12)


def test_cp_comm_hand_case_without_overlap():
    cm = unit_model()
    # doc 1500 on cp 2: each rank 750 tokens; zigzag: rank 0 chunks 0,3 = 70500 + 492375 pairs,
    # rank 1 chunks 1,2 = 562875 pairs. K/V bytes per layer: 1/2 * 1500 * 2*32 * 2 = 96000;
    # units: 3 L = 6 -> 576000 B at 1 GB/s = 0.576 ms.
    pairs = zigzag_attention_pairs(np.array([1500]), np.array([0, 1]), 2)
    np.testing.assert_array_equal(pairs, [[562875, 562875]])
    assert cm.cp_bytes_per_layer(1500, 2) == 96000
    compute, comm = cm.microbatch_breakdown([1500], pairs, 2, 0)
    assert comm[0] == pytest.approx(5.76e-4)
    assert compute[0] == pytest.approx(7.5e-4 + 562875 * ATTN_S_PER_PAIR)
    # one recomputed layer adds one more forward exchange: 7 units
    _, comm_k = cm.microbatch_breakdown([1500], pairs, 2, 1)
    assert comm_k[0] == pytest.approx(7 * 96000 / 1e9)


def test_cp_compute_efficiency_scales_cp_compute_only():
    slow = CostModel(
        MINI,
        UNIT_GPU,
        num_gpus=2,
        setup=NO_OVERLAP,
        efficiency=Efficiency(**{**UNIT_EFF.__dict__, "cp_compute_efficiency": 0.5}),
    )
    pairs = np.array([[562875, 562875]])
    compute, comm = slow.microbatch_breakdown([1500], pairs, 2, 0)
    assert compute[0] == pytest.approx(2 * (7.5e-4 + 562875 * ATTN_S_PER_PAIR))
    assert comm[0] == pytest.approx(5.76e-4)  # communication is not a compute cost
    assert slow.microbatch_time([1600], [[680800]], 1, 0)[0] == pytest.approx(
        1.6e-3 + 680800 * ATTN_S_PER_PAIR
    )


def test_balance_linear_coef_hand_value():
    # 2 * (dense s per token) / (attention s per pair) = 2 * 936960 / 1792 with unit efficiencies
    assert unit_model().balance_linear_coef() == pytest.approx(2 * 936960 / 1792)
    # one recomputed layer: 2 * (936960 + 92160) / (1792 + 256)
    assert unit_model().balance_linear_coef(1) == pytest.approx(2 * 1029120 / 2048)


def test_cp_comm_overlap_hides_behind_attention():
    cm = unit_model(overlap_cp_comm=True)
    pairs = np.array([[562875, 562875]])
    _, comm = cm.microbatch_breakdown([1500], pairs, 2, 0)
    # per layer forward: unit 96 us vs attention fwd of one layer 562875*512/0.93696e12 = 307.6 us
    assert comm[0] == 0.0
    cm_inter = CostModel(MINI, UNIT_GPU, num_gpus=16, gpus_per_node=1, setup=NO_OVERLAP, efficiency=UNIT_EFF)
    _, comm_net = cm_inter.microbatch_breakdown([1500], pairs, 2, 0)
    assert comm_net[0] == pytest.approx(576000 / 0.5e9)  # a CP group across nodes uses the network


def test_dp_and_optimizer_time_hand_case():
    cm = unit_model(num_gpus=2)
    # distributed optimizer: reduce-scatter fp32 grads + all-gather bf16 params: 1/2 * N * 6 bytes
    assert cm.dp_comm_bytes() == pytest.approx(0.5 * N_MINI * 6)
    assert cm.dp_comm_time() == pytest.approx(0.5 * N_MINI * 6 / 1e9)
    assert cm.optimizer_time() == pytest.approx(32 * N_MINI / 2 / 26.4576e9)
    plain = unit_model(num_gpus=2, distributed_optimizer=False)
    assert plain.dp_comm_bytes() == pytest.approx(2 * 0.5 * N_MINI * 4)
    overlapped = unit_model(num_gpus=2, overlap_dp_comm=True)
    assert overlapped.dp_exposed_time(1.0) == 0.0
    assert overlapped.dp_exposed_time(1e-4) == pytest.approx(0.5 * N_MINI * 6 / 1e9 - 1e-4)
    assert unit_model(num_gpus=1).dp_comm_time() == 0.0


def test_memory_against_hand_calculation():
    cm = unit_model(num_gpus=2, fused_loss=False)
    # full layer per token: 2 (4h + 2q + 2kv + 3f) + 4a = 2 (256 + 128 + 64 + 528) + 16 = 1968 B
    assert cm.full_layer_bytes_per_token() == 1968
    assert cm.checkpoint_layer_bytes_per_token() == 128
    m = cm.memory(1000, 1, 0)
    assert m.weights == 2 * N_MINI
    assert m.gradients == 4 * N_MINI
    assert m.optimizer == 12 * N_MINI / 2  # sharded over 2 DP ranks
    # 2 full layers + final norm / output-layer inputs 3 * 2h per token
    assert m.activations == 1000 * (2 * 1968 + 3 * 128)
    assert m.loss == 14 * 1000 * 1000  # unfused: 14 bytes per logit
    assert m.cp_buffers == 0
    m1 = cm.memory(1000, 1, 1)  # one recomputed layer: its input + a re-materialised layer
    assert m1.activations == 1000 * (1968 + 128 + 1968 + 3 * 128)
    m2 = cm.memory(1000, 2, 2)  # cp 2: 500 tokens per GPU; gathered K/V buffers 2 * 1000 * 64 * 2
    assert m2.activations == 500 * (2 * 128 + 1968 + 3 * 128)
    assert m2.cp_buffers == 2 * 1000 * 2 * 32 * 2
    fused = unit_model(num_gpus=2, fused_loss=True, fused_loss_chunk_tokens=256).memory(1000, 1, 0)
    # the kernel's CUDA default (grad_mode="in_forward"), bf16: dweight V x h, dhidden T x h and
    # one 256-token chunk of the V = 1000 logits, held from the end of the forward
    assert fused.loss == 2 * 1000 * 64 + 2 * 1000 * 64 + 2 * 256 * 1000
    # default chunk 512 tokens, fewer tokens than a chunk: the chunk is T x V
    assert unit_model(num_gpus=2, fused_loss=True).memory(300, 1, 0).loss == 2 * (
        1000 * 64 + 300 * 64 + 300 * 1000
    )
    # LLaMA-3.1-8B output layer (V 128256, h 4096), 8192 tokens, t = 2: dweight shard
    # 0.525 GB + dhidden 0.067 GB + chunk 0.066 GB (t = 1: 1.0507 + 0.0671 + 0.1313 = 1.249 GB,
    # 9.9 % of torch eager's measured +12.61 GB at 8192 x 4096 x 128256 on an H100)
    m8 = CostModel(
        load_model_config("llama3_1_8b"), "h100_sxm", num_gpus=2, setup=TrainingSetup(tensor_parallel=2)
    )
    assert m8.memory(8192, 1, 0).loss == 2 * (128256 * 4096 / 2 + 8192 * 4096 + 512 * 128256 / 2)
    m8 = CostModel(load_model_config("llama3_1_8b"), "h100_sxm", num_gpus=1, setup=TrainingSetup())
    assert m8.memory(8192, 1, 0).loss == pytest.approx(1.2491e9, rel=1e-4)
    no_zero = unit_model(num_gpus=2, distributed_optimizer=False).memory(1000, 1, 0)
    assert no_zero.optimizer == 12 * N_MINI


def brute_min_recompute(cm, tokens, cp, budget):
    for k in range(cm.model.num_layers + 1):
        if cm.memory(tokens, cp, k).total <= budget:
            return k
    return None


def test_min_recompute_layers_against_brute_force():
    cm = CostModel("llama3_1_8b", "h100_sxm", num_gpus=32)
    rng = np.random.default_rng(0)
    checked = {None: 0, "zero": 0, "mid": 0}
    for _ in range(300):
        tokens = int(rng.choice([2048, 4096, 8192, 16384, 32768, 65536, 131072]))
        cp = int(rng.choice([1, 2, 4, 8]))
        budget = float(rng.uniform(50, 120)) * 2**30
        want = brute_min_recompute(cm, tokens, cp, budget)
        assert cm.min_recompute_layers(tokens, cp, budget) == want, (tokens, cp, budget)
        checked[None if want is None else "zero" if want == 0 else "mid"] += 1
    assert all(v > 10 for v in checked.values()), checked  # every branch exercised


def test_greedy_profile_ckpt_against_brute_force():
    """Algorithm 3 (extrapolate from c_min and c_max, then verify) equals the exhaustive search."""
    cm = CostModel("llama3_1_8b", "h100_sxm", num_gpus=32)
    for budget_gib in (60, 70, 79.6, 100):
        prof = AnalyticProfiler(cm, memory_budget_bytes=budget_gib * 2**30)
        for tokens, cp in [
            (8192, 1),
            (16384, 1),
            (32768, 2),
            (65536, 8),
            (131072, 8),
            (131072, 4),
            (32768, 1),
        ]:
            got = greedy_profile_ckpt(prof, [np.array([tokens // 2])], tokens, cp)
            assert got == brute_min_recompute(cm, tokens, cp, budget_gib * 2**30), (budget_gib, tokens, cp)


def test_paper_recompute_counts_for_llama8b_on_h100():
    """The default memory reserve was fitted to the paper's Table 19 (8B, H100 80 GB): 28 recomputed
    layers at 16K tokens per GPU (16K/CP1, 64K/CP4, 128K/CP8) and 8 at 4K tokens (8K/CP2, 32K/CP8)."""
    cm = CostModel("llama3_1_8b", "h100_sxm", num_gpus=32)
    got = [
        cm.min_recompute_layers(t, c) for t, c in [(16384, 1), (65536, 4), (131072, 8), (8192, 2), (32768, 8)]
    ]
    assert got[:3] == [28, 29, 29]
    assert got[3:] == [6, 7]


def test_calibration_recovers_known_efficiencies():
    """Points generated with known efficiencies (compute-bound packs, CP comm not overlapped, the
    form calibrate() fits) are fitted back exactly; noisy points report their error."""
    truth = Efficiency(dense_mfu=0.55, attention_mfu=0.35, nvlink_efficiency=0.6, microbatch_overhead_s=0.004)
    setup = TrainingSetup(overlap_cp_comm=False)
    cm_true = CostModel("llama_1b", "h100_sxm", num_gpus=8, setup=setup, efficiency=truth)
    rng = np.random.default_rng(0)
    points = []
    for length, cp, k in [
        (4096, 1, 0),
        (8192, 1, 8),
        (16384, 1, 16),
        (32768, 2, 16),
        (16384, 4, 0),
        (32768, 8, 4),
    ]:
        packs = [rng.integers(1000, length // 2, 2) for _ in range(int(rng.integers(1, 4)))]
        packs.append(np.array([length]))
        t = AnalyticProfiler(cm_true).profile(packs, length, cp, k).time_s
        points.append(CalibrationPoint(packs=packs, pack_length=length, cp=cp, recompute_layers=k, time_s=t))
    start = CostModel("llama_1b", "h100_sxm", num_gpus=8, setup=setup)  # default efficiencies
    rep = calibrate(start, points)
    assert rep.efficiency.dense_mfu == pytest.approx(0.55, rel=1e-6)
    assert rep.efficiency.attention_mfu == pytest.approx(0.35, rel=1e-6)
    assert rep.efficiency.nvlink_efficiency == pytest.approx(0.6, rel=1e-6)
    assert rep.efficiency.microbatch_overhead_s == pytest.approx(0.004, rel=1e-6)
    assert rep.rms_relative_error < 1e-9
    noisy = [
        CalibrationPoint(**{**p.__dict__, "time_s": p.time_s * (1 + 0.05 * (-1) ** i)})
        for i, p in enumerate(points)
    ]
    rep2 = calibrate(start, noisy)
    assert 0.01 < rep2.rms_relative_error < 0.1
    assert rep2.max_relative_error >= rep2.rms_relative_error


def test_calibration_bad_input():
    cm = unit_model()
    with pytest.raises(ValueError, match="at least one"):
        calibrate(cm, [])
    p = CalibrationPoint(packs=[np.array([100])], pack_length=128, cp=1, recompute_layers=0, time_s=-1.0)
    with pytest.raises(ValueError, match="positive"):
        calibrate(cm, [p])


def test_hardware_for_device_name_reads_the_profiles(tmp_path, monkeypatch):
    from megatron_hbp.costmodel import hardware

    expected = {  # CUDA device name -> (profile, dense BF16 TFLOP/s from the datasheets)
        "NVIDIA H100 80GB HBM3": ("h100_sxm", 989.4),
        "NVIDIA H200": ("h200", 989.4),
        "NVIDIA H800": ("h800", 989.4),
        "NVIDIA A100-SXM4-80GB": ("a100_sxm", 312.0),
        "NVIDIA A100 80GB PCIe": ("a100_sxm", 312.0),
        "NVIDIA A800-SXM4-80GB": ("a800", 312.0),
        "NVIDIA B200": ("b200", 2250.0),
    }
    for device, (name, tflops) in expected.items():
        hw = hardware.hardware_for_device_name(device)
        assert (hw.name, hw.bf16_dense_tflops) == (name, tflops), device
    for device in ("NVIDIA A100-SXM4-40GB", "NVIDIA GeForce RTX 4090", "cpu"):
        assert hardware.hardware_for_device_name(device) is None
    # two profiles claiming one GPU: an error naming both, not a silent pick
    row = "bf16_dense_tflops: 1\nhbm_gb_per_s: 1\nmemory_gib: 1\nnvlink_gb_per_s: 1\ninternode_gb_per_s: 1\n"
    (tmp_path / "x1.yaml").write_text("name: x1\n" + row + "device_names: [X1]\n")
    (tmp_path / "x1b.yaml").write_text("name: x1b\n" + row + "device_names: [x1]\n")
    monkeypatch.setattr(hardware, "HARDWARE_DIR", tmp_path)
    with pytest.raises(ConfigError, match="several hardware profiles.*x1, x1b"):
        hardware.hardware_for_device_name("Vendor X1 GPU")


def test_hardware_profiles_load_and_validate(tmp_path):
    h100 = load_hardware("h100")
    assert h100.name == "h100_sxm" and h100.bf16_dense_tflops == pytest.approx(989.4)
    assert load_hardware("h200").hbm_gb_per_s == 4800
    with pytest.raises(ConfigError, match="unknown hardware profile 'a100'.*h100_sxm"):
        load_hardware("a100")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\nbf16_dense_tflops: -1\nhbm_gb_per_s: 1\nmemory_gib: 1\nnvlink_gb_per_s: 1\ninternode_gb_per_s: 1\n"
    )
    with pytest.raises(ConfigError, match="bf16_dense_tflops must be positive"):
        load_hardware(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("name: x\nbf16_tflops: 1\n")
    with pytest.raises(ConfigError, match="did you mean 'bf16_dense_tflops'"):
        load_hardware(typo)


def test_bad_settings_raise():
    with pytest.raises(ConfigError, match="dense_mfu"):
        Efficiency(dense_mfu=1.5)
    with pytest.raises(ConfigError, match="multiple of tensor_parallel"):
        CostModel(MINI, UNIT_GPU, num_gpus=3, setup=TrainingSetup(tensor_parallel=2))
    with pytest.raises(ValueError, match="recompute_layers"):
        unit_model().microbatch_time([10], [[55]], 1, 3)
    with pytest.raises(ValueError, match="recompute_layers"):
        unit_model().memory(10, 1, -1)


def test_time_grows_with_recompute_and_attention():
    cm = CostModel("llama3_1_8b", "h100_sxm", num_gpus=32)
    short = zigzag_attention_pairs(np.full(40, 400), np.array([0, 40]), 1)
    long = zigzag_attention_pairs(np.array([16000]), np.array([0, 1]), 1)
    t0, t24 = cm.microbatch_time([16000], short, 1, 0)[0], cm.microbatch_time([16000], short, 1, 24)[0]
    # recomputing 24 of 32 layers adds 24 layer forwards to 3*32 layer passes of GEMMs (~+25 %)
    assert 1.2 < t24 / t0 < 1.26
    # one 16K document instead of forty 400s: the extra causal pairs at 3.5 L F_a FLOPs each,
    # F_a = 4 * 4096 for LLaMA3.1-8B, at 989.4 TFLOP/s * attention_mfu 0.40
    extra_pairs = 16000 * 16001 // 2 - 40 * 400 * 401 // 2
    t_long = cm.microbatch_time([16000], long, 1, 0)[0]
    assert t_long - t0 == pytest.approx(extra_pairs * 3.5 * 32 * 16384 / (989.4e12 * 0.40), rel=1e-9)
    assert math.isfinite(t24)


def test_calibration_grid_and_holdout_with_a_stand_in_measurement():
    """The GPU calibration recipe end to end, with a cost model of other efficiencies standing in for
    the GPU: the grid has 0 / half / all recompute per length, and held-out errors vanish."""
    from megatron_hbp.costmodel.profiler import calibration_settings, holdout_calibration, measure_points

    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(200, 3000, 400), rng.integers(3000, 30000, 20)])
    settings = calibration_settings(lengths, 16, tokens_per_setting=32768)
    assert [(s[1], s[3]) for s in settings] == [
        (n, k) for n in (4096, 8192, 16384, 32768) for k in (0, 8, 16)
    ]
    truth = Efficiency(dense_mfu=0.5, attention_mfu=0.3, microbatch_overhead_s=0.01)
    points = measure_points(
        AnalyticProfiler(CostModel("llama_1b", "h100_sxm", num_gpus=1, efficiency=truth)), settings
    )
    rep, held = holdout_calibration(CostModel("llama_1b", "h100_sxm", num_gpus=1), points)
    assert rep.efficiency.dense_mfu == pytest.approx(0.5, rel=1e-6)
    assert np.abs(held).max() < 1e-9


def test_calibration_keeps_terms_the_points_cannot_separate():
    """Packs of short documents: attention is a few % of every time. Its efficiency keeps the
    model's value (under ``min_share``) while dense MFU and overhead are fitted exactly; forced to
    fit it anyway (``min_share=0``), no coefficient comes out non-physical (efficiency > 1 or a
    negative overhead), whatever the noise does."""
    truth = Efficiency(dense_mfu=0.33, attention_mfu=0.4, microbatch_overhead_s=0.01)
    cm_true = CostModel("llama_1b", "h100_sxm", num_gpus=1, efficiency=truth)
    rng = np.random.default_rng(1)
    points = []
    for length, k in [(4096, 0), (4096, 16), (8192, 8), (16384, 0), (16384, 16), (32768, 8)]:
        packs = [rng.integers(64, 1500, length // 1024) for _ in range(32768 // length)]
        t = AnalyticProfiler(cm_true).profile(packs, length, 1, k).time_s
        points.append(CalibrationPoint(packs=packs, pack_length=length, cp=1, recompute_layers=k, time_s=t))
    start = CostModel("llama_1b", "h100_sxm", num_gpus=1, efficiency=Efficiency(attention_mfu=0.4))
    rep = calibrate(start, points)
    assert rep.efficiency.attention_mfu == 0.4  # not fitted: kept
    assert rep.efficiency.dense_mfu == pytest.approx(0.33, rel=1e-6)
    assert rep.efficiency.microbatch_overhead_s == pytest.approx(0.01, rel=1e-6)
    for sign in (1, -1):
        noisy = [
            CalibrationPoint(**{**p.__dict__, "time_s": p.time_s * (1 + sign * 0.03 * (-1) ** i)})
            for i, p in enumerate(points)
        ]
        e = calibrate(start, noisy, min_share=0.0).efficiency
        assert 0 < e.dense_mfu <= 1 and 0 < e.attention_mfu <= 1 and e.microbatch_overhead_s >= 0
        assert e.dense_mfu < 1 and e.attention_mfu < 1  # no coefficient was clipped at 1
