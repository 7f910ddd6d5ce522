"""The one way tests launch other processes: N ranks of a function or a script, or one command.

- :func:`run_ranks` starts ``nproc`` processes (no torchrun: each gets ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and a free ``MASTER_PORT``, so
  ``init_process_group("gloo")`` / ``env://`` and the trainer's ``init_distributed`` work) running
  either a function ``fn(rank, world, *args)`` of a test module (its JSON-able return value comes
  back, one per rank) or a script ``path.py *args`` (which may write JSON to ``$HBP_TEST_RESULT``).
- :func:`run_command` runs one command line (a launcher such as ``torchrun``, a tool, a
  single-process worker) the same way.

Both: every process in its own session, output to files (no pipe can fill up and block), a hard
``timeout`` after which the *whole process group* of every rank is killed (torchrun's children and
DataLoader workers included), and on failure or timeout an ``AssertionError`` with each rank's
exit status and the tail of its stdout/stderr. When one rank fails, the others are given
``grace`` seconds, then killed (they would wait forever on a collective). Environment:
``OMP_NUM_THREADS=1``, ``PYTHONWARNINGS=ignore``, the repository root first on ``PYTHONPATH``.

Only the standard library at module level: worker processes import this file too.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT_ENV = "HBP_TEST_RESULT"
TAIL = 6000

__all__ = ["ROOT", "free_port", "launch_env", "run_ranks", "run_command"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(extra: dict | None = None) -> dict:
    """``os.environ`` plus the settings every launched test process gets, plus ``extra`` (a value
    of None removes that variable)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    for k, v in (extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(timeout=10)


def _tail(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-TAIL:].decode("utf-8", "replace")


class _Proc:
    def __init__(self, name: str, cmd: list[str], env: dict, cwd, log_dir: Path):
        self.name, self.cmd = name, cmd
        self.out, self.err = log_dir / f"{name}.out", log_dir / f"{name}.err"
        with open(self.out, "wb") as o, open(self.err, "wb") as e:
            self.p = subprocess.Popen(
                cmd, cwd=cwd, env=env, stdout=o, stderr=e, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def report(self) -> str:
        return (
            f"--- {self.name}: exit {self.p.returncode}; {' '.join(map(str, self.cmd))}\n"
            f"stdout tail:\n{_tail(self.out)}\nstderr tail:\n{_tail(self.err)}"
        )


def _wait_all(procs: list[_Proc], timeout: float, grace: float, what: str, check: bool) -> None:
    deadline = time.monotonic() + timeout
    failed_at = None
    reason = None
    try:
        while True:
            codes = [p.p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            now = time.monotonic()
            if any(c not in (None, 0) for c in codes) and failed_at is None:
                failed_at = now
            if now > deadline:
                reason = f"timed out after {timeout:g} s"
                break
            if failed_at is not None and now > failed_at + grace:
                reason = "a rank failed"
                break
            time.sleep(0.05)
    finally:
        for p in procs:  # also after a clean exit: children (torchrun ranks, data workers) may outlive it
            _kill_group(p.p)
    if reason is not None:
        raise AssertionError(
            f"{what}: {reason}; killed every process group\n" + "\n".join(p.report() for p in procs)
        )
    if check and any(p.p.returncode != 0 for p in procs):
        raise AssertionError(f"{what} failed\n" + "\n".join(p.report() for p in procs))


def run_command(
    cmd: list, *, timeout: float, env: dict | None = None, cwd=ROOT, check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``cmd`` (one process group) to completion; return its exit status and output.
    ``check``: a non-zero exit raises (with the output tails). A timeout always raises."""
    cmd = [str(c) for c in cmd]
    with tempfile.TemporaryDirectory(prefix="hbp-run-") as tmp:
        p = _Proc("command", cmd, launch_env(env), cwd, Path(tmp))
        _wait_all([p], timeout, 0.0, " ".join(cmd), check)
        return subprocess.CompletedProcess(
            cmd, p.p.returncode, p.out.read_text("utf-8", "replace"), p.err.read_text("utf-8", "replace")
        )


def run_ranks(
    nproc: int,
    target,
    args: tuple | list = (),
    *,
    timeout: float,
    env: dict | None = None,
    cwd=ROOT,
    grace: float = 30.0,
) -> list:
    """Run ``nproc`` ranks of ``target`` and return each rank's result, in rank order.

    ``target``: a module-level function ``fn(rank, world, *args)`` (its return value, JSON-able,
    is the rank's result), or the path of a script run as ``python script *args`` (its result is
    the JSON it wrote to ``$HBP_TEST_RESULT``, else None). Any rank exiting non-zero, or the
    timeout, kills every rank and raises ``AssertionError`` with each rank's output tail."""
    args = [a if isinstance(a, (int, float, bool, type(None))) else str(a) for a in args]
    port = str(free_port())
    with tempfile.TemporaryDirectory(prefix="hbp-ranks-") as tmp:
        tmp = Path(tmp)
        if callable(target):
            mod_file = inspect.getfile(target)
            spec = json.dumps([mod_file, target.__module__, target.__qualname__, args])
            cmd = [sys.executable, __file__, "--call", spec]
            what = f"{target.__module__}.{target.__qualname__} on {nproc} ranks"
        else:
            cmd = [sys.executable, str(target), *map(str, args)]
            what = f"{target} on {nproc} ranks"
        procs = []
        try:
            for r in range(nproc):
                rank_env = {
                    "RANK": str(r),
                    "WORLD_SIZE": str(nproc),
                    "LOCAL_RANK": str(r),
                    "LOCAL_WORLD_SIZE": str(nproc),
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port,
                    RESULT_ENV: str(tmp / f"result{r}.json"),
                    **(env or {}),
                }
                procs.append(_Proc(f"rank{r}", cmd, launch_env(rank_env), cwd, tmp))
        except BaseException:
            for p in procs:
                _kill_group(p.p)
            raise
        _wait_all(procs, timeout, grace, what, check=True)
        out = []
        for r in range(nproc):
            f = tmp / f"result{r}.json"
            out.append(json.loads(f.read_text()) if f.exists() else None)
        return out


def write_result(result) -> None:
    """In a rank launched by :func:`run_ranks` (script target): hand ``result`` back (JSON)."""
    path = os.environ.get(RESULT_ENV)
    if path:
        Path(path).write_text(json.dumps(result))


def _call(spec: str) -> None:
    mod_file, mod_name, qualname, args = json.loads(spec)
    # Import the module under the name pytest gave it (its folder first on sys.path, as pytest's
    # default "prepend" import mode does), or as a package module from the repository root.
    sys.path[:0] = [str(ROOT), str(Path(mod_file).parent)]
    mod = importlib.import_module(mod_name)
    fn = mod
    for part in qualname.split("."):
        fn = getattr(fn, part)
    result = fn(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), *args)
    write_result(result)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--call":
    _call(sys.argv[2])
