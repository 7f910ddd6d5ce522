"""Inputs the pre-flight may build before training: the tokenizer and chat template of the sample
info (explicit, from ``init_from``, or the defaults), the sample info and the plan (rank 0 only),
and the check that ``init_from`` weights fit the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from megatron_hbp import data as hdata
from megatron_hbp.configio import ConfigError, from_dict
from megatron_hbp.convert import find_hf_tokenizer
from megatron_hbp.convert.hf_config import config_differences
from megatron_hbp.data import load_sample_info
from megatron_hbp.data.demo import ensure_demo_data
from megatron_hbp.mcore.config import TrainConfig
from megatron_hbp.mcore.launch import TrainSetupError
from megatron_hbp.model_config import ModelConfig, load_model_config
from megatron_hbp.planner import PlanConfig, build_plan
from megatron_hbp.planner.report import report_markdown, write_report

# Markers of the Jinja chat templates that ship with HF models -> our built-in template with
# the same rendering (megatron_hbp.data.templates); checked in this order.
_JINJA_MARKERS = (
    ("<|start_header_id|>", "llama3"),
    ("<|im_start|>", "chatml"),
    ("[INST]", "mistral"),
)


def init_dir_files(init_from: str | Path) -> Path:
    """Folder of ``init_from`` holding its tokenizer files (``tokenizer/`` in a converted one)."""
    d = Path(init_from)
    if (d / "convert_meta.json").is_file() and (d / "tokenizer").is_dir():
        return d / "tokenizer"
    return d


def template_from_jinja(jinja: str) -> str | None:
    """The built-in chat template whose markers appear in a HF Jinja chat template, or None."""
    for marker, name in _JINJA_MARKERS:
        if marker in jinja:
            return name
    return None


def resolve_tokenizer_and_template(cfg: TrainConfig) -> tuple[str, str]:
    """``(tokenizer path, template name)`` for building the sample info.

    Explicit ``data.tokenizer`` / ``data.template`` win; otherwise, with ``init_from``, the
    tokenizer shipped in it (``tokenizer.json`` / ``tokenizer.model``) and the built-in template
    matching its chat template; otherwise the default tokenizer and ``llama3``.
    """
    tokenizer, template = cfg.data.tokenizer, cfg.data.template
    if cfg.init_from is not None and (tokenizer is None or template is None):
        src = init_dir_files(cfg.init_from)
        tok, jinja = find_hf_tokenizer(src)
        if tokenizer is None:
            if tok is None:
                raise TrainSetupError(
                    f"init_from {cfg.init_from}: no tokenizer.json or tokenizer.model in {src}; "
                    "set data.tokenizer"
                )
            tokenizer = str(tok)
        if template is None and jinja is not None:
            template = template_from_jinja(jinja)
            if template is None:
                raise TrainSetupError(
                    f"init_from {cfg.init_from}: its chat template matches none of the built-in ones "
                    "(llama3, chatml, mistral); set data.template"
                )
            print(f"[hbp] chat template of {src}: using the built-in '{template}' template", flush=True)
    return tokenizer or str(hdata.default_tokenizer_path()), template or "llama3"


def _build_sample_info(cfg: TrainConfig) -> None:
    paths = list(cfg.data.paths)
    if cfg.data.demo:
        paths = [str(ensure_demo_data())]
    if not paths:
        raise TrainSetupError(
            f"sample info {cfg.data.sample_info} is missing and data.paths is empty: run "
            "tools/preprocess_lengths.py, or set data.paths (or data.demo: true) with build_if_missing: true"
        )
    tokenizer, template = resolve_tokenizer_and_template(cfg)
    print(
        f"[hbp] building sample info {cfg.data.sample_info} from {paths} (tokenizer {tokenizer})", flush=True
    )
    hdata.preprocess(
        paths, cfg.data.sample_info, tokenizer=tokenizer, template=template,
        max_length=cfg.data.max_length, workers=max(1, cfg.data.num_workers),
    )  # fmt: skip


def check_init_from(cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """Refuse, before training, initial weights that cannot load into this model."""
    if cfg.init_from is None or cfg.checkpoint.load:
        return
    d = Path(cfg.init_from)
    if cfg.parallel.pp > 1:
        raise TrainSetupError("init_from does not support pipeline parallelism (pp > 1); use pp: 1")
    if not d.is_dir():
        raise TrainSetupError(f"init_from {d}: folder not found")
    meta = d / "convert_meta.json"
    if meta.is_file():
        src = json.loads(meta.read_text())
        if int(src.get("tp", -1)) != cfg.parallel.tp:
            raise TrainSetupError(
                f"init_from {d} was converted for tp={src.get('tp')} but parallel.tp={cfg.parallel.tp}; convert "
                f"again with --tp {cfg.parallel.tp}, or give the Hugging Face folder (converted on the fly)"
            )
        try:
            src_cfg = load_model_config(d)
        except ConfigError as e:
            raise TrainSetupError(str(e)) from None
    elif (d / "config.json").is_file():
        if not any(d.glob("*.safetensors")):
            raise TrainSetupError(
                f"init_from {d}: config.json but no *.safetensors weights (only safetensors checkpoints are read)"
            )
        try:
            src_cfg = load_model_config(d)
        except ConfigError as e:
            raise TrainSetupError(str(e)) from None
    else:
        raise TrainSetupError(
            f"init_from {d}: neither a Hugging Face model folder (config.json + *.safetensors) nor a folder "
            "from tools/convert_checkpoint.py hf-to-megatron (convert_meta.json)"
        )
    diff = config_differences(model_cfg, src_cfg)
    if diff:
        raise TrainSetupError(
            f"model '{cfg.model}' disagrees with init_from {d}: {'; '.join(diff)}. Leave model unset (or set it "
            "to the init_from folder) to take the shapes from the checkpoint"
        )


def _build_plan(cfg: TrainConfig, dp_size: int) -> None:
    if not cfg.plan.config:
        raise TrainSetupError(
            f"plan {cfg.plan.path} is missing and plan.config is not set: run tools/plan.py first"
        )
    if not Path(cfg.plan.config).is_file():
        raise TrainSetupError(f"plan config {cfg.plan.config} not found")
    data = yaml.safe_load(Path(cfg.plan.config).read_text()) or {}
    data.update(cfg.plan.overrides)
    if cfg.plan.world_size is not None:
        data["world_size"] = cfg.plan.world_size
    pcfg = from_dict(PlanConfig, data, where=str(cfg.plan.config))
    info = load_sample_info(cfg.data.sample_info)
    print(
        f"[hbp] building plan {cfg.plan.path} from {cfg.plan.config} (overrides: {cfg.plan.overrides})",
        flush=True,
    )
    plan = build_plan(info.lengths, info.loss_tokens, pcfg, fingerprint=info.fingerprint)
    target = Path(cfg.plan.path)
    out = plan.save(target if target.suffix == ".npz" else target / "plan.npz")
    try:
        rep = write_report(plan, out.parent, title=f"Plan report: {out}")
        print(report_markdown(rep, title=f"Plan report: {out}"), flush=True)
    except Exception as e:  # the report is informational; training does not depend on it
        print(f"[hbp] (plan report unavailable: {e})", flush=True)
