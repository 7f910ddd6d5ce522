"""README promises: every tool's --help shows an example command."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = sorted(p for p in (ROOT / "tools").glob("*.py")) + [ROOT / "examples" / "pretrain_llama_hbp.py"]


@pytest.mark.parametrize("tool", TOOLS, ids=lambda p: p.name)
def test_help_has_an_example(tool):
    r = subprocess.run(
        [sys.executable, str(tool), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr[-2000:]
    # an example command line: "python tools/x.py ..." or "torchrun ... x.py ..."
    assert re.search(rf"^\s*(python|torchrun)\b.*{re.escape(tool.name)}", r.stdout, re.M), r.stdout
