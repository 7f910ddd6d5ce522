"""Each rank's share of every step, computed once from the plan (pure NumPy, no torch).

This module is the one place that turns the plan's arrays into what the consumers downstream
need: the cost model and the simulator, the plan metrics, the trainer (Megatron's token
denominator check, the memory pre-flight, the logged attention pairs and CP bytes) and the data
path (each rank's packs and padded document lengths). Nothing else recounts these quantities.

Layout (``S`` steps, ``P`` packs, ``M`` placed documents, ``E = Σ_p cp_p`` (pack, CP rank) entries):

- per step ``[S]``: ``step_cp``, ``step_recompute_layers``, ``step_micro_batches``,
  ``step_tokens`` (real), ``step_loss_tokens``; ``step_pack_offsets [S+1]``.
- per pack ``[P]``: ``pack_step``, ``pack_replica`` (replica index inside the step: world ranks
  ``[replica·cp, (replica+1)·cp)``), ``pack_micro_batch``, ``pack_cp``, ``pack_tokens`` (real),
  ``pack_padded_tokens`` (Σ padded lengths: the THD stream of the whole CP group),
  ``pack_loss_tokens``, ``pack_sum_sq`` (Σ l² of the real lengths), ``pack_pairs`` (causal
  (q, k) pairs of the whole pack, Σ l(l+1)/2).
- per document ``[M]``: ``padded_lengths`` (each real length rounded up to a multiple of
  ``2·cp`` of its step, ``== lengths`` at CP 1).
- per (pack, CP rank) entry ``[E]``, pack ``p`` owning ``entry_offsets[p]:entry_offsets[p+1]``:
  ``entry_rank`` (world rank in the step, ``replica·cp + cp_rank``), ``entry_cp_rank``,
  ``entry_zigzag_pairs`` (pairs whose query lies on that rank under the zigzag split).

The attention pairs a rank computes depend on the CP attention (:meth:`Workload.entry_pairs`):
the all-gather scheme runs the zigzag shard's queries (``entry_zigzag_pairs``), Ulysses runs whole
documents on ``H / c`` heads, i.e. exactly ``pack_pairs / c`` in units of all heads. The bytes a
rank sends for CP attention depend on the model too: :func:`cp_comm_bytes` is the one formula
(``megatron_hbp.cp.cp_comm_bytes`` / ``ulysses_comm_bytes`` are its scalar, validating wrappers).

Stored or derived? Derived, once per ``Plan`` (``Plan.workload``, cached on first use): every
field is a pure, deterministic function of arrays the plan file already holds plus the group
config, and deriving it takes well under a second for a 1M-sample plan (0.12 s wall, 0.06 s CPU,
78,892 packs, 32 ranks; ``tests/planner/test_planner_workload.py``), so storing it would only duplicate data that could go stale
and force a new plan format version; every plan file written so far stays loadable unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_hbp.planner.packing import cp_padded

__all__ = [
    "CP_IMPLS",
    "Workload",
    "cp_comm_bytes",
    "derive_workload",
    "pack_sums",
    "step_denominators",
    "zigzag_attention_pairs",
    "zigzag_doc_pairs",
]

CP_IMPLS = ("allgather", "ulysses")
"""CP attention schemes whose per-rank work the workload knows (``ring`` counts like allgather)."""


# ------------------------------------------------------------------------------ zigzag pairs


def _tri(n: np.ndarray) -> np.ndarray:
    return n * (n + 1) // 2


def zigzag_doc_pairs(doc_lengths: np.ndarray, cp: int) -> np.ndarray:
    """Causal pairs of each document per CP rank under the zigzag split: int64 ``[n, cp]``.

    Entry ``[i, r]`` = pairs ``0 <= k <= q < l`` of document ``i`` (real length ``l``) whose query
    ``q`` lies on rank ``r``: the document is padded to ``L = ceil(l / 2cp) · 2cp``, cut into
    ``2cp`` chunks of ``s = L / 2cp`` positions, rank ``r`` holds chunks ``r`` and ``2cp-1-r``;
    padding queries count nothing. Chunk ``j`` covers queries ``[j·s, min((j+1)·s, l))``, query
    ``q`` has ``q+1`` pairs, so a chunk counts ``T(b) - T(a)`` with ``T(n) = n(n+1)/2``. Rows sum
    to ``l(l+1)/2``. (``megatron_hbp.kernels.attention_cost`` is the torch/Triton twin.)
    """
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    cp = int(cp)
    if cp < 1:
        raise ValueError(f"cp must be >= 1, got {cp}")
    nch = 2 * cp
    s = -(-lengths // nch)
    j = np.arange(nch, dtype=np.int64)
    a = np.minimum(s[:, None] * j[None, :], lengths[:, None])
    b = np.minimum(a + s[:, None], lengths[:, None])
    chunk = _tri(b) - _tri(a)  # [n, 2cp]
    return chunk[:, :cp] + chunk[:, ::-1][:, :cp]


def zigzag_attention_pairs(doc_lengths: np.ndarray, pack_offsets: np.ndarray, cp: int) -> np.ndarray:
    """Causal (q, k) pairs per pack and CP rank under the zigzag split: int64 ``[num_packs, cp]``.

    ``doc_lengths``: ``[n]`` integers >= 0; ``pack_offsets``: ``[num_packs + 1]`` non-decreasing
    within ``[0, n]``, pack ``p`` holds documents ``pack_offsets[p]:pack_offsets[p+1]`` (empty
    packs allowed; documents outside ``[pack_offsets[0], pack_offsets[-1])`` belong to no pack,
    as in the kernel's ``attention_cost``). Exact while a pack's pairs stay below 2**53 (packs
    < ~1e8 tokens).
    """
    lengths = np.asarray(doc_lengths)
    offsets = np.asarray(pack_offsets)
    if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(
            f"doc_lengths must be a 1-D integer array, got shape {lengths.shape} dtype {lengths.dtype}"
        )
    if offsets.ndim != 1 or offsets.size < 1 or not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError("pack_offsets must be a 1-D integer array [num_packs + 1]")
    if int(cp) < 1:
        raise ValueError(f"cp must be >= 1, got {cp}")
    if lengths.size and lengths.min() < 0:
        raise ValueError(f"doc_lengths must be >= 0 (found {int(lengths.min())})")
    if offsets[0] < 0 or offsets[-1] > lengths.size or np.any(np.diff(offsets) < 0):
        raise ValueError(
            f"pack_offsets must be non-decreasing within [0, len(doc_lengths)={lengths.size}]; "
            f"got first={int(offsets[0])}, last={int(offsets[-1])}"
        )
    P, cp = offsets.size - 1, int(cp)
    out = np.zeros((P, cp), dtype=np.int64)
    if P == 0 or offsets[-1] == offsets[0]:
        return out
    doc = zigzag_doc_pairs(lengths[offsets[0] : offsets[-1]], cp)
    pack_of = np.repeat(np.arange(P), np.diff(offsets.astype(np.int64)))
    for r in range(cp):
        out[:, r] = np.bincount(pack_of, weights=doc[:, r], minlength=P).astype(np.int64)
    return out


# ------------------------------------------------------------------------------ per-pack sums


def pack_sums(
    lengths: np.ndarray, loss_tokens: np.ndarray | None, pack_of: np.ndarray, num_packs: int, cp
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(padded tokens, Σ l², loss tokens)`` per pack, each int64 ``[num_packs]``.

    ``lengths`` / ``loss_tokens``: per document; ``pack_of``: pack of each document; ``cp``: one
    CP degree or one per document (padding to a multiple of ``2·cp``). The planner's packer (before
    the packs have steps) and :func:`derive_workload` (after) both call this one function.
    """
    lengths = np.asarray(lengths)
    padded = _padded(lengths, cp)
    sl = lengths.astype(np.float64)
    pad = np.bincount(pack_of, weights=padded, minlength=num_packs).astype(np.int64)
    sq = np.bincount(pack_of, weights=sl * sl, minlength=num_packs).astype(np.int64)
    if loss_tokens is None:
        loss = np.zeros(num_packs, dtype=np.int64)
    else:
        loss = np.bincount(pack_of, weights=loss_tokens, minlength=num_packs).astype(np.int64)
    return pad, sq, loss


def _padded(lengths: np.ndarray, cp) -> np.ndarray:
    """Lengths rounded up to a multiple of ``2·cp`` (``packing.cp_padded``, the one rule), with one
    CP degree or one per document."""
    if np.ndim(cp) == 0:
        return cp_padded(lengths, int(cp))
    cp = np.asarray(cp)
    out = lengths.copy()
    for c in np.unique(cp):
        if c > 1:
            sel = cp == c
            out[sel] = cp_padded(lengths[sel], int(c))
    return out


# ------------------------------------------------------------------------------ the workload


@dataclass(frozen=True)
class Workload:
    """Every rank's share of every step of a plan (module docstring: the layout)."""

    world_size: int
    step_cp: np.ndarray
    step_recompute_layers: np.ndarray
    step_micro_batches: np.ndarray
    step_pack_offsets: np.ndarray
    step_tokens: np.ndarray
    step_loss_tokens: np.ndarray
    pack_step: np.ndarray
    pack_replica: np.ndarray
    pack_micro_batch: np.ndarray
    pack_cp: np.ndarray
    pack_tokens: np.ndarray
    pack_padded_tokens: np.ndarray
    pack_loss_tokens: np.ndarray
    pack_sum_sq: np.ndarray
    pack_pairs: np.ndarray
    padded_lengths: np.ndarray
    entry_offsets: np.ndarray
    entry_rank: np.ndarray
    entry_cp_rank: np.ndarray
    entry_zigzag_pairs: np.ndarray

    @property
    def num_steps(self) -> int:
        return len(self.step_cp)

    @property
    def num_packs(self) -> int:
        return len(self.pack_cp)

    def entry_pairs(self, cp_impl: str = "allgather") -> np.ndarray:
        """float64 ``[E]``: causal pairs each (pack, CP rank) computes, in units of all heads:
        the zigzag shard's for ``allgather`` (and every CP 1 pack), ``pack_pairs / cp`` for
        ``ulysses`` (whole documents on ``H / c`` heads)."""
        if cp_impl not in CP_IMPLS:
            raise ValueError(f"cp_impl '{cp_impl}' unknown; choose {' or '.join(CP_IMPLS)}")
        out = self.entry_zigzag_pairs.astype(np.float64)
        if cp_impl == "ulysses":
            cp = np.repeat(self.pack_cp, self.pack_cp)
            pack = np.repeat(np.arange(self.num_packs), self.pack_cp)
            uly = cp > 1
            out[uly] = self.pack_pairs[pack[uly]] / cp[uly]
        return out

    def rank_packs(self, step: int, dp_rank: int, dp_size: int | None = None) -> np.ndarray:
        """Pack ids that launch rank ``dp_rank`` (its place in data x context) runs in ``step``,
        in order, and its CP rank is ``dp_rank % cp``.

        ``dp_size`` (default: the plan's world size) smaller than the plan's: the step's replicas
        are dealt round-robin over the ``dp_size / cp`` replica slots of the launch, so the rank
        runs replicas ``dp_rank // cp + j · dp_size / cp`` one after another (gradient
        accumulation of the missing replicas).
        """
        dp_size = self.world_size if dp_size is None else int(dp_size)
        cp = int(self.step_cp[step])
        m = int(self.step_micro_batches[step])
        k = self.world_size // dp_size
        p0 = int(self.step_pack_offsets[step])
        reps = dp_rank // cp + np.arange(k) * (dp_size // cp)
        return (p0 + reps[:, None] * m + np.arange(m)[None, :]).reshape(-1)

    def rank_values(self, entry_values: np.ndarray, step: int, dp_size: int | None = None) -> np.ndarray:
        """float64 ``[dp_size]``: ``entry_values`` summed over each launch rank's micro-batches of
        ``step`` (``rank_packs`` order)."""
        dp_size = self.world_size if dp_size is None else int(dp_size)
        cp = int(self.step_cp[step])
        vals = np.asarray(entry_values, dtype=np.float64)
        out = np.zeros(dp_size)
        for d in range(dp_size):
            e = self.entry_offsets[self.rank_packs(step, d, dp_size)] + d % cp
            for x in vals[e]:  # in micro-batch order, as the ranks add them
                out[d] += x
        return out

    def group_max_sum_sq(self, step_group: np.ndarray, num_groups: int) -> np.ndarray:
        """float64 ``[G]``: per plan group, the largest Σ l² of one pack (what the math attention
        backend keeps per layer is proportional to it)."""
        out = np.zeros(num_groups)
        pack_group = np.asarray(step_group, dtype=np.int64)[self.pack_step]
        np.maximum.at(out, pack_group, self.pack_sum_sq.astype(np.float64))
        return out


def derive_workload(arrays: dict, group_cp, group_recompute, world_size: int) -> Workload:
    """The :class:`Workload` of a plan's arrays (``megatron_hbp.planner.plan`` layout) with the
    groups' CP degrees and recompute layers; vectorised (one pass per CP degree)."""
    group_cp = np.asarray(group_cp, dtype=np.int64)
    group_recompute = np.asarray(group_recompute, dtype=np.int64)
    lengths = np.asarray(arrays["lengths"])
    poff = np.asarray(arrays["pack_offsets"], dtype=np.int64)
    spo = np.asarray(arrays["step_pack_offsets"], dtype=np.int64)
    sg = np.asarray(arrays["step_group"], dtype=np.int64)
    smb = np.asarray(arrays["step_micro_batches"], dtype=np.int64)
    S, P = len(sg), len(poff) - 1
    step_cp = group_cp[sg]
    pack_step = np.repeat(np.arange(S, dtype=np.int64), np.diff(spo))
    if len(pack_step) != P:
        raise ValueError(
            f"plan arrays disagree: step_pack_offsets covers {len(pack_step)} packs, pack_offsets {P}"
        )
    pack_cp = step_cp[pack_step]
    local = np.arange(P, dtype=np.int64) - spo[:-1][pack_step]
    pack_replica = local // smb[pack_step]
    pack_micro_batch = local % smb[pack_step]
    docs = lengths[poff[0] : poff[-1]]
    doc_pack = np.repeat(np.arange(P, dtype=np.int64), np.diff(poff))
    doc_cp = pack_cp[doc_pack]
    padded_lengths = _padded(docs, doc_cp)
    pad, sq, _ = pack_sums(docs, None, doc_pack, P, doc_cp)
    d64 = docs.astype(np.int64)
    pack_tokens = np.bincount(doc_pack, weights=d64, minlength=P).astype(np.int64)
    pack_pairs = np.bincount(doc_pack, weights=_tri(d64), minlength=P).astype(np.int64)
    entry_offsets = np.zeros(P + 1, dtype=np.int64)
    np.cumsum(pack_cp, out=entry_offsets[1:])
    E = int(entry_offsets[-1])
    entry_pack = np.repeat(np.arange(P, dtype=np.int64), pack_cp)
    entry_cp_rank = np.arange(E, dtype=np.int64) - entry_offsets[:-1][entry_pack]
    entry_rank = pack_replica[entry_pack] * pack_cp[entry_pack] + entry_cp_rank
    zig = np.zeros(E, dtype=np.int64)
    for c in np.unique(pack_cp):
        c = int(c)
        sel = np.nonzero(pack_cp == c)[0]
        if c == 1:
            zig[entry_offsets[sel]] = pack_pairs[sel]
            continue
        dsel = np.nonzero(doc_cp == c)[0]
        doc = zigzag_doc_pairs(d64[dsel], c)
        # packs of this degree, renumbered 0..len(sel)-1 in order
        rank_of = np.searchsorted(sel, doc_pack[dsel])
        per = np.zeros((len(sel), c), dtype=np.int64)
        for r in range(c):
            per[:, r] = np.bincount(rank_of, weights=doc[:, r], minlength=len(sel)).astype(np.int64)
        zig[(entry_offsets[sel][:, None] + np.arange(c)[None, :]).reshape(-1)] = per.reshape(-1)
    return Workload(
        world_size=int(world_size),
        step_cp=step_cp,
        step_recompute_layers=group_recompute[sg],
        step_micro_batches=smb,
        step_pack_offsets=spo,
        step_tokens=_segment_sums(pack_tokens, spo),
        step_loss_tokens=np.asarray(arrays["step_loss_tokens"], dtype=np.int64),
        pack_step=pack_step,
        pack_replica=pack_replica,
        pack_micro_batch=pack_micro_batch,
        pack_cp=pack_cp,
        pack_tokens=pack_tokens,
        pack_padded_tokens=pad,
        pack_loss_tokens=np.asarray(arrays["pack_loss_tokens"], dtype=np.int64),
        pack_sum_sq=sq,
        pack_pairs=pack_pairs,
        padded_lengths=padded_lengths.astype(np.int32),
        entry_offsets=entry_offsets,
        entry_rank=entry_rank,
        entry_cp_rank=entry_cp_rank,
        entry_zigzag_pairs=zig,
    )


def _segment_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    csum = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(values, out=csum[1:])
    return csum[offsets[1:]] - csum[offsets[:-1]]


def step_denominators(
    plan_arrays: dict,
    workload: Workload,
    loss_normalization: str,
    sample_loss_tokens: np.ndarray | None = None,
) -> np.ndarray:
    """int64 ``[S]``: the loss denominator Megatron all-reduces for each step
    (``megatron_hbp.mcore.batch``'s contract): the step's loss tokens (``step_token_mean``), its
    micro-batches with loss tokens (``micro_batch_mean``), or its samples with loss tokens
    (``sample_mean``: needs ``sample_loss_tokens``, the sample info's per-sample counts)."""
    if loss_normalization == "step_token_mean":
        return workload.step_loss_tokens.copy()
    spo = workload.step_pack_offsets
    if loss_normalization == "micro_batch_mean":
        return _segment_sums((workload.pack_loss_tokens > 0).astype(np.int64), spo)
    if loss_normalization == "sample_mean":
        if sample_loss_tokens is None:
            raise ValueError("step_denominators: sample_mean needs sample_loss_tokens (the sample info's)")
        poff = np.asarray(plan_arrays["pack_offsets"], dtype=np.int64)
        has = (np.asarray(sample_loss_tokens)[plan_arrays["samples"]] > 0).astype(np.int64)
        docs = np.zeros(len(has) + 1, dtype=np.int64)
        np.cumsum(has, out=docs[1:])
        per_pack = docs[poff[1:]] - docs[poff[:-1]]
        return _segment_sums(per_pack, spo)
    raise ValueError(
        f"loss_normalization '{loss_normalization}' unknown; choose step_token_mean, micro_batch_mean or sample_mean"
    )


# ------------------------------------------------------------------------------ CP bytes


def cp_comm_bytes(
    padded_tokens,
    cp: int,
    *,
    cp_impl: str,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    num_layers: int = 1,
    recompute_layers: int = 0,
    dtype_bytes: int = 2,
    backward: bool = True,
) -> np.ndarray:
    """int64 bytes one rank sends for CP attention on micro-batches of ``padded_tokens`` (whole
    pack, all CP ranks; array-like, each a multiple of ``cp``); 0 at CP 1. Heads are per TP rank.

    ``allgather`` (``megatron_hbp.cp.cp_attention``): forward all-gathers K and V of the group,
    backward all-gathers them again (the forward keeps only the local shard) and reduce-scatters
    dK/dV; with ring collectives every rank sends ``c-1`` blocks of its local K+V per collective,
    ``block = 2 · (T/c) · h_kv · d · bytes`` and ``(L + k + 2L) · (c-1) · block`` per micro-batch.
    ``ulysses`` (``megatron_hbp.cp.ulysses``): per layer and forward, q|k|v to head shards
    (``T/c · (H + 2 m c) d`` elements, ``(c-1)/c`` of it leaves the rank; ``m`` = K/V heads per rank,
    ``megatron_hbp.headlayout.kv_heads_per_rank``) and the output back (``T/c · H d``); backward the
    same again; a recomputed layer repeats its forward. ``recompute_layers`` above ``num_layers``
    counts as all of them.
    """
    tokens = np.asarray(padded_tokens, dtype=np.int64)
    cp = int(cp)
    if cp == 1:
        return np.zeros_like(tokens)
    if cp_impl not in CP_IMPLS:
        raise ValueError(f"cp_impl '{cp_impl}' unknown; choose {' or '.join(CP_IMPLS)}")
    if np.any(tokens % cp):
        bad = int(tokens[tokens % cp != 0].reshape(-1)[0])
        raise ValueError(f"num_tokens {bad} is not divisible by cp_size {cp}")
    local = tokens // cp
    k = min(int(recompute_layers), int(num_layers))
    if cp_impl == "allgather":
        block = 2 * local * num_kv_heads * head_dim * dtype_bytes
        passes = num_layers + k + (2 * num_layers if backward else 0)
        return (cp - 1) * block * passes
    from megatron_hbp.headlayout import kv_heads_per_rank

    m = len(kv_heads_per_rank(num_heads, num_kv_heads, cp)[0])
    fwd = (num_heads + 2 * m * cp + num_heads) * head_dim * local * (cp - 1) // cp
    passes = (num_layers + k) * fwd
    if backward:
        passes = passes + num_layers * fwd
    return passes * dtype_bytes
