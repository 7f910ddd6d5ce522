"""SFT chat data: JSONL readers, tokenizers, chat templates, sample info, random-access dataset.

NumPy and tokenizer libraries only (no torch). Public API:

- :func:`load_tokenizer`, :func:`default_tokenizer_path`, :class:`Tokenizer`
- :func:`parse_line`, :func:`resolve_data_paths`, :class:`DataError`
- :data:`TEMPLATES`, :class:`CompiledTemplate`
- :func:`preprocess` (build/reuse sample info), :func:`load_sample_info`, :class:`SampleInfo`
- :class:`SFTDataset`, :class:`Sample`, :class:`DataChangedError`
- :func:`megatron_hbp.data.demo.ensure_demo_data`
"""

from megatron_hbp.data.dataset import DataChangedError, Sample, SFTDataset
from megatron_hbp.data.formats import DataError, LineError, parse_line, resolve_data_paths
from megatron_hbp.data.preprocess import PreprocessResult, preprocess
from megatron_hbp.data.sample_info import SampleInfo, SkippedRecord, load_sample_info, save_sample_info
from megatron_hbp.data.summary import format_summary, log2_histogram, plot_histogram
from megatron_hbp.data.templates import TEMPLATES, CompiledTemplate
from megatron_hbp.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    default_tokenizer_path,
    load_tokenizer,
)

__all__ = [
    "CompiledTemplate",
    "DataChangedError",
    "DataError",
    "HFTokenizer",
    "LineError",
    "PreprocessResult",
    "Sample",
    "SampleInfo",
    "SentencePieceTokenizer",
    "SFTDataset",
    "SkippedRecord",
    "TEMPLATES",
    "Tokenizer",
    "TokenizerError",
    "default_tokenizer_path",
    "format_summary",
    "load_sample_info",
    "load_tokenizer",
    "log2_histogram",
    "parse_line",
    "plot_histogram",
    "preprocess",
    "resolve_data_paths",
    "save_sample_info",
]
