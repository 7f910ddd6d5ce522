"""Logits parity: small random LlamaForCausalLM / Qwen2ForCausalLM built with ``transformers``
(offline, config objects only) -> our converter -> the Megatron-Core model of
``megatron_hbp.mcore.build_model`` (CPU, fp32), packed THD input of several documents,
compared document by document with ``transformers`` run on each document alone.

The Megatron side runs in subprocesses (this file with ``--worker``): Megatron's parallel
state and the CPU shim are process-global. TP=2 runs as two gloo processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import run_ranks

DOC_LENGTHS = [7, 1, 12, 5]
PADDED_LENGTHS = [8, 1, 14, 5]  # padding at the end of a document must not change its real tokens
TOL = 1e-5

LLAMA_KW = dict(  # GQA, untied, Llama-3 RoPE scaling with all three frequency bands in use
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
QWEN2_KW = dict(  # q/k/v biases, tied embeddings
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def _hf_model(arch: str):
    # Imported here, not at module level: the --worker subprocesses of this file do not need it.
    # transformers is pinned in the requirements (installed --no-deps, with regex): docs/convert.md.
    import transformers

    torch.manual_seed(0 if arch == "llama" else 1)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_KW))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**QWEN2_KW))
    with torch.no_grad():  # non-trivial norms and biases, larger weights than the default init
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.15)
    return model.float().eval()


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory):
    """Per arch: saved HF dir, the packed tokens, and transformers' logits of each document alone."""
    root = tmp_path_factory.mktemp("parity")
    g = torch.Generator().manual_seed(7)
    out = {}
    for arch in ("llama", "qwen2"):
        model = _hf_model(arch)
        d = root / arch
        model.save_pretrained(d)
        docs = [torch.randint(0, 300, (n,), generator=g) for n in DOC_LENGTHS]
        with torch.no_grad():
            ref = [model(input_ids=doc[None]).logits[0] for doc in docs]
        out[arch] = {"dir": d, "docs": docs, "ref": ref}
    return out


@pytest.fixture(scope="module")
def megatron_logits(hf_runs, tmp_path_factory):
    """``{(arch, tp): logits [T_padded, V]}`` from ONE 2-process launch (imports dominate the cost):
    TP=1 (rank 0: llama, rank 1: qwen2), then TP=2 for both."""
    from megatron_hbp.convert import hf_to_megatron

    root = tmp_path_factory.mktemp("megatron")
    job = {arch: {"dir": str(r["dir"]), "docs": r["docs"]} for arch, r in hf_runs.items()}
    # LLaMA at TP=2 goes through converted files (load_converted_into_model), the rest on the fly.
    hf_to_megatron(hf_runs["llama"]["dir"], root / "llama_tp2", tp=2, progress=False)
    job["llama"]["converted_tp2"] = str(root / "llama_tp2")
    torch.save({"job": job, "padded": PADDED_LENGTHS}, root / "in.pt")
    run_ranks(2, __file__, ["--worker", root], timeout=600)
    out = {(arch, tp): torch.load(root / f"{arch}_tp{tp}.pt") for arch in job for tp in (1, 2)}
    out["trained"] = (root / "trained", torch.load(root / "trained_logits.pt"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_logits_match_transformers_document_by_document(hf_runs, megatron_logits, arch, tp):
    run = hf_runs[arch]
    logits = megatron_logits[(arch, tp)]
    assert logits.shape == (sum(PADDED_LENGTHS), 300)
    start = 0
    for i, (n, padded, ref) in enumerate(zip(DOC_LENGTHS, PADDED_LENGTHS, run["ref"])):
        ours = logits[start : start + n]
        rel = ((ours - ref).abs().max() / ref.abs().max()).item()
        print(f"{arch} tp={tp} doc {i} (len {n}): max rel err {rel:.2e}")
        assert rel <= TOL, (arch, tp, i, rel)
        start += padded


def test_exported_model_loads_in_transformers_and_generates(hf_runs, tmp_path):
    """HF (transformers save_pretrained) -> Megatron TP 2 -> HF: transformers loads it, gives the
    same logits, and greedy generation matches the original model's."""
    import transformers

    from megatron_hbp.convert import hf_to_megatron, megatron_to_hf

    run = hf_runs["qwen2"]
    hf_to_megatron(run["dir"], tmp_path / "mg", tp=2, progress=False)
    megatron_to_hf(tmp_path / "mg", tmp_path / "hf", max_shard_size=100_000, progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.tie_word_embeddings
    prompt = run["docs"][2][None]
    with torch.no_grad():
        assert torch.equal(model(input_ids=prompt).logits[0], run["ref"][2])
        original = transformers.AutoModelForCausalLM.from_pretrained(run["dir"]).eval()
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        out = model.generate(prompt, **kw)
        assert out.shape == (1, prompt.shape[1] + 6)
        assert torch.equal(out, original.generate(prompt, **kw))


@pytest.mark.slow
def test_trained_checkpoint_exports_to_transformers_with_the_same_logits(hf_runs, megatron_logits, tmp_path):
    """Megatron weights saved by the trainer's layout (TP 2, random 'fine-tuned' values, Qwen2:
    biases + tied) -> megatron-to-hf -> transformers: same packed logits per document, generates."""
    import transformers

    from megatron_hbp.convert import megatron_to_hf

    ckpt, ours = megatron_logits["trained"]
    megatron_to_hf(ckpt, tmp_path / "hf", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(model).__name__ == "Qwen2ForCausalLM"
    start = 0
    with torch.no_grad():
        for i, (doc, padded) in enumerate(zip(hf_runs["qwen2"]["docs"], PADDED_LENGTHS)):
            ref = model(input_ids=doc[None]).logits[0]
            rel = ((ours[start : start + len(doc)] - ref).abs().max() / ref.abs().max()).item()
            print(f"exported doc {i}: max rel err {rel:.2e}")
            assert rel <= TOL, (i, rel)
            start += padded
        out = model.generate(
            hf_runs["qwen2"]["docs"][0][None], max_new_tokens=4, do_sample=False, pad_token_id=0
        )
    assert out.shape == (1, DOC_LENGTHS[0] + 4)


# ----------------------------------------------------------------------------- worker (subprocess)


def _packed_params(docs: list[torch.Tensor], padded: list[int]):
    from megatron_hbp.mcore.attention import HBPPackedSeqParams

    lengths = [len(d) for d in docs]
    tokens = torch.cat([torch.cat([d, d.new_zeros(p - len(d))]) for d, p in zip(docs, padded)])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    cu_pad = torch.tensor([0, *torch.tensor(padded).cumsum(0).tolist()], dtype=torch.int32)
    params = HBPPackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=cu_pad,
        cu_seqlens_kv_padded=cu_pad,
        max_seqlen_q=max(padded),
        max_seqlen_kv=max(padded),
        position_ids=torch.cat([torch.arange(p) for p in padded]),
        padded_lengths_host=list(padded),
        lengths_host=lengths,
    )
    return tokens, params


def _full_logits(model, docs, padded, tp: int) -> torch.Tensor:
    """fp32 ``[T_padded, Vp]``: the packed forward, vocab-parallel shards gathered."""
    from megatron.core import parallel_state

    tokens, params = _packed_params(docs, padded)
    with torch.no_grad():
        logits = model(tokens[None], None, None, packed_seq_params=params)  # [1, T, Vp/tp]
    logits = logits.reshape(tokens.shape[0], -1).contiguous()
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        torch.distributed.all_gather(parts, logits, group=parallel_state.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    return logits


def _worker(root: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    from megatron_hbp.mcore.shim import install_cpu_shim

    install_cpu_shim()
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_hbp.convert import load_converted_into_model, load_hf_into_model, model_config_from_hf
    from megatron_hbp.mcore.model import build_model

    inp = torch.load(Path(root) / "in.pt")
    archs = sorted(inp["job"])
    for tp in (1, 2):
        parallel_state.initialize_model_parallel(tp, 1)
        model_parallel_cuda_manual_seed(123)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        for arch in archs if tp == 2 else [archs[rank]]:
            hf_dir = inp["job"][arch]["dir"]
            cfg = model_config_from_hf(hf_dir)
            model = build_model(cfg, tp=tp, dtype=torch.float32, attention_backend="sdpa").eval()
            converted = inp["job"][arch].get(f"converted_tp{tp}")
            if converted:
                load_converted_into_model(model, converted, tp_rank=tp_rank)
            else:
                load_hf_into_model(model, hf_dir, model_cfg=cfg, tp_rank=tp_rank, tp_size=tp)
            logits = _full_logits(model, inp["job"][arch]["docs"], inp["padded"], tp)
            if tp_rank == 0:
                torch.save(logits[:, : cfg.vocab_size].clone(), Path(root) / f"{arch}_tp{tp}.pt")
        if tp == 2:  # a "fine-tuned" Qwen2 at TP 2 saved in the trainer's layout, for the export test
            cfg = model_config_from_hf(inp["job"]["qwen2"]["dir"])
            model = build_model(cfg, tp=tp, dtype=torch.float32, attention_backend="sdpa").eval()
            with torch.no_grad():
                for name, p in model.named_parameters():  # norms identical on both ranks, shards differ
                    g = torch.Generator().manual_seed(
                        len(name) + (0 if "layernorm" in name else 1000 * (tp_rank + 1))
                    )
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "layernorm" in name else 0.0))
            # the trainer's atomic layout (megatron_hbp.mcore.checkpoint): step_3.tmp, manifest, rename
            from megatron_hbp.checkpoint_files import begin_step, commit_step, file_entry

            if rank == 0:
                begin_step(Path(root) / "trained", 3)
            torch.distributed.barrier()
            step = Path(root) / "trained" / "step_3.tmp"
            torch.save({"steps_done": 3, "model": model.state_dict()}, step / f"rank_{rank:05d}.pt")
            entries = [None, None]
            torch.distributed.all_gather_object(
                entries, {f"rank_{rank:05d}.pt": file_entry(step / f"rank_{rank:05d}.pt")}
            )
            if rank == 0:
                meta = {"model": dataclasses.asdict(cfg), "tp": tp, "pp": 1, "world_size": 2}
                (step / "meta.json").write_text(json.dumps(meta))
                files = {"meta.json": file_entry(step / "meta.json"), **entries[0], **entries[1]}
                commit_step(Path(root) / "trained", 3, files, {})
            torch.distributed.barrier()
            logits = _full_logits(model, inp["job"]["qwen2"]["docs"], inp["padded"], tp)
            if tp_rank == 0:
                torch.save(logits[:, : cfg.vocab_size].clone(), Path(root) / "trained_logits.pt")
        parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
