"""Chat templates: a conversation → token ids and a loss mask.

A template turns a conversation into a list of *pieces*, each a marker (like ``<|eot_id|>``)
or a text, with a loss-mask bit. Only assistant content and the assistant turn's end marker
carry mask 1. :class:`CompiledTemplate` binds a template to a tokenizer:

- a marker the tokenizer has as a dedicated vocabulary entry becomes that one token id;
  the generic ``<bos>`` / ``<eos>`` markers map to the tokenizer's BOS / EOS;
- a marker it lacks is encoded as text (its spelling; ``<bos>`` becomes nothing and ``<eos>``
  the text ``</s>``), and this is logged once per (template, tokenizer);
- adjacent text pieces with the same mask bit are merged, then every text piece is encoded
  on its own (no BOS/EOS) and the ids are concatenated.

So the token sequence of a sample is a pure function of (conversation, template, tokenizer),
which preprocessing (lengths only) and :class:`~megatron_hbp.data.dataset.SFTDataset` (ids)
both rely on.

Templates (``TEMPLATES``):
  ``plain``   ``<bos>System: s\\n\\nUser: u\\n\\nAssistant: ⟨a<eos>⟩...`` (works with any tokenizer)
  ``llama3``  Llama-3 headers ``<|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>``
  ``chatml``  ``<|im_start|>role\\n content <|im_end|>\\n``
  ``mistral`` ``<bos>[INST] u [/INST]⟨a<eos>⟩`` (system text prepended to the first user turn)
where ⟨...⟩ marks the tokens with loss mask 1.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from megatron_hbp.data.tokenizer import Tokenizer

__all__ = ["TEMPLATES", "TEMPLATE_VERSION", "CompiledTemplate", "get_template", "render_pieces"]

log = logging.getLogger("megatron_hbp.data")

# Bump when any template's output changes: it is part of the sample-info fingerprint.
TEMPLATE_VERSION = 1

BOS, EOS = "<bos>", "<eos>"
# Text used when the tokenizer has no dedicated token for a marker.
_FALLBACK_TEXT = {BOS: "", EOS: "</s>"}

# A piece: (is_marker, value, mask_bit).
Piece = tuple[bool, str, int]


def _plain(conv) -> list[Piece]:
    out: list[Piece] = [(True, BOS, 0)]
    for role, content in conv:
        if role == "assistant":
            out += [(False, "Assistant: ", 0), (False, content, 1), (True, EOS, 1)]
        else:
            out.append((False, ("System: " if role == "system" else "User: ") + content + "\n\n", 0))
    return out


def _llama3(conv) -> list[Piece]:
    out: list[Piece] = [(True, "<|begin_of_text|>", 0)]
    for role, content in conv:
        m = int(role == "assistant")
        out += [
            (True, "<|start_header_id|>", 0),
            (False, role, 0),
            (True, "<|end_header_id|>", 0),
            (False, "\n\n", 0),
            (False, content, m),
            (True, "<|eot_id|>", m),
        ]
    return out


def _chatml(conv) -> list[Piece]:
    out: list[Piece] = []
    for role, content in conv:
        m = int(role == "assistant")
        out += [
            (True, "<|im_start|>", 0),
            (False, role + "\n", 0),
            (False, content, m),
            (True, "<|im_end|>", m),
            (False, "\n", 0),
        ]
    return out


def _mistral(conv) -> list[Piece]:
    out: list[Piece] = [(True, BOS, 0)]
    system = ""
    for role, content in conv:
        if role == "system":
            system += content + "\n\n"
        elif role == "user":
            out.append((False, "[INST] " + system + content + " [/INST]", 0))
            system = ""
        else:
            out += [(False, content, 1), (True, EOS, 1)]
    return out


TEMPLATES: dict[str, Callable[[list[tuple[str, str]]], list[Piece]]] = {
    "plain": _plain,
    "llama3": _llama3,
    "chatml": _chatml,
    "mistral": _mistral,
}


def get_template(name: str):
    """The piece function of template ``name``; ``ValueError`` listing the choices otherwise."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; choose one of {sorted(TEMPLATES)}") from None


_LOGGED: set[tuple[str, str]] = set()


class CompiledTemplate:
    """A template bound to a tokenizer (markers resolved once).

    ``render(conv)`` returns ``(items, masks)``: ``items[j]`` is a token id (``int``) or a text
    (``str``) to encode, ``masks[j]`` its loss-mask bit (0/1), adjacent same-mask texts merged.
    """

    def __init__(self, name: str, tokenizer: Tokenizer, *, log_fallback: bool = True):
        self.name = name
        self.tokenizer = tokenizer
        self._fn = get_template(name)
        self._marker: dict[str, int | str] = {}
        self.text_markers: list[str] = []
        probe = self._fn([("system", "s"), ("user", "u"), ("assistant", "a")])
        for is_marker, value, _ in probe:
            if is_marker and value not in self._marker:
                self._marker[value] = self._resolve(value)
        key = (name, tokenizer.path)
        if self.text_markers and log_fallback and key not in _LOGGED:
            _LOGGED.add(key)
            log.warning(
                "template %r: tokenizer %s has no dedicated token for %s; encoding them as text",
                name,
                tokenizer.name,
                ", ".join(self.text_markers),
            )

    def _resolve(self, marker: str) -> int | str:
        if marker == BOS:
            tid = self.tokenizer.bos_id
        elif marker == EOS:
            tid = self.tokenizer.eos_id
        else:
            tid = self.tokenizer.token_to_id(marker)
        if tid is not None:
            return int(tid)
        self.text_markers.append(marker)
        return _FALLBACK_TEXT.get(marker, marker)

    def render(self, conv: list[tuple[str, str]]) -> tuple[list[int | str], list[int]]:
        items: list[int | str] = []
        masks: list[int] = []
        for is_marker, value, m in self._fn(conv):
            if is_marker:
                resolved = self._marker.get(value)
                if resolved is None:  # a marker the probe conversation did not show
                    resolved = self._marker[value] = self._resolve(value)
                value = resolved
            if isinstance(value, str):
                if not value:
                    continue
                if items and isinstance(items[-1], str) and masks[-1] == m:
                    items[-1] += value
                    continue
            items.append(value)
            masks.append(m)
        return items, masks

    def encode(self, conv: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids ``int32 [L]`` and loss mask ``uint8 [L]`` of one conversation (not truncated)."""
        items, masks = self.render(conv)
        texts = [x for x in items if isinstance(x, str)]
        encoded = iter(self.tokenizer.encode_batch(texts)) if texts else iter(())
        ids: list[int] = []
        mask_parts = []
        for x, m in zip(items, masks):
            if isinstance(x, str):
                part = next(encoded)
                ids.extend(part)
                mask_parts.append(np.full(len(part), m, np.uint8))
            else:
                ids.append(x)
                mask_parts.append(np.full(1, m, np.uint8))
        mask = np.concatenate(mask_parts) if mask_parts else np.zeros(0, np.uint8)
        return np.asarray(ids, dtype=np.int32), mask


def render_pieces(name: str, conv) -> list[Piece]:
    """The raw pieces of template ``name`` for ``conv`` (markers unresolved); for docs and tests."""
    return get_template(name)(conv)
