"""A non-editable install carries the package data and nothing at the top level but
``megatron_hbp`` (``kernels/`` must land as ``megatron_hbp.kernels``, never as ``kernels``)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("megatron_hbp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"megatron_hbp"}
    presets = {Path(n).stem for n in names if n.startswith("megatron_hbp/presets/") and n.endswith(".yaml")}
    assert {"tiny", "llama3_1_8b", "llama3_1_70b", "qwen2_5_7b", "qwen2_5_32b", "qwen2_5_72b"} <= presets
    assert "megatron_hbp/costmodel/hardware/h100_sxm.yaml" in names
    # One folder per op (kernels/<op>/): every module of each lands in the wheel.
    for op in ("attention_cost", "cross_entropy", "rmsnorm", "rope", "swiglu"):
        here = {p.name for p in (ROOT / "kernels" / op).glob("*.py")}
        assert "__init__.py" in here and "kernel.py" in here and "reference.py" in here
        assert {n.split("/")[-1] for n in names if n.startswith(f"megatron_hbp/kernels/{op}/")} >= here
    assert not any(n.startswith("megatron_hbp/kernels/tests/") for n in names)
