"""Tokenizers and chat templates: loss masks checked by hand on small conversations."""

import logging
import pickle

import numpy as np
import pytest

from megatron_hbp.data import CompiledTemplate, TokenizerError, default_tokenizer_path, load_tokenizer
from megatron_hbp.data.templates import _LOGGED, get_template
from megatron_hbp.data.testing import write_wordlevel_tokenizer

WORDS = [
    "System",
    "User",
    "Assistant",
    ":",
    "hi",
    "hello",
    "there",
    "user",
    "assistant",
    "system",
    "be",
    "brief",
]
LLAMA3 = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CONV = [
    ("system", "be brief"),
    ("user", "hi"),
    ("assistant", "hello there"),
    ("user", "hi"),
    ("assistant", "hi"),
]


@pytest.fixture
def plain_tok(tmp_path):
    # ids: <unk>=0 <s>=1 </s>=2 System=3 User=4 Assistant=5 :=6 hi=7 hello=8 there=9 user=10
    #      assistant=11 system=12 be=13 brief=14
    return load_tokenizer(write_wordlevel_tokenizer(tmp_path / "plain" / "tokenizer.json", WORDS))


@pytest.fixture
def llama3_tok(tmp_path):
    # ids: <unk>=0 <|begin_of_text|>=1 <|start_header_id|>=2 <|end_header_id|>=3 <|eot_id|>=4
    #      System=5 User=6 Assistant=7 :=8 hi=9 hello=10 there=11 user=12 assistant=13 system=14 be=15 brief=16
    path = write_wordlevel_tokenizer(tmp_path / "l3" / "tokenizer.json", WORDS, special=["<unk>"] + LLAMA3)
    return load_tokenizer(path)


def test_plain_template_by_hand(plain_tok):
    ids, mask = CompiledTemplate("plain", plain_tok).encode(CONV)
    # <s> | System : be brief | User : hi | Assistant : | hello there </s> | User : hi | Assistant : | hi </s>
    assert ids.tolist() == [1, 3, 6, 13, 14, 4, 6, 7, 5, 6, 8, 9, 2, 4, 6, 7, 5, 6, 7, 2]
    assert mask.tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1]
    assert ids.dtype == np.int32 and mask.dtype == np.uint8


def test_llama3_template_with_dedicated_tokens(llama3_tok):
    compiled = CompiledTemplate("llama3", llama3_tok)
    assert compiled.text_markers == []
    ids, mask = compiled.encode(CONV[1:3])
    # <bot> <sh> user <eh> hi <eot> <sh> assistant <eh> hello there <eot>   ("\n\n" has no token here)
    assert ids.tolist() == [1, 2, 12, 3, 9, 4, 2, 13, 3, 10, 11, 4]
    assert mask.tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1]


def test_chatml_and_mistral_masks(plain_tok):
    ids, mask = CompiledTemplate("mistral", plain_tok).encode([("user", "hi"), ("assistant", "hello")])
    # <s> [INST] hi [/INST] hello </s>: "[INST]" is 3 unknown-word tokens in this vocab ([ INST ]).
    assert ids[0] == 1 and ids[-2:].tolist() == [8, 2]
    assert mask.tolist() == [0] * (len(ids) - 2) + [1, 1]
    _, mask = CompiledTemplate("chatml", plain_tok).encode([("user", "hi"), ("assistant", "hello")])
    assert mask.sum() == 1 + 3  # "hello" and the text "<|im_end|>" (< | im_end | >: 3 pre-tokens)


def test_markers_as_text_are_logged_once(caplog):
    tok = load_tokenizer()  # SentencePiece: no <|eot_id|> etc.
    _LOGGED.discard(("llama3", tok.path))
    with caplog.at_level(logging.WARNING, logger="megatron_hbp.data"):
        c1 = CompiledTemplate("llama3", tok)
        CompiledTemplate("llama3", tok)
    msgs = [r.getMessage() for r in caplog.records if "encoding them as text" in r.getMessage()]
    assert len(msgs) == 1 and "<|eot_id|>" in msgs[0]
    assert c1.text_markers == LLAMA3
    ids, mask = c1.encode([("user", "Hi"), ("assistant", "Hello there")])
    assert tok.decode(ids[mask == 1]) == "Hello there<|eot_id|>"
    assert tok.decode(ids[mask == 0]).startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")


def test_plain_with_sentencepiece_uses_bos_eos_ids():
    tok = load_tokenizer()
    ids, mask = CompiledTemplate("plain", tok).encode([("user", "Hi"), ("assistant", "Yes")])
    assert ids[0] == 1 and ids[-1] == 2  # <s> ... </s>
    assert ids[mask == 1].tolist() == tok.encode("Yes") + [2]


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown chat template 'nope'; choose one of"):
        get_template("nope")


def test_default_sentencepiece_tokenizer():
    path = default_tokenizer_path()
    assert path.name == "tokenizer.model.v1"
    tok = load_tokenizer(path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 1, 2, 2)
    assert tok.token_to_id("<s>") == 1 and tok.token_to_id("</s>") == 2
    assert tok.token_to_id("<|eot_id|>") is None
    text = "Hierarchical balance packing, 128K tokens."
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([text, "x"]) == [tok.encode(text), tok.encode("x")]
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(text) == tok.encode(text)


def test_hf_tokenizer_special_ids_from_config(tmp_path):
    write_wordlevel_tokenizer(
        tmp_path / "tokenizer.json",
        ["a", "b"],
        special=["<unk>", "<pad>", "<s>", "</s>", "<BOS>"],
        config={"bos_token": {"content": "<BOS>"}, "eos_token": "</s>"},
    )
    tok = load_tokenizer(tmp_path)  # a folder holding tokenizer.json works too
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (7, 4, 3, 1)
    assert tok.encode("a b zz") == [5, 6, 0]
    assert tok.token_to_id("<pad>") == 1 and tok.token_to_id("nope") is None
    assert pickle.loads(pickle.dumps(tok)).encode("b a") == [6, 5]


def test_missing_or_bad_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer file .*nope.model does not exist"):
        load_tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="cannot load SentencePiece model"):
        load_tokenizer(bad)
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text('{"model": {"type": "Nope"}}')
    with pytest.raises(TokenizerError, match="cannot load Hugging Face tokenizer"):
        load_tokenizer(bad_json)
    # Mistral's tekken.json is valid JSON but another format: say so (not a JSON syntax error).
    tekken = tmp_path / "tekken.json"
    tekken.write_text(
        '{"config": {"pattern": "x"}, "vocab": [{"rank": 0, "token_bytes": "AA=="}], "special_tokens": []}'
    )
    with pytest.raises(
        TokenizerError,
        match=r"tekken\.json is not a Hugging Face tokenizer\.json \(no 'model' section; top-level keys: 'config', 'vocab', 'special_tokens'\)",
    ):
        load_tokenizer(tekken)
    bad_json.write_text("{")
    with pytest.raises(TokenizerError, match="is not valid JSON"):
        load_tokenizer(bad_json)
