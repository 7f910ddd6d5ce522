"""Logits parity: small random LlamaForCausalLM / Qwen2ForCausalLM built with ``transformers``
(offline, config objects only) -> our converter -> the Megatron-Core model of
``megatron_hbp.mcore.build_model`` (CPU, fp32), packed THD input of several documents,
compared document by document with ``transformers`` run on each document alone.

The Megatron side runs in subprocesses (this file with ``--worker``): Megatron's parallel
state and the CPU shim are process-global. TP=2 runs as two gloo processes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")  # installed in the dev venv; see docs/convert.md

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    root = tmp_path_factory.mktemp("megatron")
    job = {arch: {"dir": str(r["dir"]), "docs": r["docs"]} for arch, r in hf_runs.items()}
    torch.save({"job": job, "padded": PADDED_LENGTHS}, root / "in.pt")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(root)],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    return {(arch, tp): torch.load(root / f"{arch}_tp{tp}.pt") for arch in job for tp in (1, 2)}


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


def test_exported_model_loads_in_transformers(hf_runs, tmp_path):
    """HF (transformers save_pretrained) -> Megatron TP 2 -> HF loads in transformers, same logits."""
    from megatron_hbp.convert import hf_to_megatron, megatron_to_hf

    run = hf_runs["qwen2"]
    hf_to_megatron(run["dir"], tmp_path / "mg", tp=2, progress=False)
    megatron_to_hf(tmp_path / "mg", tmp_path / "hf", max_shard_size=100_000, progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.tie_word_embeddings
    with torch.no_grad():
        got = model(input_ids=run["docs"][2][None]).logits[0]
    assert torch.equal(got, run["ref"][2])


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


def _worker(root: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    from megatron_hbp.mcore.shim import install_cpu_shim

    install_cpu_shim()
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_hbp.convert import load_hf_into_model, model_config_from_hf
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
            load_hf_into_model(model, hf_dir, model_cfg=cfg, tp_rank=tp_rank, tp_size=tp)
            tokens, params = _packed_params(inp["job"][arch]["docs"], inp["padded"])
            with torch.no_grad():
                logits = model(tokens[None], None, None, packed_seq_params=params)  # [1, T, Vp/tp]
            logits = logits.reshape(tokens.shape[0], -1).contiguous()
            if tp > 1:  # vocab-parallel shards -> the full vocabulary
                parts = [torch.empty_like(logits) for _ in range(tp)]
                torch.distributed.all_gather(
                    parts, logits, group=parallel_state.get_tensor_model_parallel_group()
                )
                logits = torch.cat(parts, dim=-1)
            if tp_rank == 0:
                torch.save(logits[:, : cfg.vocab_size].clone(), Path(root) / f"{arch}_tp{tp}.pt")
        parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
