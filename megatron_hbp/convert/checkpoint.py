"""Convert checkpoints between Hugging Face and our Megatron-Core model, tensor by tensor.

Converted Megatron checkpoint (``hf_to_megatron`` output, ``megatron_to_hf`` input)::

    DIR/convert_meta.json        format, tp, model config, vocab and padded vocab sizes
    DIR/model_tp{r:02d}.safetensors   rank r's state dict (Megatron-Core local-spec names)
    DIR/hf_config.json           the source config.json (export writes it back), if any
    DIR/tokenizer/               tokenizer files copied from the source, if any

Safetensors rather than ``torch.save``: it can be written one tensor at a time and read one
tensor at a time, so peak host memory is about the largest tensor, not the model. A rank
file loads into a built model with :func:`load_converted_into_model`, or a HF directory
straight into a model with :func:`load_hf_into_model` (no intermediate files).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import torch

from megatron_hbp.checkpoint_files import (
    check_dcp_folder,
    is_step_dir,
    read_dcp_tensors,
    read_manifest,
    safe_load,
    select_step,
    step_candidates,
    verify_step,
)
from megatron_hbp.configio import from_dict
from megatron_hbp.convert.hf_config import (
    config_differences,
    hf_config_from_model_config,
    model_config_from_hf,
    read_hf_config,
)
from megatron_hbp.convert.mapping import (
    HF_IGNORED_SUFFIXES,
    TensorMap,
    check_tp,
    hf_shapes,
    megatron_shape,
    padded_vocab_size,
    tensor_maps,
    to_hf,
    to_megatron,
)
from megatron_hbp.convert.safetensors_io import (
    INDEX_NAME,
    SINGLE_NAME,
    HFWeights,
    StreamingSafetensorsWriter,
    nbytes,
    read_header,
    read_tensor,
)
from megatron_hbp.model_config import ModelConfig, load_model_config

FORMAT = "megatron_hbp.convert/1"
META_NAME = "convert_meta.json"
HF_CONFIG_NAME = "hf_config.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
"""Files copied along with the weights (tokenizer, chat template, generation defaults)."""


class CheckpointMismatchError(ValueError):
    """The weights do not match the model config (missing, unexpected or mis-shaped tensors)."""


def rank_file(tp_rank: int) -> str:
    return f"model_tp{tp_rank:02d}.safetensors"


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="tensor")


# ----------------------------------------------------------------------------- config


def resolve_model_config(hf_dir: str | Path, model_preset: str | None = None) -> ModelConfig:
    """The model config of a HF directory: from its config.json, checked against ``model_preset``.

    Without config.json the preset is required. With both, every field that changes the
    weights or the outputs must agree, else ValueError listing the differences.
    """
    hf_dir = Path(hf_dir)
    has_json = (hf_dir / "config.json").is_file()
    if not has_json and model_preset is None:
        raise FileNotFoundError(f"{hf_dir}: no config.json; pass --model-preset NAME to give the shapes")
    if not has_json:
        return load_model_config(model_preset)
    from_hf = model_config_from_hf(hf_dir)
    if model_preset is None:
        return from_hf
    preset = load_model_config(model_preset)
    diff = config_differences(preset, from_hf)
    if diff:
        raise ValueError(
            f"model preset '{model_preset}' disagrees with {hf_dir / 'config.json'}: {'; '.join(diff)}. "
            "Drop --model-preset to use config.json, or fix the preset"
        )
    return from_hf


# ----------------------------------------------------------------------------- HF -> Megatron


def validate_hf_weights(hf: HFWeights, cfg: ModelConfig) -> None:
    """Raise :class:`CheckpointMismatchError` naming every missing, unexpected or mis-shaped tensor."""
    expected = hf_shapes(cfg)
    problems = []
    for name, shape in expected.items():
        if name not in hf:
            problems.append(f"missing tensor {name} (expected shape {list(shape)})")
        elif hf.spec(name)[1] != shape:
            problems.append(
                f"tensor {name} in {hf.file_of(name).name} has shape {list(hf.spec(name)[1])}, "
                f"expected {list(shape)} from the model config"
            )
    ignorable = ("lm_head.weight",) if cfg.tie_embeddings else ()
    for name in hf.names:
        if name not in expected and name not in ignorable and not name.endswith(HF_IGNORED_SUFFIXES):
            problems.append(f"unexpected tensor {name} in {hf.file_of(name).name} (not part of {cfg.name})")
    if problems:
        shown = "\n  ".join(problems[:12])
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise CheckpointMismatchError(
            f"{hf.dir}: the weights do not match model '{cfg.name}' ({len(problems)} problem(s)):\n  {shown}{more}"
        )
    for tm in tensor_maps(cfg):
        dtypes = {hf.spec(n)[0] for n in tm.hf}
        if len(dtypes) > 1:
            raise CheckpointMismatchError(f"{hf.dir}: {', '.join(tm.hf)} have different dtypes {dtypes}")


def iter_megatron_shards(
    hf: HFWeights, cfg: ModelConfig, tp: int, padded_vocab: int, *, ranks: list[int] | None = None
) -> Iterator[tuple[TensorMap, dict[int, torch.Tensor]]]:
    """Yield ``(map, {rank: shard})`` for every Megatron tensor, reading HF tensors one map at a time."""
    ranks = list(range(tp)) if ranks is None else ranks
    for tm in tensor_maps(cfg):
        shards = to_megatron(tm, [hf.get(n) for n in tm.hf], cfg, tp, padded_vocab)
        yield tm, {r: shards[r] for r in ranks}


def _copy_side_files(hf_dir: Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        src = hf_dir / name
        if src.is_file():
            (out / TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out / TOKENIZER_DIR / name)
            copied.append(name)
    return copied


def hf_to_megatron(
    hf_dir: str | Path,
    output_dir: str | Path,
    *,
    tp: int = 1,
    model_preset: str | None = None,
    vocab_divisor: int = 128,
    progress: bool = True,
) -> dict:
    """Convert a HF LLaMA/Qwen2 directory into ``tp`` Megatron rank files under ``output_dir``.

    Tensors keep their dtype (bit-exact). Returns the metadata written to ``convert_meta.json``.
    Raises FileNotFoundError (missing config/shards), UnsupportedModelError (architecture),
    ValueError (TP does not divide the heads; preset disagrees), CheckpointMismatchError.
    """
    hf_dir, out = Path(hf_dir), Path(output_dir)
    cfg = resolve_model_config(hf_dir, model_preset)
    check_tp(cfg, tp)
    hf = HFWeights(hf_dir)
    validate_hf_weights(hf, cfg)
    vp = padded_vocab_size(cfg.vocab_size, tp, vocab_divisor)
    maps = tensor_maps(cfg)
    out.mkdir(parents=True, exist_ok=True)
    specs = [(tm.megatron, hf.spec(tm.hf[0])[0], megatron_shape(tm, cfg, tp, vp)) for tm in maps]
    meta = {
        "format": FORMAT,
        "tp": tp,
        "vocab_size": cfg.vocab_size,
        "padded_vocab_size": vp,
        "vocab_divisor": vocab_divisor,
        "model_config": asdict(cfg),
        "source": str(hf_dir.resolve()),
        "files": [rank_file(r) for r in range(tp)],
    }
    with ExitStack() as stack:
        writers = [
            stack.enter_context(StreamingSafetensorsWriter(out / rank_file(r), specs, {"tp_rank": str(r)}))
            for r in range(tp)
        ]
        for tm, shards in _progress(
            iter_megatron_shards(hf, cfg, tp, vp), len(maps), "hf->megatron", progress
        ):
            for r, w in enumerate(writers):
                w.write(tm.megatron, shards[r])
    if (hf_dir / "config.json").is_file():
        shutil.copy2(hf_dir / "config.json", out / HF_CONFIG_NAME)
    meta["tokenizer_files"] = _copy_side_files(hf_dir, out)
    (out / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# ----------------------------------------------------------------------------- loading into a model


def _named_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    while hasattr(model, "module"):  # DDP / Float16Module wrappers
        model = model.module
    return dict(model.named_parameters())


def _load_shards(
    model: torch.nn.Module,
    cfg: ModelConfig,
    tp_size: int,
    shard_of: Callable[[TensorMap, tuple[int, ...]], torch.Tensor],
    where: str,
) -> None:
    params = _named_params(model)
    maps = tensor_maps(cfg)
    wanted = {tm.megatron for tm in maps}
    untouched = [n for n in params if n not in wanted]
    absent = [tm.megatron for tm in maps if tm.megatron not in params]
    if untouched or absent:
        raise CheckpointMismatchError(
            f"{where}: the model's parameters do not match model '{cfg.name}': "
            f"not in the checkpoint {untouched[:5]}, not in the model {absent[:5]} "
            "(pipeline parallelism is not supported by the converter)"
        )
    with torch.no_grad():
        for tm in maps:
            p = params[tm.megatron]
            t = shard_of(tm, tuple(p.shape))
            if tuple(t.shape) != tuple(p.shape):
                raise CheckpointMismatchError(
                    f"{where}: tensor {tm.megatron} has shape {list(t.shape)} but the model (tp={tp_size}) "
                    f"expects {list(p.shape)}"
                )
            p.copy_(t)


def load_hf_into_model(
    model: torch.nn.Module,
    hf_dir: str | Path,
    *,
    model_cfg: ModelConfig | None = None,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> ModelConfig:
    """Copy a HF checkpoint into this rank's part of a model built by ``megatron_hbp.mcore.build_model``.

    Streams one tensor at a time (no converted files). The padded vocabulary is read from the
    model's embedding. Returns the model config of the HF directory (checked against
    ``model_cfg`` when given).
    """
    hf_dir = Path(hf_dir)
    cfg = model_config_from_hf(hf_dir)
    if model_cfg is not None:
        diff = config_differences(model_cfg, cfg)
        if diff:
            raise ValueError(f"{hf_dir}: config.json disagrees with the model config: {'; '.join(diff)}")
    check_tp(cfg, tp_size)
    hf = HFWeights(hf_dir)
    validate_hf_weights(hf, cfg)
    vp = _named_params(model)["embedding.word_embeddings.weight"].shape[0] * tp_size

    def shard_of(tm: TensorMap, _shape) -> torch.Tensor:
        return to_megatron(tm, [hf.get(n) for n in tm.hf], cfg, tp_size, vp)[tp_rank]

    _load_shards(model, cfg, tp_size, shard_of, str(hf_dir))
    return cfg


def read_meta(checkpoint_dir: str | Path) -> tuple[dict, ModelConfig]:
    """``(metadata, model config)`` of a converted checkpoint directory."""
    d = Path(checkpoint_dir)
    path = d / META_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{d}: no {META_NAME}; not a directory written by `convert_checkpoint.py hf-to-megatron`"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    cfg = from_dict(ModelConfig, meta["model_config"], str(path))
    missing = [f for f in meta["files"] if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} names rank file(s) that do not exist: {', '.join(missing)}")
    return meta, cfg


def load_converted_into_model(
    model: torch.nn.Module, checkpoint_dir: str | Path, *, tp_rank: int = 0
) -> ModelConfig:
    """Copy rank ``tp_rank`` of a converted checkpoint into a built model (TP degree must match)."""
    d = Path(checkpoint_dir)
    meta, cfg = read_meta(d)
    path = d / meta["files"][tp_rank]
    _load_shards(model, cfg, meta["tp"], lambda tm, _s: read_tensor(path, tm.megatron), str(path))
    return cfg


def load_pretrained_into_model(
    model: torch.nn.Module,
    path: str | Path,
    *,
    model_cfg: ModelConfig,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> ModelConfig:
    """Initial weights for training: a HF directory (converted on the fly) or a converted
    directory (``convert_meta.json``, its TP degree must equal ``tp_size``).

    ``model_cfg`` is the config the model was built with; a checkpoint of another shape is
    refused with the differing fields.
    """
    path = Path(path)
    if (path / META_NAME).is_file():
        meta, cfg = read_meta(path)
        diff = config_differences(model_cfg, cfg)
        if diff:
            raise ValueError(f"{path}: the converted checkpoint is another model: {'; '.join(diff)}")
        if meta["tp"] != tp_size:
            raise ValueError(
                f"{path} was converted for tp={meta['tp']} but the model runs with tp={tp_size}; convert "
                f"again with --tp {tp_size}, or give the HF directory (converted on the fly)"
            )
        return load_converted_into_model(model, path, tp_rank=tp_rank)
    if (path / "config.json").is_file():
        return load_hf_into_model(model, path, model_cfg=model_cfg, tp_rank=tp_rank, tp_size=tp_size)
    raise FileNotFoundError(
        f"{path}: neither a Hugging Face model directory (config.json + *.safetensors) nor a converted "
        f"checkpoint ({META_NAME})"
    )


def find_hf_tokenizer(hf_dir: str | Path) -> tuple[Path | None, str | None]:
    """``(tokenizer file, chat template)`` shipped in a HF directory.

    The tokenizer is ``tokenizer.json`` (preferred) or ``tokenizer.model`` (SentencePiece);
    the chat template (Jinja source) comes from ``chat_template.jinja``, ``chat_template.json``
    or the ``chat_template`` entry of ``tokenizer_config.json``; None where absent.
    """
    d = Path(hf_dir)
    tok = next((d / n for n in ("tokenizer.json", "tokenizer.model") if (d / n).is_file()), None)
    template = None
    if (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text()
    elif (d / "chat_template.json").is_file():
        template = json.loads((d / "chat_template.json").read_text()).get("chat_template")
    elif (d / "tokenizer_config.json").is_file():
        template = json.loads((d / "tokenizer_config.json").read_text()).get("chat_template")
    if isinstance(template, list):  # several named templates: take "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return tok, template


# ----------------------------------------------------------------------------- Megatron -> HF


class TensorSource:
    """Lazy tensors of one TP rank: ``spec(name) -> (dtype, shape)``, ``get(name) -> Tensor``."""

    def __init__(self, spec: Callable, get: Callable, where: str):
        self.spec, self.get, self.where = spec, get, where

    @classmethod
    def from_safetensors(cls, path: str | Path) -> TensorSource:
        header = read_header(path)

        def spec(name):
            if name not in header:
                raise CheckpointMismatchError(f"{path}: tensor {name} is missing")
            return header[name]

        return cls(spec, lambda name: read_tensor(path, name), str(path))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], where: str) -> TensorSource:
        def get(name):
            if name not in state:
                raise CheckpointMismatchError(f"{where}: tensor {name} is missing")
            return state[name]

        return cls(lambda name: (get(name).dtype, tuple(get(name).shape)), get, where)


def hf_shard_plan(
    items: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_size: int
) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Split tensors (in order) into shards of at most ``max_shard_size`` bytes (a bigger tensor is alone)."""
    shards: list[list] = [[]]
    size = 0
    for item in items:
        n = nbytes(item[2], item[1])
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    return shards


def export_hf(
    sources: list[TensorSource],
    cfg: ModelConfig,
    output_dir: str | Path,
    *,
    hf_config: dict | None = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_size: int = 5 * 1024**3,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write a HF directory from the TP rank sources of our model (one HF tensor in memory at a time).

    ``sources[r]`` is TP rank r. Padding rows of the vocabulary are dropped; ``dtype``
    (optional) casts every tensor. Writes config.json (``hf_config`` or one made from
    ``cfg``), model.safetensors or model-XXXXX-of-YYYYY.safetensors + the index, and copies
    the files of ``tokenizer_dir``. Returns the safetensors paths.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tp = len(sources)
    check_tp(cfg, tp)
    maps = tensor_maps(cfg)
    shapes = hf_shapes(cfg)
    vp = None
    # Check every rank tensor's shape before writing anything.
    for tm in maps:
        for r, src in enumerate(sources):
            st_dtype, st_shape = src.spec(tm.megatron)
            if tm.kind == "vocab":
                vp = vp or st_shape[0] * tp
            want = megatron_shape(tm, cfg, tp, vp or 0)
            if tuple(st_shape) != tuple(want):
                raise CheckpointMismatchError(
                    f"{src.where}: tensor {tm.megatron} (tp rank {r}) has shape {list(st_shape)}, expected "
                    f"{list(want)} for model '{cfg.name}' with tp={tp}"
                )
    if vp < cfg.vocab_size:
        raise CheckpointMismatchError(f"padded vocabulary {vp} is smaller than vocab_size {cfg.vocab_size}")
    items = [(n, dtype or sources[0].spec(tm.megatron)[0], shapes[n]) for tm in maps for n in tm.hf]
    plan = hf_shard_plan(items, max_shard_size)
    names = (
        [SINGLE_NAME]
        if len(plan) == 1
        else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    )
    for stale in list(out.glob("model*.safetensors")) + [out / INDEX_NAME]:
        stale.unlink(missing_ok=True)
    weight_map = {n: names[i] for i, shard in enumerate(plan) for n, _, _ in shard}
    writers = iter([StreamingSafetensorsWriter(out / names[i], shard) for i, shard in enumerate(plan)])
    with ExitStack() as stack:
        writer = stack.enter_context(next(writers))
        left = len(plan[0])
        for tm in _progress(maps, len(maps), "megatron->hf", progress):
            tensors = to_hf(tm, [src.get(tm.megatron) for src in sources], cfg)
            for name, t in zip(tm.hf, tensors):
                if left == 0:
                    stack.close()
                    writer = stack.enter_context(next(writers))
                    left = len(writer.specs)
                writer.write(name, t if dtype is None else t.to(dtype))
                left -= 1
    if len(plan) > 1:
        total = sum(nbytes(s, d) for _, d, s in items)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    config = dict(hf_config) if hf_config is not None else hf_config_from_model_config(cfg)
    out_dtype = dtype or items[0][1]
    dtype_name = str(out_dtype).removeprefix("torch.")
    if "dtype" in config:  # transformers >= 5 key
        config["dtype"] = dtype_name
    else:
        config["torch_dtype"] = dtype_name
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file() and f.name in TOKENIZER_FILES:
                shutil.copy2(f, out / f.name)
    return [out / n for n in names]


# Megatron's local-spec layer saves its norms under Transformer Engine's names (the layer spec's
# ``sharded_state_dict_keys_map``) so that checkpoints move between the two specs.
_TE_NORM_NAMES = {
    "self_attention.linear_qkv.layer_norm_": "input_layernorm.",
    "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm.",
}


def unstack_layers(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Model tensors of a torch_dist checkpoint under the names of the model's ``state_dict``.

    Megatron's keys hold a transformer block's layers stacked along a leading dimension
    (``decoder.layers.<name>``, shape ``[num_layers, ...]``), and the norms under TE's names
    (``linear_qkv.layer_norm_weight``): one tensor per layer, ``input_layernorm.weight``."""
    out = {}
    for key, t in state.items():
        if not key.startswith("decoder.layers."):
            out[key] = t
            continue
        head, _, name = key.removeprefix("decoder.layers.").partition(".")
        stacked = not head.isdigit()
        if stacked:
            head, name = "", key.removeprefix("decoder.layers.")
        for te, local in _TE_NORM_NAMES.items():
            if name.startswith(te):
                name = local + name.removeprefix(te)
        if not stacked:
            out[f"decoder.layers.{head}.{name}"] = t
            continue
        if t.dim() == 0 or t.shape[0] != cfg.num_layers:
            raise CheckpointMismatchError(
                f"tensor {key} has shape {list(t.shape)}; expected {cfg.num_layers} stacked layers first"
            )
        for i in range(cfg.num_layers):
            out[f"decoder.layers.{i}.{name}"] = t[i]
    return out


def training_checkpoint_sources(path: str | Path) -> tuple[list[TensorSource], ModelConfig, Path]:
    """TP rank sources of a checkpoint written by the trainer (``megatron_hbp.mcore.checkpoint``).

    ``path`` is a ``step_<N>`` folder (``manifest.json`` + ``meta.json`` + the state) or the
    checkpoint directory (its newest complete step folder; unfinished or corrupt ones are skipped
    with a warning). Sizes and checksums are checked against the manifest.

    - ``torch_dist`` (``dist/``): the folder's pickles are vetted (``check_dcp_folder``: a
      restricted unpickler for ``.metadata``, weights-only for every object) and the model's full
      tensors assembled from their chunks, in this process, without torch.distributed; they are
      returned as one TP-1 source (Megatron's global tensors are the TP-1 layout; stacked layer
      tensors ``decoder.layers.<name>`` are split into ``decoder.layers.<i>.<name>``).
    - ``per_rank``: global ranks 0..tp-1 are the TP ranks of data-parallel rank 0 (Megatron's
      default rank order, tp fastest); their ``"model"`` state dicts are memory-mapped, weights-only.

    A file holding any other pickled object is refused (``UnsafeCheckpointError``). Pipeline
    parallelism (pp > 1) is refused.
    """

    def read_meta_of(step: Path) -> dict:
        meta_path = step / "meta.json"
        meta = json.loads(meta_path.read_text())
        for key in ("model", "tp"):
            if key not in meta:
                raise ValueError(f"{meta_path}: no '{key}' entry; not a megatron-hbp training checkpoint")
        return meta

    def check(step: Path) -> None:  # the sizes of all files, the checksums of the files read here
        verify_step(step, checksum=["meta.json"])
        meta = read_meta_of(step)
        if meta.get("checkpoint_format", "per_rank") == "torch_dist":
            verify_step(step, checksum=[n for n in read_manifest(step)["files"] if n.startswith("dist/")])
            return
        tp = int(meta["tp"])
        verify_step(step, checksum=[f"rank_{r:05d}.pt" for r in range(tp)])

    path = Path(path)
    if not path.is_dir() or not (is_step_dir(path) or step_candidates(path)):
        raise FileNotFoundError(
            f"{path}: neither {META_NAME} (hf-to-megatron output) nor a training checkpoint (a step_<N> "
            "folder, or the checkpoint dir holding them)"
        )
    path = select_step(path, check=check, warn=lambda m: print(m, file=sys.stderr, flush=True))
    meta_path = path / "meta.json"
    meta = read_meta_of(path)
    if int(meta.get("pp", 1)) != 1:
        raise ValueError(f"{meta_path}: pp={meta['pp']}; export supports pipeline parallel size 1 only")
    cfg = from_dict(ModelConfig, meta["model"], str(meta_path))
    if meta.get("checkpoint_format", "per_rank") == "torch_dist":
        folder = path / "dist"
        check_dcp_folder(folder)
        full = read_dcp_tensors(
            folder, keep=lambda n: not n.startswith("optimizer.") and "_extra_state" not in n
        )
        return [TensorSource.from_state_dict(unstack_layers(full, cfg), str(folder))], cfg, path
    sources = []
    for r in range(int(meta["tp"])):
        f = path / f"rank_{r:05d}.pt"
        if not f.is_file():
            raise FileNotFoundError(f"{path}: missing {f.name} (tensor-parallel rank {r} of {meta['tp']})")
        state = safe_load(f, mmap=True)
        model_state = state.get("model") if isinstance(state, dict) else None
        if not isinstance(model_state, dict):
            raise ValueError(f"{f}: no 'model' state dict")
        model_state = {
            k.removeprefix("module."): v for k, v in model_state.items() if isinstance(v, torch.Tensor)
        }
        sources.append(TensorSource.from_state_dict(model_state, str(f)))
    return sources, cfg, path


def _tokenizer_side_files(tokenizer: Path, out: Path) -> None:
    """Copy a tokenizer (a HF directory's files, a ``tokenizer.json``, or a SentencePiece model)."""
    if tokenizer.is_dir():
        for f in tokenizer.iterdir():
            if f.is_file() and f.name in TOKENIZER_FILES:
                shutil.copy2(f, out / f.name)
        return
    if not tokenizer.is_file():
        raise FileNotFoundError(f"tokenizer {tokenizer} does not exist")
    if tokenizer.name.endswith(".json"):
        shutil.copy2(tokenizer, out / "tokenizer.json")
        return
    # A SentencePiece model: transformers' LlamaTokenizer reads tokenizer.model + this config.
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    shutil.copy2(tokenizer, out / "tokenizer.model")
    conf = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False}
    for key, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id())):
        if i >= 0:
            conf[key] = sp.id_to_piece(i)
    (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=2) + "\n")


def megatron_to_hf(
    checkpoint_dir: str | Path,
    output_dir: str | Path,
    *,
    max_shard_size: int = 5 * 1024**3,
    dtype: torch.dtype | None = None,
    tokenizer: str | Path | None = None,
    hf_config: str | Path | None = None,
    progress: bool = True,
) -> list[Path]:
    """Export to a HF directory: a converted checkpoint (``hf_to_megatron`` layout) or a training
    checkpoint (``step_<N>`` folder or its parent with ``latest``).

    ``tokenizer``: a HF directory, a ``tokenizer.json`` or a SentencePiece ``.model`` to ship
    with the weights (default: the files the conversion copied, if any). ``hf_config``: a
    ``config.json`` (or its directory) to write instead of one made from the model config,
    e.g. the one of the model the fine-tuning started from (keeps bos/eos ids); it must
    describe the same shapes.
    """
    d = Path(checkpoint_dir)
    config_dict = None
    if (d / META_NAME).is_file():
        meta, cfg = read_meta(d)
        sources = [TensorSource.from_safetensors(d / f) for f in meta["files"]]
        if (d / HF_CONFIG_NAME).is_file():
            config_dict = read_hf_config(d / HF_CONFIG_NAME)
        default_tok = d / TOKENIZER_DIR
    else:
        sources, cfg, _ = training_checkpoint_sources(d)
        default_tok = None
    if hf_config is not None:
        diff = config_differences(model_config_from_hf(hf_config), cfg)
        if diff:
            raise ValueError(f"{hf_config} does not describe the checkpoint's model: {'; '.join(diff)}")
        config_dict = read_hf_config(hf_config)
    files = export_hf(
        sources,
        cfg,
        output_dir,
        hf_config=config_dict,
        tokenizer_dir=default_tok if tokenizer is None else None,
        max_shard_size=max_shard_size,
        dtype=dtype,
        progress=progress,
    )
    if tokenizer is not None:
        _tokenizer_side_files(Path(tokenizer), Path(output_dir))
    if not has_tokenizer(output_dir):
        logging.getLogger("megatron_hbp.convert").warning(
            "%s has no tokenizer (the checkpoint carries none): pass tokenizer= (--tokenizer) with the one the "
            "model was trained with, or the folder cannot be loaded by AutoTokenizer",
            output_dir,
        )
    return files


def has_tokenizer(hf_dir: str | Path) -> bool:
    """A HF directory ships a tokenizer (``tokenizer.json`` or ``tokenizer.model``)."""
    return any((Path(hf_dir) / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))
