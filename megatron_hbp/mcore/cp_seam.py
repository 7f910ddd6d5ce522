"""The one place the trainer touches context parallelism (``megatron_hbp.cp``).

``resolve_cp_impl`` turns the run's ``cp_backend`` into the CP attention the trainer runs
(Ulysses by default, the all-gather as fallback) at pre-flight; ``cp_attention`` dispatches a
CP > 1 micro-batch to it; ``require_cp`` keeps a clear start-up error should the package be
missing.
"""

from __future__ import annotations


def cp_available() -> bool:
    try:
        import megatron_hbp.cp as cp  # noqa: F401
    except ImportError:
        return False
    return all(hasattr(cp, name) for name in ("build_cp_groups", "shard_for_cp", "cp_attention"))


def require_cp(degrees) -> None:
    """Raise if any degree > 1 is asked for but the CP package is missing."""
    if any(int(c) > 1 for c in degrees) and not cp_available():
        raise RuntimeError(
            f"the plan uses context-parallel degrees {sorted(set(int(c) for c in degrees))} but "
            "megatron_hbp.cp (build_cp_groups / shard_for_cp / cp_attention) is not available; "
            "re-plan with cp: 1 in every group"
        )


def build_cp_groups(degrees, *, tp: int = 1, pp: int = 1):
    from megatron_hbp.cp import build_cp_groups as _build

    return _build(list(degrees), tp=tp, pp=pp)


def shard_for_cp(tensor, cu_seqlens_padded, cp_size: int, cp_rank: int):
    from megatron_hbp.cp import shard_for_cp as _shard

    return _shard(tensor, cu_seqlens_padded, cp_size, cp_rank)


def auto_attention_backend(*, on_cuda: bool, half: bool, varlen_available: bool, te_available: bool) -> str:
    """``megatron_hbp.cp.auto_attention_backend``: the one ``auto`` attention rule, shared by the
    trainer's attention without CP (``mcore.attention.resolve_backend``) and the CP attention."""
    from megatron_hbp.cp.attention import auto_attention_backend as _auto

    return _auto(on_cuda=on_cuda, half=half, varlen_available=varlen_available, te_available=te_available)


_TE_NOTICE_SHOWN = False


def cp_backend(attention_backend: str) -> str:
    """The ``megatron_hbp.cp.cp_attention`` backend for the configured ``attention_backend``.

    ``sdpa`` / ``varlen`` pass through, ``auto`` stays ``auto`` (cp picks varlen for CUDA
    bf16/fp16, else SDPA). ``te`` maps to ``auto``: Transformer Engine's own CP path is not
    used (HBP changes the CP group per step), said once per process.
    """
    global _TE_NOTICE_SHOWN
    if attention_backend in ("auto", "sdpa", "varlen"):
        return attention_backend
    if attention_backend == "te":
        if not _TE_NOTICE_SHOWN:
            _TE_NOTICE_SHOWN = True
            print(
                "[hbp] attention_backend 'te': CP > 1 steps use megatron_hbp.cp with backend 'auto' "
                "(Transformer Engine's context parallelism is not used)",
                flush=True,
            )
        return "auto"
    raise ValueError(f"attention backend '{attention_backend}' unknown; choose auto, te, varlen or sdpa")


def resolve_cp_impl(
    requested: str,
    *,
    num_heads: int,
    num_kv_heads: int,
    tp: int,
    degrees,
    te_available: bool,
) -> tuple[str, str]:
    """The CP attention the trainer runs for ``cp_backend: requested`` (pure; testable without CUDA).

    Returns ``(impl, why)`` with ``impl`` in ``ulysses`` / ``allgather``. ``auto``: Ulysses when the
    query heads per TP rank divide by every CP degree of the plan, else all-gather (Transformer
    Engine's own CP attention is not wired into the per-step CP groups, so ``auto`` never picks it).
    An explicit choice that cannot run raises ``ValueError`` with a one-line message naming the key.
    """
    from megatron_hbp.cp.ulysses import check_ulysses_heads

    cps = sorted({int(c) for c in degrees if int(c) > 1})
    hq, hkv = num_heads // tp, num_kv_heads // tp
    bad = next(((c, err) for c in cps if (err := check_ulysses_heads(hq, hkv, c))), None)
    if requested == "te":
        raise ValueError(
            "cp_backend 'te': Transformer Engine's context-parallel attention is not available "
            + (
                "(not wired into HBP's per-step CP groups yet)"
                if te_available
                else "(transformer_engine is not installed)"
            )
            + "; use cp_backend: ulysses (or auto)"
        )
    if requested == "ulysses":
        if bad is not None:
            raise ValueError(f"cp_backend 'ulysses': {bad[1]}")
        return "ulysses", "requested"
    if requested == "allgather":
        return "allgather", "requested"
    if requested != "auto":
        raise ValueError(f"cp_backend '{requested}' unknown; choose auto, ulysses, allgather or te")
    if bad is not None:
        return "allgather", f"auto: {hq} query heads per TP rank are not divisible by cp={bad[0]}"
    return "ulysses", "auto"


def cp_attention(
    q, k, v, cu_seqlens_padded, cu_seqlens, cp_group, softmax_scale=None, *, backend="auto", cp_impl="ulysses"
):
    """``megatron_hbp.cp``'s ``ulysses_attention`` or all-gather ``cp_attention`` (``cp_impl``) with
    the trainer's ``attention_backend`` (see :func:`cp_backend`)."""
    if cp_impl == "ulysses":
        from megatron_hbp.cp import ulysses_attention as _attn
    elif cp_impl == "allgather":
        from megatron_hbp.cp import cp_attention as _attn
    else:
        raise ValueError(f"cp_impl '{cp_impl}' unknown; use ulysses or allgather")

    return _attn(
        q,
        k,
        v,
        cu_seqlens_padded,
        cu_seqlens,
        cp_group,
        softmax_scale=softmax_scale,
        backend=cp_backend(backend),
    )
