"""A deterministic toy engine for fast tests of the queue, service and adapters."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from bot.engines.base import CancelToken, ChatMessage, Engine, EngineError, GenerationParams, StreamStats

Script = Callable[[list[ChatMessage]], str]


def echo_script(messages: list[ChatMessage]) -> str:
    """Replies by echoing the last user message, naming how many turns it saw."""
    last = next(m.content for m in reversed(messages) if m.role == "user")
    turns = sum(1 for m in messages if m.role == "user")
    return f"You said: {last} (turn {turns})"


class ScriptedEngine(Engine):
    """Streams `script(messages)` word by word, `delay_s` per word; counts a word as a token.

    `fail_after` makes the stream raise after that many words (a model failing mid-reply).
    """

    def __init__(self, name: str = "scripted", script: Script = echo_script, delay_s: float = 0.0,
                 context_length: int = 2048, fail_after: int | None = None, load_s: float = 0.0,
                 fail_load: bool = False) -> None:
        self.name = name
        self.script = script
        self.delay_s = delay_s
        self._context_length = context_length
        self.fail_after = fail_after
        self.load_s = load_s
        self.fail_load = fail_load
        self._loaded = False
        self.prompts: list[list[ChatMessage]] = []  # every prompt it was asked to continue

    def load(self) -> None:
        time.sleep(self.load_s)
        if self.fail_load:
            raise EngineError(f"model {self.name!r} failed to load (scripted)")
        self._loaded = True

    def unload(self) -> None:
        self._loaded = False

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def context_length(self) -> int:
        return self._context_length

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        return sum(len(m.content.split()) + 4 for m in messages) + 2

    def stream_chat(self, messages: list[ChatMessage], params: GenerationParams, cancel: CancelToken,
                    stats: StreamStats | None = None) -> Iterator[str]:
        if not self._loaded:
            raise EngineError(f"model {self.name!r} is not loaded")
        self.prompts.append(list(messages))
        stats = stats if stats is not None else StreamStats()
        stats.prompt_tokens = self.count_tokens(messages)
        start = time.perf_counter()
        words = self.script(messages).split(" ")[: params.max_new_tokens]
        stats.finish_reason = "stop"
        for i, word in enumerate(words):
            if cancel.cancelled:
                stats.finish_reason = "cancelled"
                break
            if self.fail_after is not None and i >= self.fail_after:
                raise RuntimeError("scripted failure mid-reply")
            if self.delay_s:
                time.sleep(self.delay_s)
            if stats.first_token_s is None:
                stats.first_token_s = time.perf_counter() - start
            stats.completion_tokens += 1
            yield word if i == 0 else " " + word
        stats.total_s = time.perf_counter() - start
