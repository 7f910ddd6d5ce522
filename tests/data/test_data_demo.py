"""Embedded demo data: deterministic, licensed, and shaped like long-context SFT data."""

import json

import numpy as np
import pytest

from megatron_hbp.data import preprocess
from megatron_hbp.data.demo import NUM_LONG, NUM_SHORT, build_demo_data, ensure_demo_data


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo_data(tmp_path_factory.mktemp("demo"))


def test_deterministic_bytes(demo, tmp_path):
    again = build_demo_data(tmp_path / "again")
    assert again.read_bytes() == demo.read_bytes()


def test_cached_and_licensed(demo):
    stamp = demo.stat().st_mtime_ns
    assert ensure_demo_data(demo.parent) == demo and demo.stat().st_mtime_ns == stamp  # not rebuilt
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" in (demo.parent / "LICENSE-PSF.txt").read_text()
    assert "Python Software Foundation License" in (demo.parent / "README.txt").read_text()


def test_both_formats_present(demo):
    keys = [next(iter(json.loads(line))) for line in demo.read_text(encoding="utf-8").splitlines()]
    assert len(keys) == NUM_SHORT + NUM_LONG
    assert set(keys) == {"messages", "conversations"} and 0.2 < keys.count("conversations") / len(keys) < 0.45


def test_length_mix_with_the_real_tokenizer(demo, tmp_path):
    info = preprocess(demo, tmp_path / "si.npz", template="plain").info
    lengths = np.asarray(info.lengths)
    long = lengths[lengths >= 8192]
    short = lengths[lengths < 8192]
    # A few dozen long documents inside 8K-64K tokens, a few thousand short chats.
    assert long.size == NUM_LONG and long.max() <= 65536
    assert short.size == NUM_SHORT and short.min() >= 10 and short.max() >= 2000
    assert np.all(info.loss_tokens > 0)
