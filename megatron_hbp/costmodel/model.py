"""Analytic time and memory model of one training step of a LLaMA-shaped model (NumPy only).

Notation (per model preset, ``megatron_hbp.model_config``): L layers, hidden h, SwiGLU width f,
a query heads, g K/V heads, head dim d, q = a d, kv = g d, vocabulary V; tensor parallel t,
context parallel c, data-parallel x context-parallel ranks n = GPUs / t. A micro-batch is one
pack of documents; T_p = sum of its (CP-padded) document lengths, T = T_p / c tokens per CP rank.
P_r = causal (query, key) pairs whose query is on CP rank r (``megatron_hbp.planner.workload.zigzag_attention_pairs``).
k = layers with full activation recomputation (Megatron ``recompute_granularity=full``).

FLOPs (one multiply-add = 2 FLOPs; the "6N" accounting of Kaplan et al. 2020 / Narayanan et
al. 2021 "Efficient Large-Scale Language Model Training on GPU Clusters", eq. 3, with the
attention score term written out per document instead of s^2 per sequence):

    dense forward per token and layer   F_d = 2 (h (q + 2 kv) + q h + 3 h f) / t
    output layer forward per token      F_v = 2 h V / t
    attention forward per pair, layer   F_a = 4 a d / t           (QK^T and PV: 2 d each, per head)
    backward = 2 x forward for GEMMs; 2.5 x forward for attention (FlashAttention-2 backward
    recomputes QK^T: 5 GEMMs vs 2, Dao 2023 section 3.2); recomputing k layers adds one forward.

    dense FLOPs of rank r = T ((3 L + k) F_d + 3 F_v)
    attention FLOPs of rank r = P_r ((1 + 2.5) L + k) F_a

Time of one micro-batch on CP rank r (roofline on the GEMMs: a small micro-batch is bound by
streaming the weights, which is what makes one-sample micro-batches expensive):

    t_dense = max(dense FLOPs / (peak * dense_mfu),  W_bytes / (HBM * hbm_efficiency))
    W_bytes = N_local (12 + 2 k / L)   bf16 weight read in forward and in data-gradient GEMMs
              (2 + 2), fp32 main-gradient read-modify-write (8), re-read for recomputed layers
    t_attn_r = attention FLOPs_r / (peak * attention_mfu)
    micro-batch time = max_r (t_dense + t_attn_r) / e_cp + exposed CP comm + microbatch_overhead_s
    (e_cp = cp_compute_efficiency when c > 1, else 1)

The max over ranks is there because ranks of a CP group synchronise every layer.

CP communication. Per layer and pass each rank sends (and receives) the K/V of one CP rank to
(from) each of the other c-1 ranks:  B = (c-1) (T_p / c) 2 kv b / t  bytes (b =
``activation_bytes``, the K/V dtype). How many such units a micro-batch moves depends on the CP
implementation (``TrainingSetup.cp_impl``):

    ring      (Transformer Engine ring attention, ``cp_comm_type="p2p"``, the GPU-cluster path):
              forward sends K/V around the ring (B); backward sends K/V around again together
              with the partial dK/dV (2B); a recomputed layer repeats its forward (B):
              (3 L + k) B per micro-batch.
    allgather (``megatron_hbp.cp.cp_attention``, the trainer's fallback, ``cp/comm.py``):
              one all-gather of K/V per forward (B, again for a recomputed layer), and in
              backward a second all-gather (the forward keeps only the local K/V and the
              attention is recomputed) plus the reduce-scatter of dK/dV (2B): (3 L + k) B per
              micro-batch, equal to ``megatron_hbp.cp.cp_comm_bytes`` (tests/costmodel/test_costmodel_cp.py).
              Attention compute: one more forward per layer (the recompute).
    ulysses   (``megatron_hbp.cp.ulysses``, the trainer's default): per layer and forward one
              all-to-all of q|k|v and one of the output, per backward the same for the
              gradients; each sends (c-1)/c of the local tensor:
              U = (c-1)/c (T_p / c) (2 q / t + 2 m c d) b per pass, (2 L + k) U per micro-batch
              (m = K/V heads a rank receives, ``megatron_hbp.headlayout.kv_heads_per_rank``; m c =
              g / t unless K/V heads are replicated), equal to ``megatron_hbp.cp.ulysses_comm_bytes``.
              Attention compute: every rank runs whole documents on a / c heads, so its pairs are
              exactly the pack's total / c whatever the document mix (no zigzag imbalance).

Bandwidth: NVLink when the CP group fits in a node (c t <= GPUs per node), else the inter-node
network, times its efficiency. ring with overlap (TE pipelines ring steps with attention blocks):
only max(0, comm - attention compute) of each layer phase is exposed; ring without overlap and
allgather and ulysses (blocking collectives before / after the attention kernel, nothing to
hide behind) expose all of it.

Data-parallel gradient reduction, once per step, over the n = GPUs / t ranks that hold the
same weights (DP x CP): distributed optimizer = reduce-scatter of g-byte gradients plus
all-gather of bf16 parameters, (n-1)/n N_local (g + 2) bytes per GPU; plain DDP = ring
all-reduce, 2 (n-1)/n N_local g bytes. g = 4 (Megatron sets
``accumulate_allreduce_grads_in_fp32`` with bf16). With overlap (Megatron
``overlap_grad_reduce``/``overlap_param_gather``) one micro-batch of compute hides it.
Optimizer (Adam) step: 32 bytes of HBM traffic per local shard parameter.

Step time = max over replicas (sum of its micro-batches) + exposed DP reduction + optimizer.

Memory per GPU (bytes; Korthikanti et al. 2022 "Reducing Activation Recomputation in Large
Transformer Models", section 4, re-derived for a LLaMA layer, no dropout, t-way TP without
sequence parallelism). b = ``activation_bytes``. Default implementation (the GPU path with
Transformer Engine: FlashAttention, fused RMSNorm, fused RoPE, fused SwiGLU), i.e. the attention
scores are never stored:

    static       = N_local (2 + g)  +  12 N_local / s      bf16 weights, main grads,
                   fp32 master + Adam m, v sharded over s = n ranks (distributed optimizer) or 1
    full layer   = T [b (4 h + (2 q + 2 kv + 3 f) / t) + 4 a / t]   per token: inputs of both
                   RMSNorms and of QKV and FC1 (4 h), q, k, v and attention output (2 q + 2 kv),
                   FC1 output of both SwiGLU branches and FC2 input (3 f), fp32 softmax LSE (4 a)
    checkpointed = T * b h   (the layer input)
    activations  = (L - k) full + k checkpointed + [k > 0] full   (backward of a recomputed layer
                   re-materialises one layer) + 3 T b h (final norm, output-layer input)
    loss         = unfused: 14 T V / t  (bf16 logits, fp32 copy, fp32 softmax and gradient;
                   measured 13.7-14.8 GB for 8192 x 128256 on a GPU, ENVIRONMENT.md)
                   fused (megatron_hbp.kernels.token_balanced_cross_entropy, its CUDA default
                   grad_mode "in_forward"): b (V h / t + T h + min(T, chunk) V / t) = dweight
                   (the output layer's, the weight dtype = b), dhidden and one [chunk, V / t]
                   logits chunk, computed in the forward and held until the loss backward, i.e.
                   at the activation peak (chunk: ``fused_loss_chunk_tokens``, the kernel's 512)
    CP buffers   = 2 T_p 2 kv 2 / t  (transient gathered K/V and their gradients of the layer
                   being computed) when c > 1 with ``ring`` / ``allgather``; with ``ulysses``
                   3 (T_p / c) (q / t + 2 m c d) b (send, receive and permuted copies of q|k|v)
    total        = static + activations + loss + CP buffers + memory_reserve_gib

Implementation knobs (``TrainingSetup``) change the full-layer term to what another code path
saves for backward; each is the tensor shapes that path hands to autograd (read from the code and
checked per tensor with ``torch.autograd.graph.saved_tensors_hooks`` on the tiny model, CPU,
torch 2.13, fp32 and bf16; tests/costmodel/test_costmodel_memory.py):

    rmsnorm_impl = "unfused" (torch.nn.RMSNorm, Megatron's fallback without apex/TE): per norm
        the input term b h becomes 8 h + 4: the composite kernel saves an fp32 copy of its input
        (the input itself in fp32) for x^2, the fp32 x * rstd for the weight multiply, and the
        fp32 rstd [T, 1]; its output (next GEMM input, b h) is counted as before.
    rope_impl = "unfused" (``megatron_hbp.mcore.attention.apply_rope``, used by every backend of
        this repository): + 16 d per token: fp32 cos and sin [T, 1, d] are saved by the two
        multiplies, once for q and once for k (fp32 whatever b, shared by heads and TP ranks).
    swiglu_impl = "unfused" (Megatron local MLP with ``bias_activation_fusion=False``):
        + 2 b f / t: silu(x1) and the copy ``x2 + glu_linear_offset`` are saved by the product,
        besides the FC1 output (2 f, saved by silu as a view) and the FC2 input (f).
    attention_impl = "math" (PyTorch SDPA's math backend, one call per document, which is what
        ``packed_attention(backend="sdpa")`` runs on CPU with GQA): replaces 2 q + 2 kv + 4 a
        per token by  4 (2 q + v') / t + b q / t  per token  +  4 a / t  per element of each
        document's l x l score matrix. The backend upcasts bf16 to fp32 and saves the scaled
        query [a, l, d], the scaled K^T expanded to a heads [a, d, l], V expanded to a heads
        (v' = q), and the softmax probabilities [a, l, l] (the full square, not the causal half);
        the RoPE'd q, k are not saved. Without GQA (a = g) in fp32 V is not copied: it is a view
        of the fused QKV GEMM output, whose whole storage stays alive (v' = q + 2 kv). The
        attention output (b q) is the input of the output projection. Needs the documents'
        sum of l^2 and c = 1.
    attention_expand_kv = True (``backend="varlen"``: K/V repeated to a heads before the flash
        kernel): the flash term saves k and v with a heads: 2 kv -> 2 q.
    cp_impl = "allgather" with c > 1 (``megatron_hbp.cp.cp_attention_local``, its CUDA varlen
        path): the flash term's K/V (2 kv b / t per local token, or 2 q b / t expanded) is
        replaced by the rows ``index_select``-ed from the gathered pack for the kernel, which the
        kernel saves: for each document of padded length l (chunks of s = l / 2c) rank r attends
        chunk r to keys [0, (r+1) s) and chunk 2c-1-r to keys [0, (2c-r) s), i.e. (2c+1) s =
        (1 + 1/2c) l keys, whatever r (fewer when the chunk ends in padding). Per local token
        (T = T_p / c) that is (c + 1/2) x the local K/V. The attention output is saved twice: by
        the kernel (its ``out`` over the real queries) and, after ``index_copy`` back into the
        local [T, a, d] layout, as the output projection's input: + b q / t. Altogether, per
        local token of a non-recomputed layer,
            + (c - 1/2) 2 kv b / t  (2 q instead of 2 kv when K/V are expanded)  +  b q / t.
        That was the all-gather path until 2026-12-06; it now keeps only the local q, k, v (the
        backward re-gathers K/V and recomputes the attention): the flash term with unexpanded
        K/V (2 kv), without the LSE. ``ring`` keeps only the local K/V: the flash term as it is.
    cp_impl = "ulysses" with c > 1: the kernel saves q, k, v, output and LSE of a / c heads
        over the whole pack, i.e. per local token q, k_r, v_r, out (k_r = m c d: the K/V heads
        the rank receives, = kv / t unless replicated; 2 q / t when the varlen kernel expands
        K/V) and the local output is saved again by the output projection (b q / t more).

The fewest recomputed layers that fit (GreedyProfileCkpt, computed): memory is linear in k
after the first recomputed layer, so k* = ceil((M(0) + full - budget) / (full - checkpointed)),
0 when M(0) fits, None when k = L does not fit (``min_recompute_layers``).

Every efficiency factor is a plain number in ``Efficiency`` (defaults are estimates, not
measurements) and can be fitted to measured iterations (``megatron_hbp.costmodel.profiler``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from megatron_hbp.configio import ConfigError
from megatron_hbp.costmodel.hardware import HardwareProfile, load_hardware
from megatron_hbp.headlayout import kv_heads_per_rank
from megatron_hbp.model_config import ModelConfig, load_model_config

GIB = 2**30
UNFUSED_LOSS_BYTES_PER_LOGIT = 14.0


@dataclass(frozen=True, kw_only=True)
class Efficiency:
    """Achieved fraction of each peak; defaults are literature-level estimates, fit them with
    ``calibrate`` on measured iterations."""

    dense_mfu: float = 0.60
    """GEMM throughput / peak BF16 (Megatron reports 0.5-0.6 MFU for 8B-70B LLaMA on H100)."""
    attention_mfu: float = 0.40
    """FlashAttention/cuDNN fwd+bwd throughput / peak (FA2 on H100: ~0.35-0.45; FA3: higher)."""
    hbm_efficiency: float = 0.80
    """Achieved / peak HBM bandwidth for weight streaming."""
    nvlink_efficiency: float = 0.75
    """Achieved / peak NVLink bandwidth for CP and DP collectives."""
    network_efficiency: float = 0.75
    """Achieved / peak inter-node bandwidth (NCCL bus bandwidth over IB)."""
    microbatch_overhead_s: float = 0.002
    """Fixed cost per micro-batch (kernel launches, Python scheduling), seconds."""
    cp_compute_efficiency: float = 0.87
    """Compute throughput with CP > 1 relative to CP = 1 (zigzag re-ordering, split attention
    kernels, per-step softmax corrections of ring attention). 0.87 fits the relative times of the
    paper's Table 19 profile (8B, H100) best: RMS error 3.7 % vs 12 % with 1.0 (docs/costmodel.md)."""

    def __post_init__(self):
        for name in (
            "dense_mfu",
            "attention_mfu",
            "hbm_efficiency",
            "nvlink_efficiency",
            "network_efficiency",
            "cp_compute_efficiency",
        ):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ConfigError(f"efficiency: {name} must be in (0, 1], got {v}")
        if self.microbatch_overhead_s < 0:
            raise ConfigError(
                f"efficiency: microbatch_overhead_s must be >= 0, got {self.microbatch_overhead_s}"
            )


@dataclass(frozen=True, kw_only=True)
class TrainingSetup:
    """How the job is run (parallel layout and memory-relevant options)."""

    tensor_parallel: int = 1
    """Tensor-parallel degree t (the DP x CP ranks are GPUs / t)."""
    distributed_optimizer: bool = True
    """Shard fp32 master weights and Adam states over the DP x CP ranks (Megatron
    ``use_distributed_optimizer``)."""
    fused_loss: bool = True
    """Chunked linear + cross-entropy that never materialises the [T, V] logits."""
    fused_loss_chunk_tokens: int = 512
    """Tokens per full-vocabulary logits chunk of the fused loss (the kernel's CUDA default for
    ``grad_mode="in_forward"``, ``_in_forward_chunk_tokens``)."""
    grad_bytes: int = 4
    """Bytes per main-gradient element (4: fp32 accumulate/all-reduce, Megatron's bf16 default)."""
    overlap_cp_comm: bool = True
    """Overlap the K/V exchange of context parallelism with attention compute."""
    overlap_dp_comm: bool = True
    """Overlap the gradient reduce-scatter / parameter all-gather with compute."""
    memory_reserve_gib: float = 16.0
    """Memory not available to the modelled tensors: CUDA context, NCCL buffers, allocator
    fragmentation, temporaries. 16 GiB reproduces the recompute counts the paper measured for
    LLaMA3.1-8B on 80 GB H100s (Table 19: 8 layers at 4K tokens/GPU, 28 at 16K; this model gives
    6-7 and 28-29); refitted from 14 GiB when the fused-loss term became the in_forward kernel's
    (2.1 GB less at 8B); a first-principles guess would be ~6 GiB."""
    attention_backward_factor: float = 2.5
    """Attention backward FLOPs / forward FLOPs (2.5 for FlashAttention-2)."""
    activation_bytes: int = 2
    """Bytes per stored activation element (2 for bf16 training; 4 for an fp32 run)."""
    attention_impl: str = "flash"
    """What the attention kernel saves for backward: ``flash`` (FlashAttention / TE / varlen: q, k,
    v, output and the fp32 softmax LSE; the GPU path) or ``math`` (PyTorch SDPA's math backend per
    document, what the ``sdpa`` backend runs on CPU with GQA: fp32 scaled q, K^T and V expanded to
    all heads and the fp32 [heads, l, l] probabilities of every document; memory then needs the
    documents' sum of squared lengths)."""
    attention_expand_kv: bool = False
    """``flash`` only: K/V are repeated to all query heads before the kernel, which then saves the
    copies (the ``varlen`` backend of ``megatron_hbp.mcore.attention`` does this for GQA)."""
    rope_impl: str = "fused"
    """``fused`` (TE fused RoPE: nothing saved besides q, k) or ``unfused``
    (``megatron_hbp.mcore.attention.apply_rope``, every backend of this repository: fp32 cos and sin
    [T, head_dim] saved for q and for k)."""
    swiglu_impl: str = "fused"
    """``fused`` (Megatron ``bias_swiglu_impl``: saves the FC1 output only) or ``unfused`` (local MLP
    without ``bias_activation_fusion``: also saves silu(x1) and a copy of x2, 2 ffn values)."""
    rmsnorm_impl: str = "fused"
    """``fused`` (TE/apex RMSNorm: saves its input) or ``unfused`` (``torch.nn.RMSNorm``, Megatron's
    fallback on CPU: saves an fp32 copy of the input, the fp32 normalised input and fp32 rstd)."""
    cp_impl: str = "ring"
    """Context-parallel attention of steps with CP > 1: ``ring`` (Transformer Engine's ring
    attention, the GPU-cluster path: K/V sent around the ring in forward, again with dK/dV in
    backward, (3 L + k) units per micro-batch, overlapped with attention when
    ``overlap_cp_comm``; each layer keeps only its local K/V), ``allgather`` (``megatron_hbp.cp``'s
    fallback: one all-gather of K/V per forward, another plus a reduce-scatter of dK/dV per
    backward (the attention is recomputed there), (3 L + k) units, equal to the trainer's logged
    ``cp_comm_bytes_per_rank``, never overlapped; keeps only the local q, k, v) or ``ulysses``
    (``megatron_hbp.cp.ulysses``, the trainer's default: all-to-all of q|k|v and of the output,
    forward and backward, never overlapped; per-rank attention exactly 1/c of the pack; saved
    tensors local-sized). No effect at CP 1."""

    def __post_init__(self):
        if self.tensor_parallel < 1:
            raise ConfigError(f"training setup: tensor_parallel must be >= 1, got {self.tensor_parallel}")
        if self.grad_bytes not in (2, 4):
            raise ConfigError(
                f"training setup: grad_bytes must be 2 (bf16) or 4 (fp32), got {self.grad_bytes}"
            )
        for name, allowed in (
            ("attention_impl", ("flash", "math")),
            ("rope_impl", ("fused", "unfused")),
            ("swiglu_impl", ("fused", "unfused")),
            ("rmsnorm_impl", ("fused", "unfused")),
            ("cp_impl", ("ring", "allgather", "ulysses")),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"training setup: {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if self.attention_expand_kv and self.attention_impl != "flash":
            raise ConfigError(
                "training setup: attention_expand_kv describes the flash kernel; the math backend always "
                "expands K/V (set attention_expand_kv: false)"
            )
        if self.activation_bytes not in (2, 4):
            raise ConfigError(
                f"training setup: activation_bytes must be 2 (bf16) or 4 (fp32), got {self.activation_bytes}"
            )
        if self.memory_reserve_gib < 0 or self.fused_loss_chunk_tokens < 1:
            raise ConfigError(
                "training setup: memory_reserve_gib must be >= 0 and fused_loss_chunk_tokens >= 1"
            )


@dataclass(frozen=True)
class MemoryBreakdown:
    """Peak memory of one GPU, bytes."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    loss: float
    cp_buffers: float
    reserve: float

    @property
    def total(self) -> float:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.activations
            + self.loss
            + self.cp_buffers
            + self.reserve
        )


@dataclass(frozen=True)
class TimeComponents:
    """Micro-batch times at unit efficiency (seconds with every efficiency = 1 and no overhead).

    Each field is an array [M] over micro-batches; the time under an ``Efficiency`` e is
    ``dense / e.dense_mfu + attention / e.attention_mfu + comm / e.<link>_efficiency +
    e.microbatch_overhead_s`` when compute bound (what ``calibrate`` fits)."""

    dense: np.ndarray
    attention: np.ndarray
    comm: np.ndarray


class CostModel:
    """Time and memory of micro-batches and steps for one model on one cluster.

    Args:
        model: ``ModelConfig`` or preset name.
        hardware: ``HardwareProfile`` or profile name.
        num_gpus: GPUs in the job (DP x CP x TP).
        gpus_per_node: NVLink domain size (default: the hardware profile's).
        setup, efficiency: see ``TrainingSetup`` and ``Efficiency``.
    """

    def __init__(
        self,
        model: ModelConfig | str,
        hardware: HardwareProfile | str = "h100_sxm",
        *,
        num_gpus: int = 8,
        gpus_per_node: int | None = None,
        setup: TrainingSetup | None = None,
        efficiency: Efficiency | None = None,
    ):
        self.model = load_model_config(model) if isinstance(model, str) else model
        self.hardware = load_hardware(hardware) if isinstance(hardware, str) else hardware
        self.num_gpus = int(num_gpus)
        self.gpus_per_node = int(gpus_per_node or self.hardware.gpus_per_node)
        self.setup = setup or TrainingSetup()
        self.efficiency = efficiency or Efficiency()
        t = self.setup.tensor_parallel
        if self.num_gpus < 1 or self.num_gpus % t:
            raise ConfigError(
                f"num_gpus ({self.num_gpus}) must be a positive multiple of tensor_parallel ({t})"
            )
        m = self.model
        h, f, d = m.hidden_size, m.ffn_hidden_size, m.head_dim
        self.q_dim = m.num_attention_heads * d
        self.kv_dim = m.num_query_groups * d
        self.layer_matmul_params = h * (self.q_dim + 2 * self.kv_dim) + self.q_dim * h + 3 * h * f
        self.params_local = m.num_parameters() / t

    # ------------------------------------------------------------------ configuration
    def with_efficiency(self, efficiency: Efficiency) -> CostModel:
        return CostModel(
            self.model,
            self.hardware,
            num_gpus=self.num_gpus,
            gpus_per_node=self.gpus_per_node,
            setup=self.setup,
            efficiency=efficiency,
        )

    def with_setup(self, **changes) -> CostModel:
        return CostModel(
            self.model,
            self.hardware,
            num_gpus=self.num_gpus,
            gpus_per_node=self.gpus_per_node,
            setup=replace(self.setup, **changes),
            efficiency=self.efficiency,
        )

    @property
    def dp_cp_ranks(self) -> int:
        return self.num_gpus // self.setup.tensor_parallel

    # ------------------------------------------------------------------ FLOPs
    def dense_fwd_flops_per_token_layer(self) -> float:
        """F_d: forward GEMM FLOPs of one token in one layer (per TP rank)."""
        return 2.0 * self.layer_matmul_params / self.setup.tensor_parallel

    def logits_fwd_flops_per_token(self) -> float:
        """F_v: forward FLOPs of the output layer per token (per TP rank)."""
        return 2.0 * self.model.hidden_size * self.model.vocab_size / self.setup.tensor_parallel

    def attention_fwd_flops_per_pair_layer(self) -> float:
        """F_a: forward attention FLOPs per causal (q, k) pair and layer (per TP rank)."""
        return 4.0 * self.q_dim / self.setup.tensor_parallel

    def dense_flops(self, tokens, recompute_layers: int = 0):
        """Forward + backward (+ recompute) GEMM FLOPs of ``tokens`` tokens on one GPU."""
        L, k = self.model.num_layers, recompute_layers
        return np.asarray(tokens, dtype=np.float64) * (
            (3 * L + k) * self.dense_fwd_flops_per_token_layer() + 3 * self.logits_fwd_flops_per_token()
        )

    def attention_flops(self, pairs, recompute_layers: int = 0):
        """Forward + backward (+ recompute) attention FLOPs of ``pairs`` causal pairs on one GPU."""
        L, k = self.model.num_layers, recompute_layers
        bwd = self.setup.attention_backward_factor
        return np.asarray(pairs, dtype=np.float64) * (
            ((1 + bwd) * L + k) * self.attention_fwd_flops_per_pair_layer()
        )

    def balance_linear_coef(self, recompute_layers: int = 0) -> float:
        """a in the planner's balancing cost ``a * tokens + sum(l^2)`` so that it is proportional to
        this model's compute time: a causal-pair count is ~l^2 / 2, hence
        a = 2 (dense seconds per token) / (attention seconds per pair)."""
        e = self.efficiency
        dense = float(self.dense_flops(1.0, recompute_layers)) / e.dense_mfu
        attn = float(self.attention_flops(1.0, recompute_layers)) / e.attention_mfu
        return 2.0 * dense / attn

    # ------------------------------------------------------------------ communication
    def _link(self, group_gpus: int) -> tuple[float, float]:
        """(bandwidth bytes/s, efficiency) of the slowest link of a ring over ``group_gpus`` GPUs."""
        hw, e = self.hardware, self.efficiency
        if group_gpus <= self.gpus_per_node:
            return hw.nvlink_gb_per_s * 1e9, e.nvlink_efficiency
        return hw.internode_gb_per_s * 1e9, e.network_efficiency

    def cp_bytes_per_layer(self, pack_tokens, cp: int):
        """B: K/V bytes each CP rank sends (and receives) per layer and pass,
        ``(c - 1) (T_p / c) 2 kv b / t`` (``pack_tokens`` = T_p, a multiple of ``cp``)."""
        t, b = self.setup.tensor_parallel, self.setup.activation_bytes
        local = np.asarray(pack_tokens, dtype=np.float64) / cp
        return (cp - 1) * local * (2 * self.kv_dim * b) / t

    def cp_comm_units(self, recompute_layers: int = 0) -> int:
        """How many per-layer-and-pass units one micro-batch moves: 3 L + k for ``ring`` (forward
        K/V; backward K/V and dK/dV; recomputed forwards) and ``allgather`` (all-gather per forward,
        all-gather + reduce-scatter per backward), 2 L + k for ``ulysses`` (its unit,
        ``ulysses_bytes_per_layer``, is one pass's all-to-alls)."""
        L, k = self.model.num_layers, int(recompute_layers)
        if not 0 <= k <= L:
            raise ValueError(f"recompute_layers must be in [0, {L}], got {k}")
        return (2 if self.setup.cp_impl == "ulysses" else 3) * L + k

    def ulysses_kv_heads(self, cp: int) -> int:
        """K/V heads one rank receives under Ulysses, times ``cp`` (= g / t unless replicated)."""
        t = self.setup.tensor_parallel
        a, g = self.model.num_attention_heads // t, self.model.num_query_groups // t
        return len(kv_heads_per_rank(a, g, cp)[0]) * cp

    def ulysses_bytes_per_layer(self, pack_tokens, cp: int):
        """U: bytes one rank sends per layer and pass under Ulysses: (c-1)/c of its local q|k|v
        and output, ``(c-1)/c (T_p / c) (2 q / t + 2 m c d) b``."""
        t, b = self.setup.tensor_parallel, self.setup.activation_bytes
        local = np.asarray(pack_tokens, dtype=np.float64) / cp
        width = 2 * self.q_dim / t + 2 * self.ulysses_kv_heads(cp) * self.model.head_dim
        return (cp - 1) / cp * local * width * b

    def cp_comm_bytes_per_rank(self, pack_tokens, cp: int, recompute_layers: int = 0):
        """Bytes one CP rank sends for CP attention on micro-batches of ``pack_tokens`` padded
        tokens (whole pack, array-like), all layers, forward + backward (+ recompute); 0 at CP 1.
        With ``cp_impl="allgather"`` this is what the trainer logs as ``cp_comm_bytes_per_rank``."""
        if cp == 1:
            return np.zeros_like(np.asarray(pack_tokens, dtype=np.float64))
        if self.setup.cp_impl == "ulysses":
            return self.ulysses_bytes_per_layer(pack_tokens, cp) * self.cp_comm_units(recompute_layers)
        return self.cp_bytes_per_layer(pack_tokens, cp) * self.cp_comm_units(recompute_layers)

    def dp_comm_bytes(self) -> float:
        """Bytes each GPU sends for one gradient reduction (+ parameter all-gather)."""
        n, g = self.dp_cp_ranks, self.setup.grad_bytes
        if n == 1:
            return 0.0
        if self.setup.distributed_optimizer:
            return (n - 1) / n * self.params_local * (g + 2)
        return 2 * (n - 1) / n * self.params_local * g

    def dp_comm_time(self) -> float:
        """Seconds of the gradient reduction of one step (not yet overlapped)."""
        bw, eff = self._link(self.num_gpus)
        return self.dp_comm_bytes() / (bw * eff)

    def optimizer_time(self) -> float:
        shard = self.dp_cp_ranks if self.setup.distributed_optimizer else 1
        return (
            32.0
            * self.params_local
            / shard
            / (self.hardware.hbm_gb_per_s * 1e9 * self.efficiency.hbm_efficiency)
        )

    # ------------------------------------------------------------------ time
    def time_components(self, pack_tokens, pairs, cp: int, recompute_layers: int = 0) -> TimeComponents:
        """Unit-efficiency seconds per micro-batch (compute-bound branch), for calibration.

        ``pack_tokens``: [M] tokens of each micro-batch (all CP ranks); ``pairs``: [M, cp]."""
        pack_tokens = np.asarray(pack_tokens, dtype=np.float64)
        pairs = np.asarray(pairs, dtype=np.float64).reshape(pack_tokens.size, cp)
        peak = self.hardware.peak_flops
        cp_eff = self.efficiency.cp_compute_efficiency if cp > 1 else 1.0
        dense = self.dense_flops(pack_tokens / cp, recompute_layers) / peak / cp_eff
        pairs = self.rank_pairs(pairs, cp)
        attention = (
            self.attention_flops(pairs.max(axis=1), recompute_layers)
            * self.cp_attention_factor(cp, recompute_layers)
            / peak
            / cp_eff
        )
        bw, _ = self._link(cp * self.setup.tensor_parallel)
        comm = self.cp_comm_bytes_per_rank(pack_tokens, cp, recompute_layers) / bw
        return TimeComponents(dense=dense, attention=attention, comm=comm)

    def microbatch_time(self, pack_tokens, pairs, cp: int, recompute_layers: int = 0) -> np.ndarray:
        """Seconds of forward + backward of each micro-batch on its CP group: [M].

        ``pack_tokens``: [M] tokens (sum of padded document lengths) of each micro-batch;
        ``pairs``: [M, cp] causal pairs per CP rank (``zigzag_attention_pairs``)."""
        compute, comm = self.microbatch_breakdown(pack_tokens, pairs, cp, recompute_layers)
        return compute + comm + self.efficiency.microbatch_overhead_s

    def microbatch_breakdown(
        self, pack_tokens, pairs, cp: int, recompute_layers: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """(compute seconds of the slowest CP rank, exposed CP communication seconds), each [M]."""
        e, hw = self.efficiency, self.hardware
        L, k = self.model.num_layers, int(recompute_layers)
        if not 0 <= k <= L:
            raise ValueError(f"recompute_layers must be in [0, {L}], got {k}")
        pack_tokens = np.atleast_1d(np.asarray(pack_tokens, dtype=np.float64))
        pairs = np.asarray(pairs, dtype=np.float64).reshape(pack_tokens.size, cp)
        peak = hw.peak_flops
        t_dense_flops = self.dense_flops(pack_tokens / cp, k) / (peak * e.dense_mfu)
        weight_bytes = self.params_local * (12.0 + 2.0 * k / L)
        t_weights = weight_bytes / (hw.hbm_gb_per_s * 1e9 * e.hbm_efficiency)
        t_dense = np.maximum(t_dense_flops, t_weights)
        pairs = self.rank_pairs(pairs, cp)
        t_attn = self.attention_flops(pairs, k) * self.cp_attention_factor(cp, k) / (peak * e.attention_mfu)
        compute = (t_dense[:, None] + t_attn).max(axis=1)
        if cp > 1:
            compute = compute / e.cp_compute_efficiency
        comm = self.cp_exposed_time(pack_tokens, t_attn.mean(axis=1), cp, k)
        return compute, comm

    def rank_pairs(self, pairs, cp: int) -> np.ndarray:
        """Causal pairs each CP rank's attention computes, ``[M, cp]``, from the zigzag split's
        ``pairs``: as given for ``ring`` / ``allgather``; the mean for ``ulysses`` (whole
        documents on a / c heads: exactly the total / c on every rank)."""
        pairs = np.asarray(pairs, dtype=np.float64)
        if cp > 1 and self.setup.cp_impl == "ulysses":
            return np.broadcast_to(pairs.mean(axis=1, keepdims=True), pairs.shape)
        return pairs

    def cp_attention_factor(self, cp: int, recompute_layers: int = 0) -> float:
        """Attention compute relative to ``attention_flops``: ``allgather`` recomputes every layer's
        attention forward in backward (it keeps only the local K/V); 1 otherwise."""
        if cp == 1 or self.setup.cp_impl != "allgather":
            return 1.0
        L, k = self.model.num_layers, recompute_layers
        bwd = self.setup.attention_backward_factor
        return ((2 + bwd) * L + k) / ((1 + bwd) * L + k)

    def cp_exposed_time(self, pack_tokens, attention_time, cp: int, recompute_layers: int = 0) -> np.ndarray:
        """Seconds of CP communication not hidden behind attention, per micro-batch: [M].

        ``attention_time``: [M] fwd+bwd(+recompute) attention seconds of one rank."""
        pack_tokens = np.atleast_1d(np.asarray(pack_tokens, dtype=np.float64))
        if cp == 1:
            return np.zeros_like(pack_tokens)
        L, k = self.model.num_layers, recompute_layers
        bw, eff = self._link(cp * self.setup.tensor_parallel)
        if not self.setup.overlap_cp_comm or self.setup.cp_impl in ("allgather", "ulysses"):
            # megatron_hbp.cp's collectives block the layer: nothing hides them
            return self.cp_comm_bytes_per_rank(pack_tokens, cp, k) / (bw * eff)
        unit = self.cp_bytes_per_layer(pack_tokens, cp) / (bw * eff)  # one layer, one pass
        bwd = self.setup.attention_backward_factor
        fwd_attn = np.asarray(attention_time, dtype=np.float64) / ((1 + bwd) * L + k)  # one layer forward
        exposed = L * np.maximum(0.0, unit - fwd_attn)
        exposed += L * np.maximum(0.0, 2 * unit - bwd * fwd_attn)
        exposed += k * np.maximum(0.0, unit - fwd_attn)
        return exposed

    def dp_exposed_time(self, microbatch_compute: float) -> float:
        """Exposed gradient-reduction seconds when one micro-batch of ``microbatch_compute``
        seconds can hide it (overlap) or none can."""
        comm = self.dp_comm_time()
        if self.setup.overlap_dp_comm:
            return max(0.0, comm - microbatch_compute)
        return comm

    def step_time(self, replica_times, last_microbatch_time: float) -> float:
        """Seconds of one optimizer step: slowest replica + exposed DP reduction + optimizer."""
        return (
            float(np.max(replica_times)) + self.dp_exposed_time(last_microbatch_time) + self.optimizer_time()
        )

    # ------------------------------------------------------------------ memory
    def full_layer_bytes_per_token(self, cp: int = 1) -> float:
        """Activation bytes one local token keeps in one non-recomputed layer (per GPU) of a step
        with CP ``cp``, the part linear in tokens; with ``attention_impl="math"`` add
        ``full_layer_bytes_per_sq_length`` x sum l^2. ``cp`` matters only for
        ``cp_impl="allgather"`` (gathered K/V kept for backward)."""
        st, m = self.setup, self.model
        t = st.tensor_parallel
        h, f, d = m.hidden_size, m.ffn_hidden_size, m.head_dim
        b = float(st.activation_bytes)
        # two RMSNorms: what each keeps of its input + its output (the next GEMM's input)
        norm_in = b * h if st.rmsnorm_impl == "fused" else 8.0 * h + 4.0
        total = 2 * (norm_in + b * h) + self.attention_bytes_per_token(cp)
        if st.rope_impl == "unfused":
            total += 16.0 * d  # fp32 cos, sin [T, 1, d] for q and for k
        total += b * (3 if st.swiglu_impl == "fused" else 5) * f / t
        return total

    def attention_bytes_per_token(self, cp: int = 1) -> float:
        """The attention part of ``full_layer_bytes_per_token``: bytes one local token keeps for the
        attention kernel's backward and the output projection's input (q, k, v, output, softmax
        statistics), per GPU, in a step with CP ``cp``; with ``cp_impl="allgather"`` and
        ``cp > 1`` including the gathered K/V rows and the second output copy."""
        st, m = self.setup, self.model
        t, a = st.tensor_parallel, m.num_attention_heads
        q, kv = self.q_dim, self.kv_dim
        b = float(st.activation_bytes)
        if st.attention_impl == "math":
            v_saved = q + 2 * kv if (a == m.num_query_groups and b == 4) else q
            return 4.0 * (2 * q + v_saved) / t + b * q / t  # fp32 q, K^T, V; output
        k_v = 2 * q if st.attention_expand_kv else 2 * kv
        if cp > 1 and st.cp_impl == "allgather":
            # the local q, k, v (unexpanded) and the output projection's input; nothing else
            return b * (2 * q + 2 * kv) / t
        if cp > 1 and st.cp_impl == "ulysses":
            # the kernel's q, k_r, v_r, output and LSE on a / c heads over T_p tokens (= local size;
            # k_r = the K/V heads received, replicated when c > K/V heads) + the local output again
            k_r = 2 * q / t if st.attention_expand_kv else 2 * self.ulysses_kv_heads(cp) * m.head_dim
            return b * (3 * q / t + k_r) + 4.0 * a / t
        return b * (2 * q + k_v) / t + 4.0 * a / t  # q, k, v, output; fp32 LSE

    def full_layer_bytes_per_sq_length(self) -> float:
        """Activation bytes of one non-recomputed layer per unit of sum over documents of l^2 (per
        GPU): the fp32 [heads, l, l] probabilities of the math backend, 0 for flash attention."""
        if self.setup.attention_impl == "flash":
            return 0.0
        return 4.0 * self.model.num_attention_heads / self.setup.tensor_parallel

    def full_layer_bytes(self, tokens, sum_sq_lengths=0.0, cp: int = 1):
        """Activation bytes of one non-recomputed layer holding ``tokens`` local tokens of documents
        whose squared lengths sum to ``sum_sq_lengths`` (only the math attention uses it), in a step
        with CP ``cp``."""
        return self.full_layer_bytes_per_token(cp) * np.asarray(
            tokens, dtype=np.float64
        ) + self.full_layer_bytes_per_sq_length() * np.asarray(sum_sq_lengths, dtype=np.float64)

    def checkpoint_layer_bytes_per_token(self) -> float:
        """Activation bytes one token keeps in one recomputed layer (its input)."""
        return float(self.setup.activation_bytes) * self.model.hidden_size

    def static_bytes(self) -> tuple[float, float, float]:
        """(weights, gradients, optimizer states) bytes per GPU."""
        n = self.params_local
        shard = self.dp_cp_ranks if self.setup.distributed_optimizer else 1
        return 2.0 * n, float(self.setup.grad_bytes) * n, 12.0 * n / shard

    def _sq_lengths(self, cp: int, sum_sq_lengths: float | None) -> float:
        if self.setup.attention_impl == "flash":
            return 0.0
        if cp != 1:
            raise ValueError("attention_impl='math' is modelled for cp == 1 only (the CPU reference path)")
        if sum_sq_lengths is None:
            raise ValueError(
                "attention_impl='math' keeps the [heads, l, l] probabilities of every document: "
                "pass sum_sq_lengths (sum of the pack's squared document lengths)"
            )
        return float(sum_sq_lengths)

    def memory(
        self, pack_tokens: float, cp: int, recompute_layers: int, *, sum_sq_lengths: float | None = None
    ) -> MemoryBreakdown:
        """Peak memory of one GPU running micro-batches of ``pack_tokens`` tokens with CP ``cp``.

        ``sum_sq_lengths``: sum of the squared document lengths of the pack, needed (and used) only
        with ``attention_impl="math"``."""
        L, k = self.model.num_layers, int(recompute_layers)
        if not 0 <= k <= L:
            raise ValueError(f"recompute_layers must be in [0, {L}], got {k}")
        t = self.setup.tensor_parallel
        h, V = self.model.hidden_size, self.model.vocab_size
        T = pack_tokens / cp
        full = float(self.full_layer_bytes(T, self._sq_lengths(cp, sum_sq_lengths), cp))
        ckpt = self.checkpoint_layer_bytes_per_token() * T
        act = (
            (L - k) * full
            + k * ckpt
            + (full if k > 0 else 0.0)
            + 3 * self.checkpoint_layer_bytes_per_token() * T
        )
        if self.setup.fused_loss:
            # grad_mode="in_forward": dweight + dhidden + one logits chunk, all in dtype b,
            # computed in the forward and held until the loss backward (at the activation peak)
            b = float(self.setup.activation_bytes)
            loss = b * (V * h / t + T * h + min(T, self.setup.fused_loss_chunk_tokens) * V / t)
        else:
            loss = UNFUSED_LOSS_BYTES_PER_LOGIT * T * V / t
        if cp == 1:
            cp_buf = 0.0
        elif self.setup.cp_impl == "ulysses":  # send, receive and permuted copies of q|k|v
            b = float(self.setup.activation_bytes)
            cp_buf = 3.0 * T * (self.q_dim / t + 2 * self.ulysses_kv_heads(cp) * self.model.head_dim) * b
        else:  # gathered K/V and their gradients
            cp_buf = 2.0 * pack_tokens * 2 * self.kv_dim * 2 / t
        w, g, o = self.static_bytes()
        return MemoryBreakdown(w, g, o, act, loss, cp_buf, self.setup.memory_reserve_gib * GIB)

    def min_recompute_layers(
        self,
        pack_tokens: float,
        cp: int,
        budget_bytes: float | None = None,
        *,
        sum_sq_lengths: float | None = None,
    ) -> int | None:
        """Fewest recomputed layers whose peak memory fits ``budget_bytes`` (default: the GPU);
        None when even all layers recomputed do not fit (closed form, see module docstring).
        ``sum_sq_lengths`` as in ``memory``."""
        budget = self.hardware.memory_bytes if budget_bytes is None else budget_bytes
        sq = sum_sq_lengths
        m0 = self.memory(pack_tokens, cp, 0, sum_sq_lengths=sq).total
        if m0 <= budget:
            return 0
        T = pack_tokens / cp
        full = float(self.full_layer_bytes(T, self._sq_lengths(cp, sq), cp))
        saving = full - self.checkpoint_layer_bytes_per_token() * T
        k = max(1, math.ceil((m0 + full - budget) / saving - 1e-9))
        if k > self.model.num_layers:
            return None
        # guard against floating-point rounding at the boundary
        while k > 1 and self.memory(pack_tokens, cp, k - 1, sum_sq_lengths=sq).total <= budget:
            k -= 1
        while (
            k <= self.model.num_layers and self.memory(pack_tokens, cp, k, sum_sq_lengths=sq).total > budget
        ):
            k += 1
        return k if k <= self.model.num_layers else None
