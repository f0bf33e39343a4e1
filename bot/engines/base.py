"""The engine interface: load a model, stream a chat reply from a worker thread, count tokens."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from bot.errors import BotError

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings for one reply; temperature 0 means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class CancelToken:
    """Set from any thread; engines check it between tokens."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


class EngineError(BotError):
    """A user-presentable engine failure (bad model files, load error, server down)."""


@dataclass
class StreamStats:
    """Filled in by an engine while it streams (read after the stream ends)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float | None = None
    total_s: float = 0.0
    finish_reason: str = ""  # "stop", "length", "cancelled"
    extra: dict[str, float] = field(default_factory=dict)


class Engine(ABC):
    """One loaded model. All methods are blocking; the queue calls them from a worker thread."""

    name: str

    @abstractmethod
    def load(self) -> None: ...

    @abstractmethod
    def unload(self) -> None: ...

    @property
    @abstractmethod
    def loaded(self) -> bool: ...

    @property
    @abstractmethod
    def context_length(self) -> int: ...

    @abstractmethod
    def count_tokens(self, messages: list[ChatMessage]) -> int:
        """Tokens of the prompt these messages make, chat template and generation prompt included."""

    @abstractmethod
    def stream_chat(
        self, messages: list[ChatMessage], params: GenerationParams, cancel: CancelToken,
        stats: StreamStats | None = None,
    ) -> Iterator[str]:
        """Yield text deltas of the assistant reply; stop on EOS, max_new_tokens or cancel."""

    def reply_budget(self, prompt_tokens: int, params: GenerationParams) -> int:
        """New tokens this reply may use; a clear error when the prompt alone fills the context."""
        room = self.context_length - prompt_tokens
        if room <= 0:
            raise EngineError(f"the conversation is too long for model {self.name!r} "
                              f"({prompt_tokens} tokens, limit {self.context_length}); use /reset to start over")
        return max(1, min(params.max_new_tokens, room))

    def chat(self, messages: list[ChatMessage], params: GenerationParams) -> str:
        """The whole reply at once (same decoding as `stream_chat`)."""
        return "".join(self.stream_chat(messages, params, CancelToken()))
