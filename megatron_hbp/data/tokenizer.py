"""One small tokenizer interface over SentencePiece ``.model`` and Hugging Face ``tokenizer.json`` files.

Nothing is downloaded: a tokenizer is always a local file. Both kinds are picklable (they
pickle as their path and reload in the receiving process), so a ``Tokenizer`` can travel to
DataLoader or preprocessing worker processes.

Token ids are Python ``int``; ``encode_batch`` returns ``list[list[int]]`` (one list per text),
which is how both libraries hand results back without per-token Python work.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path

__all__ = [
    "Tokenizer",
    "SentencePieceTokenizer",
    "HFTokenizer",
    "TokenizerError",
    "load_tokenizer",
    "default_tokenizer_path",
    "file_sha256",
]


class TokenizerError(ValueError):
    """A tokenizer file is missing or cannot be loaded."""


def default_tokenizer_path() -> Path:
    """Path of the default tokenizer: the 32000-token SentencePiece model ``tokenizer.model.v1``
    that the ``mistral-common`` package ships (a real Llama-2-style vocabulary, Apache-2.0)."""
    try:
        root = resources.files("mistral_common")
    except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
        raise TokenizerError(
            "the default tokenizer comes from the mistral-common package, which is not installed; "
            "install it (`pip install --no-deps mistral-common==1.12.0`) or pass --tokenizer PATH"
        ) from e
    path = Path(str(root / "data" / "tokenizer.model.v1"))
    if not path.is_file():  # pragma: no cover - depends on the environment
        raise TokenizerError(f"mistral-common is installed but {path} is missing; pass --tokenizer PATH")
    return path


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (streamed in ``chunk``-byte blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Tokenizer:
    """Common interface. Subclasses set ``path``, ``name``, ``vocab_size``, ``bos_id``, ``eos_id``,
    ``pad_id`` (``int``; ``bos_id``/``eos_id`` are ``None`` when the vocabulary has no such token;
    ``pad_id`` falls back to ``eos_id``, then 0)."""

    path: str
    name: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:  # pragma: no cover - abstract
        """Token ids of each text (no BOS/EOS); one call for the whole list."""
        raise NotImplementedError

    def decode(self, ids) -> str:  # pragma: no cover - abstract
        """Text of a sequence of token ids (special tokens included where the library keeps them)."""
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:  # pragma: no cover - abstract
        """Id of a dedicated vocabulary entry spelled exactly ``token``, or ``None``."""
        raise NotImplementedError

    def __reduce__(self):
        # Reload from the file in the receiving process: cheap (< 0.1 s) and keeps pickles tiny.
        return (type(self), (self.path,))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` file. Encoding is single-threaded (``num_threads=1``) so that the
    preprocessing worker count is the only source of parallelism."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        self.path = str(path)
        self.name = Path(path).name
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"cannot load SentencePiece model {self.path}: {e}") from e
        self.vocab_size = int(self._sp.vocab_size())
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        pad = self._sp.pad_id()
        self.pad_id = pad if pad >= 0 else (self.eos_id if self.eos_id is not None else 0)
        self._unk = self._sp.unk_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # A list call costs ~2 ms of fixed overhead (SentencePiece sets up a thread pool), which
        # dominates a single sample's few pieces; per-text calls are ~0.2 ms each.
        if len(texts) < 32:
            return [self._sp.encode(t) for t in texts]
        return self._sp.encode(texts, num_threads=1)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        if i == self._unk and token != self._sp.id_to_piece(self._unk):
            return None
        return int(i)


_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "<|im_end|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>")


def _check_hf_json(path: str) -> None:
    """A JSON file that is valid JSON but not a Hugging Face ``tokenizer.json`` (e.g. Mistral's
    ``tekken.json``) gets an error saying so, not the library's misleading parse error."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read tokenizer file {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise TokenizerError(f"tokenizer file {path} is not valid JSON ({e})") from None
    if not isinstance(obj, dict) or "model" not in obj or not isinstance(obj["model"], dict):
        keys = ", ".join(repr(k) for k in list(obj)[:6]) if isinstance(obj, dict) else type(obj).__name__
        raise TokenizerError(
            f"{path} is not a Hugging Face tokenizer.json (no 'model' section; top-level keys: {keys}); "
            "pass the model's tokenizer.json (tokenizers library format) or a SentencePiece .model"
        )


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (``tokenizers`` library; no hub access).

    BOS/EOS/PAD come from a ``tokenizer_config.json`` in the same folder when there is one,
    else from the first conventional spelling present in the vocabulary (``<s>``, ``</s>``, ...).
    """

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _HF

        self.path = str(path)
        self.name = Path(path).parent.name + "/" + Path(path).name
        _check_hf_json(self.path)
        try:
            self._tok = _HF.from_file(self.path)
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise TokenizerError(f"cannot load Hugging Face tokenizer {self.path}: {e}") from e
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        cfg = self._read_config(Path(path).with_name("tokenizer_config.json"))
        self.bos_id = self._special(cfg.get("bos_token"), _BOS_NAMES)
        self.eos_id = self._special(cfg.get("eos_token"), _EOS_NAMES)
        pad = self._special(cfg.get("pad_token"), _PAD_NAMES)
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    @staticmethod
    def _read_config(path: Path) -> dict:
        if not path.is_file():
            return {}
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        # Entries may be plain strings or {"content": "..."} dicts.
        return {k: (v.get("content") if isinstance(v, dict) else v) for k, v in cfg.items()}

    def _special(self, configured, candidates) -> int | None:
        for name in ([configured] if isinstance(configured, str) else []) + list(candidates):
            i = self._tok.token_to_id(name)
            if i is not None:
                return int(i)
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        i = self._tok.token_to_id(token)
        return None if i is None else int(i)


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """Load a tokenizer file: ``*.json`` → :class:`HFTokenizer`, anything else (``*.model``,
    ``*.model.v1``, ...) → :class:`SentencePieceTokenizer`. ``None`` → :func:`default_tokenizer_path`.

    Raises :class:`TokenizerError` when the file is missing or unreadable.
    """
    if path is None:
        path = default_tokenizer_path()
    p = Path(path)
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            p = p / "tokenizer.json"
        elif (p / "tokenizer.model").is_file():
            p = p / "tokenizer.model"
        else:
            raise TokenizerError(f"tokenizer folder {p} holds neither tokenizer.json nor tokenizer.model")
    if not p.is_file():
        raise TokenizerError(
            f"tokenizer file {p} does not exist; pass a SentencePiece .model or a Hugging Face "
            "tokenizer.json (omit --tokenizer to use the default mistral-common model)"
        )
    if p.suffix == ".json":
        return HFTokenizer(p)
    return SentencePieceTokenizer(p)
