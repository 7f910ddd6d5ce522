"""SFTDataset: random access by offset, hand-checked ids/masks, gzip, change detection, pickling."""

import multiprocessing as mp
import pickle

import numpy as np
import pytest

from megatron_hbp.data import DataChangedError, SFTDataset, load_tokenizer, preprocess
from megatron_hbp.data.testing import openai_line, sharegpt_line, write_jsonl

WORDS = ["System", "User", "Assistant", ":", "hi", "hello", "there", "be", "brief"]
# ids: <unk>=0 <s>=1 </s>=2 System=3 User=4 Assistant=5 :=6 hi=7 hello=8 there=9 be=10 brief=11
LINES = [
    openai_line(("user", "hi"), ("assistant", "hello there")),
    "",
    sharegpt_line(("system", "be brief"), ("human", "hi"), ("gpt", "hi")),
    openai_line(
        ("user", "hello hello hello hello"), ("assistant", "hi"), ("user", "hi"), ("assistant", "there")
    ),
]


@pytest.mark.parametrize("name", ["chat.jsonl", "chat.jsonl.gz"])
def test_items_by_hand(tmp_path, tok, name):
    path = write_jsonl(tmp_path / name, LINES)
    ds = SFTDataset(preprocess(path, tmp_path / "si.npz", tokenizer=tok, max_length=12).info)
    assert len(ds) == 3
    s = ds[0]
    assert s.input_ids.tolist() == [1, 4, 6, 7, 5, 6, 8, 9, 2] and s.input_ids.dtype == np.int32
    assert s.loss_mask.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1] and s.loss_mask.dtype == np.uint8
    assert ds[1].input_ids.tolist() == [1, 3, 6, 10, 11, 4, 6, 7, 5, 6, 7, 2]
    assert ds[1].loss_mask.tolist() == [0] * 10 + [1, 1]
    # 18 tokens truncated to 12: <s> User : hello x4 Assistant : [hi </s>] User
    last = ds[-1]
    assert last.index == 2 and last.input_ids.tolist() == [1, 4, 6, 8, 8, 8, 8, 5, 6, 7, 2, 4]
    assert last.loss_mask.tolist() == [0] * 9 + [1, 1, 0]
    with pytest.raises(IndexError):
        ds[3]


def test_every_item_matches_sample_info(tmp_path):
    # Real tokenizer, varied text: the per-sample path (SFTDataset) agrees with the batched one.
    rng = np.random.default_rng(1)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dogs;",
        "naïve",
        "café",
        "—",
        "東京",
        "tokens\n",
    ]
    lines = []
    for i in range(60):
        q = " ".join(rng.choice(words, rng.integers(1, 30)))
        a = " ".join(rng.choice(words, rng.integers(1, 80)))  # an empty answer is a bad line
        lines.append(
            openai_line(("system", "s"), ("user", q), ("assistant", a))
            if i % 3
            else sharegpt_line(("human", q), ("gpt", a))
        )
    path = write_jsonl(tmp_path / "c.jsonl", lines)
    for template in ("plain", "llama3", "chatml", "mistral"):
        info = preprocess(path, tmp_path / f"{template}.npz", template=template, max_length=100).info
        ds = SFTDataset(tmp_path / f"{template}.npz")
        for i in range(len(ds)):
            s = ds[i]
            assert len(s) == info.lengths[i] and int(s.loss_mask.sum()) == info.loss_tokens[i]


def test_changed_line_is_detected(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", LINES)
    ds = SFTDataset(preprocess(path, tmp_path / "si.npz", tokenizer=tok).info)
    # Same length, different content at line 3: offsets still valid, CRC differs.
    path.write_bytes(path.read_bytes().replace(b'"be brief"', b'"hi hi hi"'))
    assert len(ds[0]) == 9
    with pytest.raises(DataChangedError, match=r"chat\.jsonl:3: the line at byte \d+ differs"):
        ds[1]


def test_other_tokenizer_is_rejected(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", LINES)
    preprocess(path, tmp_path / "si.npz", tokenizer=tok)
    with pytest.raises(ValueError, match="is not the one sample info"):
        SFTDataset(tmp_path / "si.npz", tokenizer=load_tokenizer())


def test_length_mismatch_raises(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", LINES)
    info = preprocess(path, tmp_path / "si.npz", tokenizer=tok).info
    info.lengths[0] = 8  # as if the template had changed
    with pytest.raises(
        DataChangedError,
        match=r"chat\.jsonl:1: tokenised to 9 tokens / 3 loss tokens, sample info says 8 / 3",
    ):
        SFTDataset(info)[0]


def _lengths_in_worker(ds):
    return [len(ds[i]) for i in range(len(ds))]


@pytest.mark.slow
def test_pickled_dataset_in_worker_processes(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl.gz", LINES)
    ds = SFTDataset(preprocess(path, tmp_path / "si.npz", tokenizer=tok).info)
    ds[0]  # open a handle in the parent first: children must not share it
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._handles == {} and clone[2].input_ids.tolist() == ds[2].input_ids.tolist()
    with mp.get_context("spawn").Pool(2) as pool:
        got = pool.map(_lengths_in_worker, [ds, ds])
    assert got == [[9, 12, 18]] * 2
    # Each spawned process made its own unnamed copy; none has a name on disk.
    assert not (tmp_path / ".decompressed").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("si.")) == [
        "chat.jsonl.gz",
        "tok",
    ]
