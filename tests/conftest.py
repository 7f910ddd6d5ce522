"""Fixtures shared by the tests under tests/ (the repository-root conftest.py sets up Triton).

Multi-process launching lives in tests/distributed.py (plain functions: worker processes
import it too); fixtures that several test files need live here.
"""

import pytest

# The vocabulary of the small word-level tokenizer the data tests build (`tok`).
TOK_WORDS = ["System", "User", "Assistant", ":", "hi", "hello", "there", "be", "brief"]


@pytest.fixture
def tok(tmp_path):
    """A word-level tokenizer.json over TOK_WORDS (built in memory, < 0.1 s)."""
    from megatron_hbp.data.testing import write_wordlevel_tokenizer

    return write_wordlevel_tokenizer(tmp_path / "tok" / "tokenizer.json", TOK_WORDS)


@pytest.fixture
def gloo(tmp_path):
    """A one-process gloo group (world size 1) for code that needs torch.distributed."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
