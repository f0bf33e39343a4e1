"""An engine wrapper that records every prompt and the engine's own stream stats (tests, benchmarks)."""

from __future__ import annotations

from collections.abc import Iterator

from bot.engines.base import CancelToken, ChatMessage, Engine, GenerationParams, StreamStats


class RecordingEngine(Engine):
    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.name = inner.name
        self.prompts: list[list[ChatMessage]] = []
        self.runs: list[StreamStats] = []

    @property
    def supports_concurrency(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.inner, "supports_concurrency", False))

    @property
    def max_concurrent(self) -> int:
        return int(getattr(self.inner, "max_concurrent", 1))

    def load(self) -> None:
        if not self.inner.loaded:
            self.inner.load()

    def unload(self) -> None:
        if self.inner.loaded:
            self.inner.unload()

    @property
    def loaded(self) -> bool:
        return self.inner.loaded

    @property
    def context_length(self) -> int:
        return self.inner.context_length

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        return self.inner.count_tokens(messages)

    def stream_chat(self, messages: list[ChatMessage], params: GenerationParams, cancel: CancelToken,
                    stats: StreamStats | None = None) -> Iterator[str]:
        own = stats if stats is not None else StreamStats()
        self.prompts.append(list(messages))
        self.runs.append(own)
        yield from self.inner.stream_chat(messages, params, cancel, own)
