"""tests/distributed.py, the one launcher of multi-process tests: results come back per rank; a
failing rank or a timeout kills every rank's whole process group (no hang) and reports each
rank's output tail."""

import os
import sys
import time

import pytest

from tests.distributed import run_command, run_ranks


def _echo(rank: int, world: int, word: str) -> dict:
    return {"rank": rank, "world": world, "word": word, "env_rank": os.environ["RANK"]}


def _allreduce(rank: int, world: int) -> int:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    t = torch.tensor([rank + 1])
    dist.all_reduce(t)
    dist.destroy_process_group()
    return int(t.item())


def _one_fails(rank: int, world: int) -> None:
    if rank == 1:
        print("rank 1 says goodbye", file=sys.stderr, flush=True)
        raise ValueError("rank 1 broke")
    time.sleep(600)  # would wait forever for rank 1 (like a collective)


def test_results_in_rank_order():
    got = run_ranks(3, _echo, ("hi",), timeout=120)
    assert got == [{"rank": r, "world": 3, "word": "hi", "env_rank": str(r)} for r in range(3)]


@pytest.mark.slow
def test_gloo_collective():
    assert run_ranks(2, _allreduce, timeout=300) == [3, 3]


def test_a_failing_rank_kills_the_others_and_reports():
    t0 = time.monotonic()
    with pytest.raises(AssertionError) as e:
        run_ranks(2, _one_fails, timeout=300, grace=2)
    msg = str(e.value)
    assert time.monotonic() - t0 < 120  # not the 600 s sleep of rank 0
    assert "a rank failed" in msg and "rank 1 says goodbye" in msg and "ValueError: rank 1 broke" in msg
    assert "rank0: exit -9" in msg and "rank1: exit 1" in msg


def test_timeout_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(600)\n"
    )
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match=r"timed out after 5 s") as e:
        run_command([sys.executable, "-c", code], timeout=5)
    assert time.monotonic() - t0 < 60 and "started" in str(e.value)
    child = int(pid_file.read_text())
    for _ in range(100):  # the grandchild is gone too (killed with the group, reaped by init)
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{child}/stat") as f:  # a zombie waiting for init counts as gone
            if f.read().split(") ")[1].startswith("Z"):
                break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {child} survived the timeout")


def test_run_command_check():
    r = run_command([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], timeout=60, check=False)
    assert (r.returncode, r.stdout) == (3, "out\n")
    with pytest.raises(AssertionError, match="exit 3"):
        run_command([sys.executable, "-c", "import sys; sys.exit(3)"], timeout=60)
