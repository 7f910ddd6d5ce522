"""Training from a Hugging Face folder (issue 8): ``init_from`` weights, shapes and tokenizer.

The module fixture saves a small random ``LlamaForCausalLM`` (``transformers``, offline) with a
SentencePiece tokenizer and a ChatML chat template, then runs this file as a plain one-process
trainer (``python tests/mcore/test_train_init_hf.py WORKDIR``): the trainer builds the sample info
with the shipped tokenizer, takes the shapes from ``config.json``, trains one plan step from
the HF weights and saves, then resumes for one more step. The tests compare with
``transformers`` independently: the weights the first step starts from, and its loss.
Only stdlib + pytest at module level: the worker run does not need transformers.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.distributed import run_command

ROOT = Path(__file__).resolve().parents[2]
CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA_KW = dict(
    vocab_size=32000,  # the SentencePiece tokenizer shipped with it (mistral v1, 32000 tokens)
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)


# ----------------------------------------------------------------------------- worker (subprocess)


def _worker(work: Path) -> None:
    import torch

    from megatron_hbp.mcore.config import (
        CheckpointConfig,
        DataConfig,
        OptimizerConfig,
        PlanSource,
        TrainConfig,
    )
    from megatron_hbp.mcore.train import _shutdown, run

    def cfg(**kw):
        return TrainConfig(
            init_from=str(work / "hf"),  # model unset: shapes from config.json
            data=DataConfig(
                sample_info=str(work / "info.npz"), paths=[str(work / "data.jsonl")], build_if_missing=True,
                num_workers=0,
            ),
            plan=PlanSource(path=str(work / "plan"), config=str(work / "plan.yaml")),
            optimizer=OptimizerConfig(lr=1e-2, warmup_steps=0),
            dtype="fp32",
            attention_backend="sdpa",
            **kw,
        )  # fmt: skip

    grabbed = {}

    def grab(step, model):  # before the optimizer touches the weights of this step
        grabbed[step] = {n: p.detach().clone() for n, p in model.module.named_parameters()}

    first = run(
        cfg(max_steps=1, checkpoint=CheckpointConfig(dir=str(work / "ckpt"), save_at_end=True)), on_grads=grab
    )
    second = run(cfg(max_steps=2, checkpoint=CheckpointConfig(load=str(work / "ckpt"))), on_grads=grab)
    torch.save(grabbed, work / "params.pt")
    (work / "result.json").write_text(json.dumps({"first": first, "second": second}))
    _shutdown()


# ----------------------------------------------------------------------------- fixture


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import torch
    import transformers

    from megatron_hbp.data import default_tokenizer_path

    w = tmp_path_factory.mktemp("init_hf")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_KW))
    with torch.no_grad():  # far from the trainer's own random init (std 0.02, unit norms)
        for name, p in hf.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0.0, 0.1)
    hf = hf.float().eval()
    hf.save_pretrained(w / "hf")
    shutil.copy(default_tokenizer_path(), w / "hf" / "tokenizer.model")
    (w / "hf" / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML_JINJA}))

    sys.path.insert(0, str(ROOT / "tests" / "mcore"))
    from test_train_dist import write_chat_jsonl

    write_chat_jsonl(w / "data.jsonl", 24)
    (w / "plan.yaml").write_text(
        "groups:\n  - {pack_length: 256, cp: 1}\nworld_size: 1\nmicro_batches_per_step: 2\nseed: 0\n"
    )
    proc = run_command([sys.executable, __file__, w], timeout=300)  # tests/distributed.py
    return {"dir": w, "hf": hf, "stdout": proc.stdout, **json.loads((w / "result.json").read_text())}


def _hf_from_megatron(params: dict, cfg) -> dict:
    """Megatron (TP 1) parameters -> HF names, through the converter's inverse mapping."""
    from megatron_hbp.convert.mapping import tensor_maps, to_hf

    out = {}
    for tm in tensor_maps(cfg):
        for name, t in zip(tm.hf, to_hf(tm, [params[tm.megatron]], cfg)):
            out[name] = t
    return out


@pytest.mark.slow  # one trainer subprocess (~25 s, shared by the module)
def test_first_step_starts_from_the_hf_weights(trained):
    import torch

    from megatron_hbp.model_config import load_model_config

    cfg = load_model_config(trained["dir"] / "hf")
    got = _hf_from_megatron(torch.load(trained["dir"] / "params.pt")[0], cfg)
    ref = trained["hf"].state_dict()
    assert set(got) == {k for k in ref if "rotary" not in k}
    for name, t in got.items():
        assert torch.equal(t, ref[name]), name
    assert "[hbp] initial weights from" in trained["stdout"]


@pytest.mark.slow  # one trainer subprocess (~25 s, shared by the module)
def test_first_step_loss_equals_transformers(trained):
    """The plan's first step: Σ CE over its loss tokens / their count, with transformers run on
    each document alone, equals the trainer's stable loss (fp32)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from megatron_hbp import load_plan
    from megatron_hbp.data import SFTDataset

    w = trained["dir"]
    ds = SFTDataset(str(w / "info.npz"))
    step = load_plan(w / "plan" / "plan.npz").step(0)
    total, count = 0.0, 0
    for rep in step.replicas:
        for mb in rep.micro_batches:
            for pack in mb.packs:
                for i in pack.sample_indices.tolist():
                    s = ds[i]
                    ids = torch.as_tensor(np.asarray(s.input_ids, np.int64))
                    mask = torch.as_tensor(np.asarray(s.loss_mask)[1:] > 0)
                    with torch.no_grad():
                        logits = trained["hf"](input_ids=ids[None]).logits[0, :-1].float()
                    ce = F.cross_entropy(logits, ids[1:], reduction="none")
                    total += float(ce[mask].double().sum())
                    count += int(mask.sum())
    rec = trained["first"][0]
    assert rec["step"] == 0 and rec["loss_tokens"] == count > 0
    assert abs(rec["loss"] - total / count) / (total / count) <= 1e-5, (rec["loss"], total / count)


@pytest.mark.slow  # one trainer subprocess (~25 s, shared by the module)
def test_tokenizer_and_chat_template_come_from_the_hf_folder(trained):
    from megatron_hbp.data import load_sample_info

    info = load_sample_info(trained["dir"] / "info.npz")
    assert Path(info.tokenizer) == trained["dir"] / "hf" / "tokenizer.model"
    assert info.template == "chatml"  # matched from the shipped Jinja template (default: llama3)


@pytest.mark.slow  # one trainer subprocess (~25 s, shared by the module)
def test_resume_keeps_the_checkpoint_not_init_from(trained):
    import torch

    assert [r["step"] for r in trained["second"]] == [1]
    assert "init_from" in trained["stdout"] and "not loaded (the checkpoint wins)" in trained["stdout"]
    params = torch.load(trained["dir"] / "params.pt")
    name = "embedding.word_embeddings.weight"
    # step 1 starts from step 0's update (the checkpoint), not from the HF weights again
    assert not torch.equal(params[1][name], params[0][name])


# ----------------------------------------------------------------------------- no training


def test_load_model_config_from_hf_folder_config_json_and_converted(tmp_path):
    import torch

    from megatron_hbp.configio import ConfigError
    from megatron_hbp.convert import hf_to_megatron
    from megatron_hbp.model_config import load_model_config

    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                    "num_hidden_layers": 3, "hidden_size": 48, "intermediate_size": 80, "num_attention_heads": 6,
                    "num_key_value_heads": 2, "vocab_size": 301, "rope_theta": 12345.0, "rms_norm_eps": 1e-6,
                    "tie_word_embeddings": True})
    )  # fmt: skip
    for arg in (src, src / "config.json", str(src)):
        c = load_model_config(arg)
        assert (c.num_layers, c.hidden_size, c.ffn_hidden_size, c.num_attention_heads, c.num_query_groups) == (
            3, 48, 80, 6, 2,
        )  # fmt: skip
        assert (c.vocab_size, c.rope_theta, c.norm_epsilon, c.tie_embeddings) == (301, 12345.0, 1e-6, True)
    # a converted folder: shapes from its convert_meta.json
    from safetensors.torch import save_file

    from megatron_hbp.convert.mapping import hf_shapes

    g = torch.Generator().manual_seed(0)
    cfg = load_model_config(src)
    save_file(
        {k: torch.randn(s, generator=g) for k, s in hf_shapes(cfg).items()}, str(src / "model.safetensors")
    )
    hf_to_megatron(src, tmp_path / "conv", tp=1, progress=False)
    assert load_model_config(tmp_path / "conv") == cfg
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither config.json"):
        load_model_config(tmp_path / "empty")
    with pytest.raises(ConfigError, match="not found"):
        load_model_config(tmp_path / "nothing" / "config.json")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        load_model_config(bad)


def test_init_from_bad_folders_fail_before_training(tmp_path):
    from megatron_hbp.mcore.config import DataConfig, ParallelConfig, PlanSource, TrainConfig
    from megatron_hbp.mcore.train import TrainSetupError, check_init_from
    from megatron_hbp.model_config import load_model_config

    def cfg(init_from, model=None, **kw):
        return TrainConfig(
            model=model,
            init_from=str(init_from),
            data=DataConfig(sample_info="x.npz"),
            plan=PlanSource(path="p"),
            **kw,
        )

    tiny = load_model_config("tiny")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainSetupError, match="neither a Hugging Face model folder"):
        check_init_from(cfg(tmp_path / "empty"), tiny)
    with pytest.raises(TrainSetupError, match="folder not found"):
        check_init_from(cfg(tmp_path / "missing"), tiny)
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **LLAMA_KW}))
    with pytest.raises(TrainSetupError, match="no \\*.safetensors"):
        check_init_from(cfg(d), tiny)
    (d / "model.safetensors").write_bytes(b"")  # existence only: shapes are compared first
    with pytest.raises(TrainSetupError, match="model 'tiny' disagrees with init_from"):
        check_init_from(cfg(d, model="tiny"), tiny)
    check_init_from(cfg(d), load_model_config(d))  # shapes from the folder itself: fine
    from megatron_hbp.configio import ConfigError

    with pytest.raises(ConfigError, match="parallel.pp=2: PP is not supported with HBP plans yet"):
        ParallelConfig(pp=2)  # refused when the config is read (issue 15), before init_from is looked at
    conv = tmp_path / "conv"
    conv.mkdir()
    (conv / "convert_meta.json").write_text(json.dumps({"tp": 2}))
    with pytest.raises(TrainSetupError, match="converted for tp=2 but parallel.tp=1"):
        check_init_from(cfg(conv), tiny)
    with pytest.raises(ConfigError, match="set model"):
        TrainConfig(data=DataConfig(sample_info="x.npz"), plan=PlanSource(path="p"))


def test_tokenizer_and_template_resolution(tmp_path):
    from megatron_hbp.data import default_tokenizer_path
    from megatron_hbp.mcore.config import DataConfig, PlanSource, TrainConfig
    from megatron_hbp.mcore.train import TrainSetupError, resolve_tokenizer_and_template, template_from_jinja

    assert template_from_jinja("<|start_header_id|>{{ role }}<|end_header_id|>") == "llama3"
    assert template_from_jinja(CHATML_JINJA) == "chatml"
    assert template_from_jinja("[INST] {{ m }} [/INST]") == "mistral"
    assert template_from_jinja("{{ m }}") is None

    def cfg(init_from=None, **data):
        return TrainConfig(
            model="tiny",
            init_from=init_from,
            data=DataConfig(sample_info="x.npz", **data),
            plan=PlanSource(path="p"),
        )

    assert resolve_tokenizer_and_template(cfg()) == (str(default_tokenizer_path()), "llama3")
    d = tmp_path / "hf"
    d.mkdir()
    with pytest.raises(TrainSetupError, match="no tokenizer.json or tokenizer.model"):
        resolve_tokenizer_and_template(cfg(str(d)))
    (d / "tokenizer.json").write_text("{}")
    assert resolve_tokenizer_and_template(cfg(str(d))) == (str(d / "tokenizer.json"), "llama3")
    (d / "chat_template.jinja").write_text("{{ plain }}")
    with pytest.raises(TrainSetupError, match="set data.template"):
        resolve_tokenizer_and_template(cfg(str(d)))
    # explicit settings win over the folder
    assert resolve_tokenizer_and_template(cfg(str(d), tokenizer="t.model", template="plain")) == (
        "t.model",
        "plain",
    )
    # a converted folder keeps the tokenizer files in tokenizer/
    c = tmp_path / "conv"
    (c / "tokenizer").mkdir(parents=True)
    (c / "convert_meta.json").write_text("{}")
    (c / "tokenizer" / "tokenizer.model").write_bytes(b"")
    (c / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML_JINJA}))
    assert resolve_tokenizer_and_template(cfg(str(c))) == (str(c / "tokenizer" / "tokenizer.model"), "chatml")


def test_cp_seam_passes_the_configured_backend(monkeypatch, capsys):
    import megatron_hbp.cp
    from megatron_hbp.mcore import cp_seam

    assert [cp_seam.cp_backend(b) for b in ("auto", "sdpa", "varlen")] == ["auto", "sdpa", "varlen"]
    with pytest.raises(ValueError, match="unknown"):
        cp_seam.cp_backend("flash")
    monkeypatch.setattr(cp_seam, "_TE_NOTICE_SHOWN", False)
    assert cp_seam.cp_backend("te") == "auto" and cp_seam.cp_backend("te") == "auto"
    assert capsys.readouterr().out.count("Transformer Engine's context parallelism is not used") == 1
    seen = []
    monkeypatch.setattr(megatron_hbp.cp, "cp_attention", lambda *a, **kw: seen.append(("ag", kw["backend"])))
    monkeypatch.setattr(
        megatron_hbp.cp, "ulysses_attention", lambda *a, **kw: seen.append(("u", kw["backend"]))
    )
    for b in ("sdpa", "varlen", "te", "auto"):
        cp_seam.cp_attention(None, None, None, None, None, None, backend=b)  # default: Ulysses
        cp_seam.cp_attention(None, None, None, None, None, None, backend=b, cp_impl="allgather")
    assert seen == [(impl, b) for b in ("sdpa", "varlen", "auto", "auto") for impl in ("u", "ag")]
    with pytest.raises(ValueError, match="cp_impl 'ring' unknown"):
        cp_seam.cp_attention(None, None, None, None, None, None, cp_impl="ring")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
