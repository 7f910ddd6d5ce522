"""Convert LLaMA / Qwen2 checkpoints between Hugging Face and megatron-hbp's Megatron model.

  # HF directory (config.json + *.safetensors) -> Megatron rank files for TP=2
  python tools/convert_checkpoint.py hf-to-megatron --hf /models/Llama-3.1-8B --tp 2 --output ckpt/llama8b_tp2

  # back to a HF directory (config.json, sharded safetensors + index, tokenizer files)
  python tools/convert_checkpoint.py megatron-to-hf --checkpoint ckpt/llama8b_tp2 --output out/llama8b

  # a training checkpoint carries no tokenizer: pass the one the run trained with
  python tools/convert_checkpoint.py megatron-to-hf --checkpoint runs/x/checkpoints \\
      --tokenizer /models/Llama-3.1-8B --hf-config /models/Llama-3.1-8B --output out/llama8b_sft

Both directions stream one tensor at a time: peak host memory is about the largest tensor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from megatron_hbp.convert import hf_to_megatron, megatron_to_hf
from megatron_hbp.convert.checkpoint import has_tokenizer
from megatron_hbp.model_config import available_presets

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for u, m in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * m)
    return int(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-megatron", help="HF directory -> Megatron rank files (model_tpXX.safetensors)")
    a.add_argument("--hf", required=True, type=Path, help="HF model directory (config.json + *.safetensors)")
    a.add_argument(
        "--model-preset",
        help=f"model preset ({', '.join(available_presets())}) or YAML; optional when config.json exists "
        "(if both are given they must agree)",
    )
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of the output (default 1)")
    a.add_argument(
        "--vocab-divisor", type=int, default=128, help="pad vocab to a multiple of tp x this (128)"
    )
    a.add_argument("--output", required=True, type=Path, help="output directory")
    b = sub.add_parser("megatron-to-hf", help="converted/trained Megatron checkpoint -> HF directory")
    b.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="directory written by hf-to-megatron, or a training checkpoint (step_<N> folder, or the "
        "checkpoint dir with its 'latest' file)",
    )
    b.add_argument("--output", required=True, type=Path, help="output HF directory")
    b.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    b.add_argument("--dtype", choices=sorted(_DTYPES), help="cast the weights (default: keep their dtype)")
    b.add_argument(
        "--tokenizer",
        type=Path,
        help="tokenizer to ship: a HF directory, tokenizer.json or SentencePiece .model "
        "(default: the files hf-to-megatron copied)",
    )
    b.add_argument(
        "--hf-config",
        type=Path,
        help="config.json (or its directory) to write, e.g. the original model's (keeps bos/eos ids); "
        "default: the converted one, or one made from the model config",
    )
    for q in (a, b):
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        if args.command == "hf-to-megatron":
            meta = hf_to_megatron(
                args.hf,
                args.output,
                tp=args.tp,
                model_preset=args.model_preset,
                vocab_divisor=args.vocab_divisor,
                progress=not args.no_progress,
            )
            print(
                f"wrote {args.output}: tp={meta['tp']}, vocab {meta['vocab_size']} padded to "
                f"{meta['padded_vocab_size']}, files {', '.join(meta['files'])}"
            )
        else:
            files = megatron_to_hf(
                args.checkpoint,
                args.output,
                max_shard_size=_size(args.max_shard_size),
                dtype=_DTYPES[args.dtype] if args.dtype else None,
                tokenizer=args.tokenizer,
                hf_config=args.hf_config,
                progress=not args.no_progress,
            )
            print(f"wrote {args.output}: config.json + {len(files)} safetensors file(s)")
            if not has_tokenizer(args.output):
                print(
                    f"warning: {args.output} has no tokenizer (the checkpoint carries none); rerun with "
                    "--tokenizer PATH (the tokenizer the model was trained with)",
                    file=sys.stderr,
                )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
