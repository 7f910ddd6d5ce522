"""Pre-emption: on SIGTERM or SIGUSR1 finish the current step, save, exit with ``EXIT_PREEMPTED``.

Slurm sends SIGTERM when it cancels or pre-empts a job, and ``#SBATCH --signal=USR1@<seconds>``
sends SIGUSR1 that long before the time limit. The handler only records the signal; the training
loop asks :meth:`PreemptionWatcher.requested` at every step boundary, which all-reduces the flag
so that every rank stops after the same step even when the signal reached them at different
times (or only one of them). The trainer then saves a checkpoint (``checkpoint.dir``) and raises
:class:`Preempted`; ``main`` exits with :data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL``: try again),
which a batch script can turn into a requeue (docs/training.md).
"""

from __future__ import annotations

import os
import signal

import torch

EXIT_PREEMPTED = 75
SIGNALS = ("SIGTERM", "SIGUSR1")


class Preempted(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Training stopped on a pre-emption signal after ``steps_done`` plan steps."""

    def __init__(self, steps_done: int, checkpoint, signame: str):
        self.steps_done, self.checkpoint, self.signame = steps_done, checkpoint, signame
        where = f"saved {checkpoint}" if checkpoint else "nothing saved (checkpoint.dir is not set)"
        super().__init__(f"pre-empted by {signame} after plan step {steps_done - 1}: {where}")

    def __reduce__(self):  # picklable across process boundaries, like every error of the package
        return (type(self), (self.steps_done, self.checkpoint, self.signame))


class PreemptionWatcher:
    """Records SIGTERM / SIGUSR1 while installed (main thread only; elsewhere it never fires)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    def install(self) -> PreemptionWatcher:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self
        for name in SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked child (data-loader worker): the default action
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.signum is None:
            print(
                f"[hbp] received {signal.Signals(signum).name}: finishing this step, then saving and exiting",
                flush=True,
            )
        self.signum = signum

    def requested(self, device=None) -> bool:
        """Whether any rank received a signal (a collective when distributed: call on every rank)."""
        flag = 0 if self.signum is None else int(self.signum)
        if torch.distributed.is_initialized():
            t = torch.tensor([flag], dtype=torch.int64, device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = int(t.item())
        if flag and self.signum is None:
            self.signum = flag
        return bool(flag)

    @property
    def signame(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def close(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()
