"""Every config field is documented, and docs/config_reference.md is current."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "tools" / "config_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_config_field_has_a_description():
    tool = _tool()
    missing = [
        f"{module}:{cls}.{field}"
        for _, module, classes in tool.SECTIONS
        for cls in classes
        for field, _, _, doc in tool.dataclass_fields(ROOT / module, cls)
        if not doc
    ]
    assert missing == [], f"undocumented config fields: {missing}"


def test_reference_lists_the_real_dataclass_fields():
    import dataclasses

    from megatron_hbp.model_config import ModelConfig
    from megatron_hbp.planner.config import PlanConfig

    tool = _tool()
    for cls, module in (
        (PlanConfig, "megatron_hbp/planner/config.py"),
        (ModelConfig, "megatron_hbp/model_config.py"),
    ):
        parsed = [row[0] for row in tool.dataclass_fields(ROOT / module, cls.__name__)]
        assert parsed == [f.name for f in dataclasses.fields(cls)]


def test_docs_config_reference_is_current():
    expected = _tool().render()
    actual = (ROOT / "docs" / "config_reference.md").read_text()
    assert actual == expected, (
        "docs/config_reference.md is stale: run python tools/config_reference.py --output docs/config_reference.md"
    )
