"""tools/preflight.py and the CP-backend rule (``megatron_hbp.mcore.cp_seam.resolve_cp_impl``).

The paper's setting (configs/llama3_1_8b_128k_hbp.yaml: 16K/CP 1 and 128K/CP 8, 28 recomputed
layers, 32 H100s, no Transformer Engine) must launch with the default backend (Ulysses): exit 0,
reserve-only warnings allowed. Modelled tensors of the 128K group, by part (GiB, the trainer's
path: varlen with expanded K/V, unfused RoPE/SwiGLU/RMSNorm, fused loss, distributed optimizer;
hand-checkable from tests/costmodel/test_costmodel_cp.py's per-token terms): weights 14.96, gradients
29.92, optimizer 2.80 are the static 8B terms (2, 4 and 12/32 bytes per parameter).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from megatron_hbp.mcore.cp_seam import resolve_cp_impl

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "llama3_1_8b_128k_hbp.yaml")


def _tool():
    spec = importlib.util.spec_from_file_location("preflight_tool", ROOT / "tools" / "preflight.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_resolve_cp_impl_rule():
    kw = dict(num_heads=32, num_kv_heads=8, tp=1, te_available=False)
    assert resolve_cp_impl("auto", degrees=[1, 8], **kw) == ("ulysses", "auto")
    assert resolve_cp_impl("allgather", degrees=[1, 8], **kw) == ("allgather", "requested")
    assert resolve_cp_impl("ulysses", degrees=[1], **kw) == ("ulysses", "requested")
    # tp = 8: 4 query heads per TP rank cannot be split over cp = 8
    impl, why = resolve_cp_impl("auto", degrees=[1, 8], **{**kw, "tp": 8})
    assert impl == "allgather" and "not divisible by cp=8" in why
    with pytest.raises(ValueError, match=r"cp_backend 'ulysses'.*4 query heads.*cp=8.*allgather"):
        resolve_cp_impl("ulysses", degrees=[1, 8], **{**kw, "tp": 8})
    with pytest.raises(ValueError, match="cp_backend 'te'.*not installed.*ulysses"):
        resolve_cp_impl("te", degrees=[1, 8], **kw)
    with pytest.raises(ValueError, match="cp_backend 'te'.*not wired"):
        resolve_cp_impl("te", degrees=[1, 8], **{**kw, "te_available": True})


def _rows(out: str) -> dict[str, list[str]]:
    """Table rows of the tool's output by group index."""
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 14 and parts[0].isdigit():
            rows[parts[0]] = parts
    return rows


@pytest.mark.slow
def test_paper_setting_launches_with_ulysses(capsys):
    tool = _tool()
    rc = tool.main(["--config", CONFIG, "--gpu", "h100_sxm", "--num-gpus", "32"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "CP attention ulysses" in out and "verdict: ok" in out
    rows = _rows(out)
    assert set(rows) == {"0", "1"}
    g1 = rows["1"]  # group pack cp recompute tokens weights gradients optimizer activations ...
    assert g1[1:5] == ["131072", "8", "28", "16384"]
    assert g1[5:8] == ["14.96", "29.92", "2.80"]
    assert float(g1[13]) <= 80e9 / 2**30  # modelled tensors (before the reserve) fit 80 GB
    assert g1[14] == "warning"  # only the estimated 16 GiB reserve tips it over

    # every 128K layer stored (no recompute): refused, exit 3, the message names the fix
    over = (
        "plan.overrides={groups: [{pack_length: 16384, cp: 1, recompute_layers: 28}, "
        "{pack_length: 131072, cp: 8, recompute_layers: 0}]}"
    )
    rc = tool.main(["--config", CONFIG, "--gpu", "h100_sxm", "--num-gpus", "32", "--set", over])
    out = capsys.readouterr().out
    assert rc == 3, out
    assert "REFUSED: out-of-memory risk: group 1" in out and "recompute_layers >= 31 fits" in out


def test_config_errors_exit_2(capsys):
    tool = _tool()
    rc = tool.main(["--config", CONFIG, "--num-gpus", "32", "--set", "cp_backend=te"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "cp_backend 'te'" in err
    rc = tool.main(["--config", CONFIG, "--num-gpus", "30"])
    assert rc == 2 and "cp=8 does not divide world_size=30" in capsys.readouterr().err
