#!/usr/bin/env python3
r"""Compute the sample info (.npz: tokens and loss tokens per sample, where each sample lives)
of chat JSONL data. Thin CLI over ``megatron_hbp.data.preprocess``; see docs/data.md.

example:
  python tools/preprocess_lengths.py --data data/chats/ --tokenizer tokenizer.json \
      --template llama3 --max-length 131072 --workers 16 --on-error skip \
      --output cache/chats.npz --plot cache/chats_lengths.png"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_hbp.data import TEMPLATES, DataError, TokenizerError, format_summary, plot_histogram, preprocess
from megatron_hbp.data.demo import ensure_demo_data
from megatron_hbp.data.preprocess import WorkerError


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the option help, the description (with its example) printed as written."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preprocess_lengths.py",
        description=__doc__,
        formatter_class=_Formatter,
        epilog=(
            "Input lines are OpenAI {'messages': [{'role', 'content'}]} or ShareGPT "
            "{'conversations': [{'from', 'value'}]} objects. A rerun with unchanged inputs (files' size "
            "and mtime, tokenizer, template, max length, policies) reuses the output; any change recomputes it."
        ),
    )
    p.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="JSONL / JSONL.gz files, directories (searched recursively) or glob patterns; "
        "default: the embedded demo data (built under cache/demo on first use)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="SentencePiece .model or Hugging Face tokenizer.json; default: mistral-common's tokenizer.model.v1",
    )
    p.add_argument(
        "--output", required=True, metavar="PATH.npz", help="sample-info file to write (atomically)"
    )
    p.add_argument("--template", default="plain", choices=sorted(TEMPLATES), help="chat template")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes")
    p.add_argument(
        "--chunk-bytes", type=int, default=1 << 20, metavar="B", help="input bytes per work unit of a worker"
    )
    p.add_argument("--max-length", type=int, default=None, metavar="L", help="max tokens per sample")
    p.add_argument(
        "--overflow",
        default="truncate",
        choices=["truncate", "drop"],
        help="what to do with samples longer than --max-length",
    )
    p.add_argument(
        "--on-error",
        default="raise",
        choices=["raise", "skip"],
        help="bad lines: stop with an error naming file and line, or skip them (counted, listed in the .npz)",
    )
    p.add_argument("--plot", metavar="FILE.png", help="also save the length histogram as a PNG")
    p.add_argument(
        "--content-hash", action="store_true", help="fingerprint files by SHA-256 instead of mtime"
    )
    p.add_argument("--force", action="store_true", help="recompute even when the cached output matches")
    p.add_argument(
        "--no-tokens",
        action="store_true",
        help="write the sample info only (lengths), not the token files (NAME.tokens.bin/.idx, "
        "NAME.loss_mask.bin/.idx, NAME.tokens.json) the trainer reads by mmap",
    )
    p.add_argument("--no-progress", action="store_true", help="never show the progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    data = args.data if args.data else [str(ensure_demo_data())]
    try:
        result = preprocess(
            data,
            args.output,
            tokenizer=args.tokenizer,
            template=args.template,
            workers=args.workers,
            max_length=args.max_length,
            on_error=args.on_error,
            overflow=args.overflow,
            content_hash=args.content_hash,
            force=args.force,
            progress=False if args.no_progress else None,
            chunk_bytes=args.chunk_bytes,
            tokens=not args.no_tokens,
        )
    except (DataError, TokenizerError, WorkerError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.reused:
        print(f"inputs unchanged: reusing cached {args.output} (fingerprint {result.info.fingerprint})")
    elif result.changes:
        print("recomputed: " + "; ".join(result.changes))
    print(format_summary(result.info))
    if args.plot:
        plot_histogram(result.info, args.plot)
        print(f"histogram written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
