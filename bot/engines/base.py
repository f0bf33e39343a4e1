"""The engine interface: load a model, stream a chat reply from a worker thread, count tokens."""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from bot.errors import BotError

log = logging.getLogger(__name__)

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

    def stream_chat(
        self, messages: list[ChatMessage], params: GenerationParams, cancel: CancelToken,
        stats: StreamStats | None = None,
    ) -> Iterator[str]:
        """Yield text deltas of the assistant reply; stop on EOS, max_new_tokens or cancel.

        The skeleton every engine shares: timing, the finish reason, cancel, and any failure that is not
        already an EngineError turned into one (the reply fails politely, the bot goes on). Engines write
        :meth:`_stream`, which fills in the token counts and "stop"/"length".
        """
        stats = stats if stats is not None else StreamStats()
        start = time.perf_counter()
        try:
            for delta in self._stream(messages, params, cancel, stats):
                if stats.first_token_s is None:
                    stats.first_token_s = time.perf_counter() - start
                yield delta
                if cancel.cancelled:
                    break
        except GeneratorExit:
            cancel.cancel()  # the caller stopped reading: whatever generates for it stops too
            raise
        except EngineError:
            raise
        except Exception as exc:  # noqa: BLE001 - out of memory, kernel errors: the reply fails, the bot goes on
            log.error("generation with %s failed: %r", self.name, exc)
            raise EngineError(f"model {self.name!r} failed while writing the reply: {type(exc).__name__}") from exc
        finally:
            stats.total_s = time.perf_counter() - start
            if cancel.cancelled:
                stats.finish_reason = "cancelled"
            stats.finish_reason = stats.finish_reason or "length"
            if stats.completion_tokens > 1 and stats.first_token_s is not None:
                decode_s = stats.total_s - stats.first_token_s
                stats.extra["tokens_per_s"] = (stats.completion_tokens - 1) / decode_s if decode_s > 0 else 0.0

    def _stream(self, messages: list[ChatMessage], params: GenerationParams, cancel: CancelToken,
                stats: StreamStats) -> Iterator[str]:
        """The engine's own part of :meth:`stream_chat`: text deltas; sets the token counts and the finish reason."""
        raise NotImplementedError

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
