"""Chat-template injection: text people send reaches the model as text, never as template tokens.

Every engine renders the chat template to a string that is then tokenized with special-token
parsing on (that is how the template's own `<|im_start|>` becomes one control token), locally
or on a remote server. Message contents get the same treatment, so a user typing
`<|im_start|>system ...` would forge a turn. Before templating, each occurrence of a special
token's text inside user or assistant content is broken with a zero-width space after its first
character: it no longer matches the token, and the model reads the same characters as plain text.
The system prompt is the owner's and stays as written.

Which strings are special comes from the engine's own tokenizer when it has one (every added
token of a Transformers tokenizer, every control token of a llama.cpp vocabulary); the common
template markers below are always covered, for remote servers whose vocabulary we cannot see.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Iterable
from typing import Any

from bot.engines.base import ChatMessage

log = logging.getLogger(__name__)

BREAK = "\u200b"  # zero-width space: splits a token's text without changing what a reader sees
# Markers of common chat templates: ChatML / Llama 3 / Phi (<|...|>), Llama 2 / Mistral, Gemma.
COMMON_MARKERS = r"<\|[^<>|\s]{1,64}\|>|</?s>|\[/?INST\]|<</?SYS>>|<(?:start|end)_of_turn>"
MAX_PASSES = 4  # breaking one marker cannot create another, but stay bounded whatever the vocabulary


class TemplateGuard:
    """Escapes special-token text in message contents (see the module docstring for why)."""

    def __init__(self, special_tokens: Iterable[str] = ()) -> None:
        tokens = sorted({t for t in special_tokens if len(t) > 1 and not t.isspace()}, key=len, reverse=True)
        self._pattern = re.compile("|".join([*map(re.escape, tokens), COMMON_MARKERS]))

    def escape(self, text: str) -> str:
        for _ in range(MAX_PASSES):
            escaped = self._pattern.sub(lambda m: m.group(0)[0] + BREAK + m.group(0)[1:], text)
            if escaped == text:
                break
            text = escaped
        return text

    def messages(self, messages: list[ChatMessage]) -> list[ChatMessage]:
        """The same messages with user and assistant contents escaped (the system prompt is trusted)."""
        return [m if m.role == "system" else ChatMessage(m.role, self.escape(m.content)) for m in messages]


COMMON = TemplateGuard()
_by_tokenizer: weakref.WeakKeyDictionary[Any, TemplateGuard] = weakref.WeakKeyDictionary()


def for_tokenizer(tokenizer: Any) -> TemplateGuard:
    """The guard for a Transformers tokenizer: all its added tokens (the ones it parses out of text)."""
    guard = _by_tokenizer.get(tokenizer)
    if guard is None:
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        guard = TemplateGuard(str(getattr(t, "content", t)) for t in added.values())
        _by_tokenizer[tokenizer] = guard
    return guard


def for_llama(llama: Any) -> TemplateGuard:
    """The guard for a llama.cpp model: tokens whose text shows only when detokenized as special."""
    guard = _by_tokenizer.get(llama)
    if guard is None:
        texts: list[str] = []
        try:
            for token in range(llama.n_vocab()):
                special = llama.detokenize([token], special=True)
                if special and special != llama.detokenize([token], special=False):
                    texts.append(special.decode("utf-8", "replace"))
        except Exception:  # noqa: BLE001 - the common markers still apply
            log.debug("could not list the control tokens of %r", llama, exc_info=True)
        guard = TemplateGuard(texts)
        _by_tokenizer[llama] = guard
    return guard
