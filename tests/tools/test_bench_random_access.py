"""tools/bench_random_access.py runs end to end on a small corpus: both preprocessing modes for
.jsonl and .jsonl.gz input, the same samples through every reader (it checks they are equal),
warm and cold passes. It reports numbers; only their presence is checked here."""

import json
import re
import sys

import pytest

from tests.distributed import ROOT, run_command


@pytest.mark.slow
def test_bench_random_access_smoke(tmp_path):
    data = tmp_path / "c.jsonl"
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"]
    data.write_text(
        "\n".join(
            json.dumps({"messages": [{"role": "user", "content": " ".join(words[: 2 + i % 7])},
                                     {"role": "assistant", "content": " ".join(words * (1 + i % 5))}]})
            for i in range(60)
        ) + "\n"
    )  # fmt: skip
    cmd = [sys.executable, ROOT / "tools" / "bench_random_access.py", "--data", data, "--samples", "20",
           "--repeats", "1", "--workers", "1", "--long", "40"]  # fmt: skip
    out = run_command(cmd, timeout=600).stdout
    for kind in (".jsonl", ".jsonl.gz"):
        for mode in ("--no-tokens", "with tokens (default)"):
            assert re.search(rf"\| {re.escape(mode)} \| {re.escape(kind)} \| [\d.]+ \| [\d.]+ MB \|", out), (
                out
            )
    assert "unnamed decompressed copy made in" in out
    rows = [ln for ln in out.splitlines() if re.match(r"\| (all|short|long)", ln)]
    # 3 sample classes x warm/cold x 3 readers (a class may be empty: at least "all")
    assert len(rows) >= 6 and len(rows) % 6 == 0, out
    assert {"warm", "cold"} <= {ln.split("|")[2].strip() for ln in rows}
