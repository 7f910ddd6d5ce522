"""Checkpoints a user can trust (issue 15), one process, no training: weights-only loading (a crafted
pickle is refused by the trainer's load and by the converter, and nothing in it runs), atomic step
folders with a checksum manifest, skipping unfinished / corrupt saves, keep_last, kill -9 mid-save.

The toy model here is a plain torch module, so these save in the ``per_rank`` format; the folder
protocol (manifest, rename, latest, skip) is the same code for torch_dist. The torch_dist folder's
own pickles (DCP ``.metadata`` and its objects) are checked here on folders written by
``torch.distributed.checkpoint`` in one process; tests/mcore/test_checkpoint_resume_dist.py trains, saves
and crafts real Megatron torch_dist checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_hbp.checkpoint_files import CheckpointCorruptError, UnsafeCheckpointError
from megatron_hbp.mcore import checkpoint as ckpt
from megatron_hbp.model_config import load_model_config
from tests.distributed import run_command

ROOT = Path(__file__).resolve().parents[2]


def _meta() -> dict:
    from megatron_hbp.configio import to_dict

    return {"plan_hash": "p", "model": to_dict(load_model_config("tiny")), "tp": 1, "pp": 1, "world_size": 1}


def _toy(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def _save(d: Path, n: int, **kw) -> Path:
    kw.setdefault("fmt", "per_rank")
    model, opt, sched = _toy(n)
    return ckpt.save_checkpoint(d, n, rank=0, model=model, optimizer=opt, scheduler=sched, meta=_meta(), **kw)


def _load(path):
    model, opt, sched = _toy(99)
    n = ckpt.load_checkpoint(path, rank=0, model=model, optimizer=opt, scheduler=sched, current_meta=_meta())
    return n, model


def test_save_is_a_renamed_folder_with_sizes_and_checksums_and_resumes_rng(tmp_path):
    d = tmp_path / "ck"
    out = _save(d, 2)
    # the RNG streams right after the save
    want = (torch.rand(3), random.random(), np.random.rand())  # noqa: NPY002
    assert out == d / "step_2" and (d / "latest").read_text() == "step_2\n"
    assert sorted(p.name for p in d.iterdir()) == ["latest", "step_2"]  # no .tmp left
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["steps_done"] == 2 and manifest["meta"]["plan_hash"] == "p"
    assert sorted(manifest["files"]) == ["meta.json", "rank_00000.pt"]
    for name, entry in manifest["files"].items():
        data = (out / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    torch.rand(5), random.random(), np.random.rand()  # noqa: NPY002 - move every stream on
    n, model = _load(d)
    assert n == 2
    ref, _, _ = _toy(2)
    assert torch.equal(model.weight, ref.weight) and torch.equal(model.bias, ref.bias)
    got = (torch.rand(3), random.random(), np.random.rand())  # noqa: NPY002
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]


def _evil_checkpoint(d: Path, marker: Path) -> Path:
    """A real step folder whose rank file is replaced by a pickle that creates ``marker`` when
    unpickled, the manifest updated to match (whoever crafts the file controls the folder)."""

    class Evil:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    step = _save(d, 3)
    f = step / "rank_00000.pt"
    torch.save({"steps_done": 3, "model": {"weight": Evil()}, "optimizer": {}, "scheduler": {}, "rng": {}}, f)
    manifest = json.loads((step / "manifest.json").read_text())
    data = f.read_bytes()
    manifest["files"]["rank_00000.pt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step / "manifest.json").write_text(json.dumps(manifest))
    return step


def test_crafted_pickle_is_refused_by_load_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    step = _evil_checkpoint(tmp_path / "ck", marker)
    with pytest.raises(UnsafeCheckpointError) as e:
        _load(tmp_path / "ck")
    msg = str(e.value)
    assert "\n" not in msg and str(step / "rank_00000.pt") in msg and "makedirs" in msg, msg
    assert "refused to load" in msg
    assert not marker.exists()
    # control: the same file really runs code when unpickled the unsafe way
    torch.load(step / "rank_00000.pt", weights_only=False)
    assert marker.is_dir()


def test_crafted_pickle_is_refused_by_the_converter_cli(tmp_path, capsys):
    marker = tmp_path / "pwned"
    _evil_checkpoint(tmp_path / "ck", marker)
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import convert_checkpoint as cli
    finally:
        sys.path.pop(0)
    rc = cli.main(["megatron-to-hf", "--checkpoint", str(tmp_path / "ck"), "--output", str(tmp_path / "hf"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "refused to load" in err, err
    assert "rank_00000.pt" in err and "makedirs" in err
    assert not marker.exists()


def test_unfinished_and_corrupt_step_folders_are_skipped_with_a_warning(tmp_path, capsys):
    d = tmp_path / "ck"
    _save(d, 2)
    _save(d, 4)
    _save(d, 6)
    (d / "step_8.tmp").mkdir()  # a save that died before its rename
    (d / "step_8.tmp" / "rank_00000.pt").write_bytes(b"half")
    # step 6: one byte flipped, same size; step 4: truncated
    f6 = d / "step_6" / "rank_00000.pt"
    data = bytearray(f6.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f6.write_bytes(bytes(data))
    f4 = d / "step_4" / "rank_00000.pt"
    f4.write_bytes(f4.read_bytes()[:-10])
    capsys.readouterr()
    n, model = _load(d)
    assert n == 2
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"[hbp] warning: skipping checkpoint {d / 'step_8.tmp'}: an unfinished save (the folder was never renamed)",
        f"[hbp] warning: skipping checkpoint {f6}: sha256 differs from manifest.json (the file is corrupt)",
        f"[hbp] warning: skipping checkpoint {f4}: {f4.stat().st_size} bytes, manifest.json says "
        f"{f4.stat().st_size + 10} (truncated?)",
    ]
    assert torch.equal(model.weight, _toy(2)[0].weight)
    # a step folder named explicitly is used as given: its bad file is an error
    with pytest.raises(CheckpointCorruptError, match=r"step_6/rank_00000.pt: sha256 differs"):
        _load(d / "step_6")
    # nothing usable at all
    for n in (2,):
        (d / f"step_{n}" / "manifest.json").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"no complete checkpoint in .* \(skipped: step_8.tmp, step_6, step_4, step_2\)",
    ):
        _load(d)


def test_legacy_folder_without_manifest_is_named(tmp_path):
    step = tmp_path / "step_5"
    step.mkdir()
    (step / "meta.json").write_text("{}")
    with pytest.raises(
        CheckpointCorruptError, match="no manifest.json, the save did not finish .*before checkpoint format 2"
    ):
        _load(step)


def test_keep_last_and_resave(tmp_path):
    d = tmp_path / "ck"
    for n in (1, 2, 3, 4):
        _save(d, n, keep_last=2)
    assert sorted(p.name for p in d.iterdir()) == ["latest", "step_3", "step_4"]
    _save(d, 4, keep_last=2)  # saving the same step again replaces it
    assert sorted(p.name for p in d.iterdir()) == ["latest", "step_3", "step_4"]
    assert _load(d)[0] == 4


def test_bad_keep_last_is_a_config_error():
    from megatron_hbp.configio import ConfigError
    from megatron_hbp.mcore.config import CheckpointConfig

    with pytest.raises(ConfigError, match="checkpoint.keep_last must be >= 0"):
        CheckpointConfig(keep_last=-1)


def test_kill_9_in_the_middle_of_a_save(tmp_path):
    """A real SIGKILL after the rank file is written and before the manifest / rename."""
    d = tmp_path / "ck"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT / "tests" / "mcore")!r})
        from pathlib import Path
        import test_checkpoint_safety as t
        from megatron_hbp.mcore import checkpoint as ckpt
        d = Path({str(d)!r})
        t._save(d, 1)
        ckpt.commit_step = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        t._save(d, 2)
        """
    )
    p = run_command([sys.executable, "-c", script], timeout=300, check=False)
    assert p.returncode == -9, p.stderr[-2000:]
    assert (d / "step_2.tmp" / "rank_00000.pt").is_file() and not (d / "step_2").exists()
    assert (d / "latest").read_text() == "step_1\n"
    assert _load(d)[0] == 1
    _save(d, 2)  # the next save clears the leftover
    assert sorted(p.name for p in d.iterdir()) == ["latest", "step_1", "step_2"]
    assert _load(d)[0] == 2


def test_preemption_watcher_records_sigterm_and_sigusr1_and_restores_handlers():
    import signal

    from megatron_hbp.mcore.preemption import EXIT_PREEMPTED, Preempted, PreemptionWatcher

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        w = PreemptionWatcher().install()
        try:
            assert not w.requested()
            os.kill(os.getpid(), sig)  # the process survives: the handler only records it
            assert w.requested() and w.signame == sig.name
        finally:
            w.close()
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before
    assert EXIT_PREEMPTED == 75
    assert (
        str(Preempted(42, Path("ck/step_42"), "SIGUSR1"))
        == "pre-empted by SIGUSR1 after plan step 41: saved ck/step_42"
    )
    assert "nothing saved (checkpoint.dir is not set)" in str(Preempted(3, None, "SIGTERM"))


def test_preemption_watcher_leaves_forked_children_their_default_action():
    """A data-loader worker forked while the watcher is installed still dies on SIGTERM."""
    import signal

    from megatron_hbp.mcore.preemption import PreemptionWatcher

    w = PreemptionWatcher().install()
    try:
        pid = os.fork()
        if pid == 0:  # child: wait for the signal; the default action ends it
            import time

            time.sleep(30)
            os._exit(0)
        import time

        time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        assert not w.requested()  # the parent did not receive anything
    finally:
        w.close()


def test_layout_change_is_refused_where_it_cannot_be_done_naming_what_works():
    from megatron_hbp.mcore.checkpoint import _layout_change_blocker

    saved = {"tp": 2, "pp": 1, "world_size": 8, "distributed_optimizer": False}  # 4 data x context ranks
    assert _layout_change_blocker(saved, {"tp": 1, "pp": 1, "world_size": 4}, False) is None  # TP 2 -> 1
    assert _layout_change_blocker(saved, {"tp": 1, "pp": 1, "world_size": 2}, False) is None  # and DP 4 -> 2
    assert _layout_change_blocker(saved, {"tp": 2, "pp": 1, "world_size": 2}, False) is None  # DP 4 -> 1
    assert _layout_change_blocker(saved, {"tp": 1, "pp": 1, "world_size": 3}, False) == (
        "the data x context ranks must be the saved 4 or a divisor of it (3 now): launch one of 4, 2, 1 "
        "processes for tp=1"
    )
    assert "(8 now)" in _layout_change_blocker(saved, {"tp": 1, "pp": 1, "world_size": 8}, False)
    assert "use_distributed_optimizer: false" in _layout_change_blocker(
        saved, {"tp": 1, "pp": 1, "world_size": 4}, True
    )
    # torch_dist: Megatron re-slices the distributed optimizer's state too
    dist = dict(saved, checkpoint_format="torch_dist", distributed_optimizer=True)
    assert _layout_change_blocker(dist, {"tp": 1, "pp": 1, "world_size": 2}, True) is None
    assert "(3 now)" in _layout_change_blocker(dist, {"tp": 1, "pp": 1, "world_size": 3}, True)
    assert "pipeline parallel size 1" in _layout_change_blocker(
        dict(saved, pp=2), {"tp": 1, "pp": 2, "world_size": 4}, False
    )


def test_work_items_of_fewer_ranks_accumulate_the_missing_replicas():
    """1 rank running a 2-rank plan gets, per step, replica 0's then replica 1's micro-batches;
    2 ranks running a 4-rank plan with a CP-2 group: rank r runs replicas r // 2 of its CP slot."""
    from megatron_hbp.mcore.data import rank_work_items
    from megatron_hbp.planner import GroupConfig, PlanConfig, build_plan

    lengths = np.array([10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120, 25, 35, 45, 55])
    plan = build_plan(
        lengths,
        None,
        PlanConfig(groups=[GroupConfig(pack_length=128)], world_size=2, micro_batches_per_step=2),
    )
    one = rank_work_items(plan, 0, dp_size=1)
    want = []
    for s in range(plan.num_steps):
        st = plan.step(s)
        for r in (0, 1):
            for mb in st.replica(r).micro_batches:
                want.append((s, tuple(int(i) for p in mb.packs for i in p.sample_indices)))
    assert [(it.step, tuple(it.sample_indices.tolist())) for it in one] == want
    assert sorted(i for _, idx in want for i in idx) == list(range(len(lengths)))  # every sample once
    plan4 = build_plan(
        lengths, None,
        PlanConfig(groups=[GroupConfig(pack_length=64), GroupConfig(pack_length=128, cp=2)], world_size=4, tokens_per_step=256),
    )  # fmt: skip
    assert {int(plan4.step(s).cp) for s in range(plan4.num_steps)} == {1, 2}
    got = [it for r in range(2) for it in rank_work_items(plan4, r, dp_size=2)]
    for s in range(plan4.num_steps):
        st = plan4.step(s)
        c = int(st.cp)
        want = sorted(
            (tuple(int(i) for p in mb.packs for i in p.sample_indices), k)
            for rep in range(4 // c)
            for mb in st.replica(rep).micro_batches
            for k in range(c)  # a CP-c replica's micro-batch runs on c ranks, one per CP rank
        )
        have = sorted((tuple(it.sample_indices.tolist()), it.cp_rank) for it in got if it.step == s)
        assert have == want and all(it.cp == c for it in got if it.step == s), s
        if c == 2:  # the two CP ranks of a pair run the same micro-batch at the same position
            r0, r1 = (
                [tuple(it.sample_indices.tolist()) for it in rank_work_items(plan4, r, s, s + 1, dp_size=2)]
                for r in (0, 1)
            )
            assert r0 == r1


def test_launch_hint_names_the_rank_counts_that_can_run_a_plan():
    from megatron_hbp.mcore.train import _fewer_ranks_hint
    from megatron_hbp.planner import GroupConfig, PlanConfig, build_plan

    lengths = np.arange(10, 200, 7)
    cp1 = build_plan(
        lengths,
        None,
        PlanConfig(groups=[GroupConfig(pack_length=256)], world_size=4, micro_batches_per_step=1),
    )
    assert _fewer_ranks_hint(cp1, 1) == " (or 2, 1: fewer ranks accumulate the missing replicas)"
    groups = [GroupConfig(pack_length=128), GroupConfig(pack_length=256, cp=2)]
    cp2 = build_plan(lengths, None, PlanConfig(groups=groups, world_size=4, tokens_per_step=1024))
    assert (
        _fewer_ranks_hint(cp2, 2) == " (or 4: fewer ranks accumulate the missing replicas)"
    )  # 2 ranks x tp 2
    two = build_plan(lengths, None, PlanConfig(groups=groups, world_size=2, tokens_per_step=512))
    assert _fewer_ranks_hint(two, 1) == ""  # CP 2 needs both ranks


# ----------------------------------------------------------------------------- torch_dist folders


def _dcp_folder(d: Path) -> Path:
    """A torch.distributed.checkpoint folder as Megatron's torch_dist writes it: tensors and a
    pickled object (Megatron's ShardedObjects, e.g. its common state)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(
        {"w": torch.arange(12.0).reshape(3, 4), "common": {"step": 3, "names": ["a", "b"]}},
        checkpoint_id=str(d),
        no_dist=True,
    )
    return d


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_dcp_folder_reads_back_without_torch_distributed(tmp_path):
    from megatron_hbp.checkpoint_files import check_dcp_folder, read_dcp_objects, read_dcp_tensors

    d = _dcp_folder(tmp_path / "dcp")
    check_dcp_folder(d)
    assert torch.equal(read_dcp_tensors(d)["w"], torch.arange(12.0).reshape(3, 4))
    assert read_dcp_objects(d) == {"common.step": 3, "common.names": ["a", "b"]}
    assert not torch.distributed.is_initialized()


def test_crafted_dcp_metadata_is_refused_and_nothing_runs(tmp_path):
    import pickle

    from megatron_hbp.checkpoint_files import check_dcp_folder

    marker = tmp_path / "pwned"
    d = _dcp_folder(tmp_path / "dcp")
    (d / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(UnsafeCheckpointError) as e:
        check_dcp_folder(d)
    msg = str(e.value)
    assert (
        "\n" not in msg and str(d / ".metadata") in msg and "os.makedirs" in msg and "refused to load" in msg
    ), msg
    assert not marker.exists()
    # control: torch.distributed.checkpoint's reader unpickles it like this, which runs it
    with open(d / ".metadata", "rb") as f:
        pickle.load(f)  # noqa: S301 - on purpose
    assert marker.is_dir()


def test_crafted_dcp_object_is_refused_and_nothing_runs(tmp_path):
    """A legitimate ``.metadata`` whose byte object (a Megatron ShardedObject) would run code when
    DCP's planner unpickles it (``torch.load(weights_only=False)``)."""
    import torch.distributed.checkpoint as dcp

    from megatron_hbp.checkpoint_files import check_dcp_folder

    marker = tmp_path / "pwned"
    d = tmp_path / "dcp"
    dcp.save({"w": torch.ones(2), "common": _Evil(marker)}, checkpoint_id=str(d), no_dist=True)
    assert not marker.exists()  # saving it ran nothing either
    with pytest.raises(UnsafeCheckpointError) as e:
        check_dcp_folder(d)
    msg = str(e.value)
    assert "\n" not in msg and "__0_0.distcp (object common)" in msg and "makedirs" in msg, msg
    assert not marker.exists()


def test_checkpoint_format_and_async_save_config():
    from megatron_hbp.configio import ConfigError
    from megatron_hbp.mcore.config import CheckpointConfig

    assert CheckpointConfig().format == "torch_dist" and CheckpointConfig().async_save is False
    with pytest.raises(ConfigError, match="checkpoint.format must be torch_dist or per_rank, got 'zarr'"):
        CheckpointConfig(format="zarr")
    with pytest.raises(ConfigError, match="checkpoint.async_save needs checkpoint.format: torch_dist"):
        CheckpointConfig(format="per_rank", async_save=True)


def test_while_megatron_loads_stored_objects_are_unpickled_weights_only(tmp_path):
    """The second line of defence (after check_dcp_folder): inside ``_weights_only_objects`` DCP's
    load planner refuses a stored object that names a callable, and it does not run."""
    import torch.distributed.checkpoint as dcp

    from megatron_hbp.mcore.dist_ckpt import _weights_only_objects

    good = _dcp_folder(tmp_path / "good")
    out = {"w": torch.zeros(3, 4), "common": {"step": 0, "names": []}}
    with _weights_only_objects():
        dcp.load(out, checkpoint_id=str(good), no_dist=True)
    assert out["common"] == {"step": 3, "names": ["a", "b"]} and out["w"][2, 3] == 11
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad"
    dcp.save({"common": _Evil(marker)}, checkpoint_id=str(bad), no_dist=True)
    from torch.distributed.checkpoint.api import CheckpointException

    with _weights_only_objects(), pytest.raises(CheckpointException, match="Weights only load failed"):
        dcp.load({"common": None}, checkpoint_id=str(bad), no_dist=True)
    assert not marker.exists()
    # control: without the context DCP's planner runs it
    dcp.load({"common": None}, checkpoint_id=str(bad), no_dist=True)
    assert marker.is_dir()
