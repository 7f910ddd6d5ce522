"""The per-step checks of ``megatron_hbp.mcore.step`` (one process, no Megatron run): the step's CP
group and micro-batches must have the plan's CP degree, and Megatron's all-reduced loss
denominator must equal the plan's. Each check is made to fail with a hand-built mismatch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_hbp.mcore.step import check_denominator, check_step_cp


class _Group:
    def __init__(self, n: int):
        self.n = n

    def size(self) -> int:
        return self.n


def _batches(*cps):
    return [SimpleNamespace(cp=c) for c in cps]


def test_check_step_cp_accepts_the_plans_degree():
    check_step_cp(3, 0, None, 1, _batches(1, 1))  # CP 1: no group
    check_step_cp(4, 1, _Group(2), 2, _batches(2, 2))


@pytest.mark.parametrize(
    "group, cp, batches, said",
    [
        (_Group(4), 2, _batches(2), "CP group has 4 ranks and its micro-batches cp [2]"),
        (_Group(2), 2, _batches(2, 1), "CP group has 2 ranks and its micro-batches cp [1, 2]"),
        (None, 2, _batches(2), "CP group has 1 ranks"),
        (_Group(2), 1, _batches(1), "CP group has 2 ranks"),
    ],
)
def test_check_step_cp_names_step_rank_and_degrees(group, cp, batches, said):
    with pytest.raises(RuntimeError) as e:
        check_step_cp(7, 3, group, cp, batches)
    msg = str(e.value)
    assert msg.startswith("plan step 7, rank 3: ") and said in msg and f"work item says cp {cp}" in msg
    assert "\n" not in msg


def test_check_denominator():
    cfg = SimpleNamespace(check_loss_tokens=True, loss_normalization="step_token_mean")
    check_denominator(cfg, 0, 0, 1234.0, 1234)
    check_denominator(cfg, 0, 0, 1233.9999999, 1234)  # an all-reduced float sum of integers
    with pytest.raises(RuntimeError, match=r"^plan step 5, rank 1: Megatron's all-reduced loss denominator 1235.0 "
                       r"differs from the plan's 1234 \(step_token_mean\)"):  # fmt: skip
        check_denominator(cfg, 5, 1, 1235.0, 1234)
    off = SimpleNamespace(check_loss_tokens=False, loss_normalization="step_token_mean")
    check_denominator(off, 5, 1, 1235.0, 1234)  # check_loss_tokens: false turns it off
