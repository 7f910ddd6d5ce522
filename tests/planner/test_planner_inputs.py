"""tools/plan.py on bad inputs: one line ``error: ...`` naming the file / key and the fix, exit 2."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "configs" / "plan_demo.yaml")


@pytest.fixture(scope="module")
def plan_main():
    spec = importlib.util.spec_from_file_location("plan_cli", ROOT / "tools" / "plan.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.fixture
def files(tmp_path):
    np.save(tmp_path / "ok.npy", np.array([100, 200, 9000]))
    np.save(tmp_path / "float.npy", np.array([1.5, 2.0]))
    np.save(tmp_path / "zero.npy", np.array([5, 0, 3]))
    (tmp_path / "garbage.npy").write_text("garbage\n")
    np.savez(tmp_path / "other.npz", x=np.arange(3))
    return tmp_path


CASES = [
    (
        ["--lengths", "{d}/nope.npy", "--config", CFG],
        "lengths file not found: {d}/nope.npy (make one with tools/synth_lengths.py)",
    ),
    (["--lengths", "{d}/float.npy", "--config", CFG], "lengths must be integers, got dtype float64"),
    (
        ["--lengths", "{d}/zero.npy", "--config", CFG],
        "1 sample(s) have length <= 0 (first: index 1, length 0)",
    ),
    (
        ["--lengths", "{d}/garbage.npy", "--config", CFG],
        "{d}/garbage.npy: not a NumPy .npy file of integer lengths",
    ),
    (["--lengths", "{d}/other.npz", "--config", CFG], "{d}/other.npz: an .npz archive, not a .npy array"),
    (
        ["--sample-info", "{d}/ok.npy", "--config", CFG],
        "{d}/ok.npy: a bare .npy array, not a sample-info .npz",
    ),
    (
        ["--sample-info", "{d}/other.npz", "--config", CFG],
        "{d}/other.npz: not a sample-info file, missing arrays",
    ),
    (["--lengths", "{d}/ok.npy", "--config", "{d}/nope.yaml"], "config file not found: {d}/nope.yaml"),
    (
        ["--lengths", "{d}/ok.npy", "--config", CFG + ":balance=lptt"],
        "balance 'lptt' unknown; choose one of none, sort, lpt",
    ),
    (["--lengths", "{d}/ok.npy", "--config", CFG + ":foo=1"], "unknown key(s) 'foo'"),
    (["--lengths", "{d}/ok.npy", "--config", CFG + ":seed=-1"], "seed must be >= 0"),
    (
        ["--lengths", "{d}/ok.npy", "--config", CFG + ":cost_linear_coef=.nan"],
        ".cost_linear_coef: nan is not a finite number",
    ),
    (
        ["--lengths", "{d}/ok.npy", "--config", CFG + ":too_long=error"],
        "1 sample(s) are longer than the largest group (8192 tokens)",
    ),
]


@pytest.mark.parametrize("args, expect", CASES, ids=range(len(CASES)))
def test_bad_input_one_line(plan_main, files, capsys, args, expect):
    d = str(files)
    assert plan_main([a.format(d=d) for a in args] + ["--output", f"{d}/out"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expect.format(d=d) in err[0], err
    assert not (files / "out").exists()
