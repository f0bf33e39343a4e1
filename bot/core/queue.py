"""The generation queue: one worker owns the engine (one GPU); fair FIFO across chats.

Generation runs in an executor thread and text deltas come back to the event loop as they are
made, so the loop never blocks. A model switch is a barrier in the same queue.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from bot.core.messages import ReplyStatus
from bot.engines.base import CancelToken, ChatMessage, Engine, GenerationParams, StreamStats
from bot.errors import BotError

log = logging.getLogger(__name__)

ETA_SMOOTHING = 0.3  # weight of the newest reply in the moving averages behind the ETA
CLOSE_GRACE_S = 10.0  # how long shutdown lets a running reply finish before cancelling it


class QueueFull(BotError):
    pass


class QueueClosed(BotError):
    pass


@dataclass
class Event:
    kind: Literal["queued", "started", "delta", "done"]
    position: int = 0
    eta_s: float | None = None
    text: str = ""
    status: ReplyStatus | None = None
    error: str | None = None


@dataclass
class JobResult:
    text: str
    status: ReplyStatus
    error: str | None
    stats: StreamStats
    model: str


Prepare = Callable[[Engine], Awaitable[tuple[list[ChatMessage], GenerationParams]]]
Finish = Callable[[JobResult], Awaitable[None]]


@dataclass(eq=False)
class Job:
    chat_key: str
    prepare: Prepare  # builds the prompt at start time (so it sees the previous reply of the chat)
    on_finish: Finish  # stores the result; awaited before the `done` event
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancel: CancelToken = field(default_factory=CancelToken)
    position: int = 0
    started_at: float | None = None


@dataclass(eq=False)
class SwitchJob:
    model: str
    done: asyncio.Future[str]


def release_memory() -> None:
    """Give freed model memory back: Python objects, the CUDA cache, and glibc's heap."""
    gc.collect()
    torch = sys.modules.get("torch")  # only engines that use torch have imported it
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class GenerationQueue:
    def __init__(self, engine_factory: Callable[[str], Engine], max_waiting: int = 32,
                 reply_timeout_s: float = 300.0, concurrency: int = 1) -> None:
        self._factory = engine_factory
        self.max_waiting = max_waiting
        self.reply_timeout_s = reply_timeout_s
        self._concurrency_limit = max(1, concurrency)
        self.engine: Engine | None = None
        self.model: str = ""
        self._waiting: list[Job | SwitchJob] = []
        self._running: dict[Job, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=self._concurrency_limit, thread_name_prefix="engine")
        self._closed = False
        self._tok_per_s: float | None = None
        self._tokens_per_reply: float | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self, model: str) -> None:
        engine = self._factory(model)
        await self._blocking(engine.load)
        self.engine, self.model = engine, model
        self._worker = asyncio.create_task(self._work(), name="generation-worker")

    async def close(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Refuse new work, cancel what waits, let running replies finish (or cancel after grace)."""
        self._closed = True
        for job in list(self._waiting):
            self._waiting.remove(job)
            if isinstance(job, Job):
                await self._finish_unstarted(job, ReplyStatus.CANCELLED, "The bot is shutting down.")
            else:
                job.done.set_exception(QueueClosed("the bot is shutting down"))
        if self._running:
            done, pending = await asyncio.wait(list(self._running.values()), timeout=grace_s)
            for job in list(self._running):
                job.cancel.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._worker:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        if self.engine is not None:
            await self._blocking(self.engine.unload)
            self.engine = None
            release_memory()
        self._executor.shutdown(wait=True)

    # --- requests ----------------------------------------------------------------------------
    @property
    def concurrency(self) -> int:
        engine_parallel = getattr(self.engine, "supports_concurrency", False)
        return self._concurrency_limit if engine_parallel else 1

    def has_waiting(self, chat_key: str) -> bool:
        return any(isinstance(j, Job) and j.chat_key == chat_key for j in self._waiting)

    def is_running(self, chat_key: str) -> bool:
        return any(j.chat_key == chat_key for j in self._running)

    def waiting_count(self) -> int:
        return sum(1 for j in self._waiting if isinstance(j, Job))

    def submit(self, job: Job) -> None:
        """Enqueue; raises QueueFull past the bound. Events arrive on `job.events`."""
        if self._closed:
            raise QueueClosed("the bot is shutting down")
        if self.waiting_count() >= self.max_waiting:
            raise QueueFull("busy")
        self._waiting.append(job)
        starts_now = len(self._waiting) == 1 and len(self._running) < self.concurrency
        if not starts_now:
            self._announce_positions()
        self._wake.set()

    async def cancel(self, chat_key: str) -> Literal["running", "queued"] | None:
        """`/stop`: remove this chat's waiting reply, or stop its running one between tokens."""
        for job in self._waiting:
            if isinstance(job, Job) and job.chat_key == chat_key:
                self._waiting.remove(job)
                self._announce_positions()
                await self._finish_unstarted(job, ReplyStatus.CANCELLED, None)
                return "queued"
        for job in self._running:
            if job.chat_key == chat_key:
                job.cancel.cancel()
                return "running"
        return None

    async def switch_model(self, model: str) -> str:
        """Queue a switch barrier; returns the model now loaded, raises BotError if `model` failed."""
        if self._closed:
            raise QueueClosed("the bot is shutting down")
        job = SwitchJob(model, asyncio.get_running_loop().create_future())
        self._waiting.append(job)
        self._announce_positions()
        self._wake.set()
        return await job.done

    # --- worker ------------------------------------------------------------------------------
    async def _work(self) -> None:
        while True:
            if not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            head = self._waiting[0]
            if isinstance(head, SwitchJob):
                if self._running:
                    await asyncio.wait(list(self._running.values()))
                    continue
                self._waiting.pop(0)
                await self._switch(head)
                self._announce_positions()
                continue
            if len(self._running) >= self.concurrency:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            self._waiting.pop(0)
            self._announce_positions()
            task = asyncio.create_task(self._run(head), name=f"reply-{head.chat_key}")
            self._running[head] = task
            task.add_done_callback(lambda _t, j=head: self._release(j))

    def _release(self, job: Job) -> None:
        self._running.pop(job, None)
        self._slot_freed.set()
        self._wake.set()

    async def _switch(self, job: SwitchJob) -> None:
        old_name, old = self.model, self.engine
        if job.model == old_name:
            job.done.set_result(old_name)
            return
        log.info("switching model %s -> %s", old_name, job.model)
        if old is not None:
            await self._blocking(old.unload)
        self.engine = None
        release_memory()
        try:
            new = self._factory(job.model)
            await self._blocking(new.load)
        except Exception as exc:  # noqa: BLE001 - any load failure brings the old model back
            log.warning("loading %s failed: %s", job.model, exc)
            release_memory()
            if old is not None:
                await self._blocking(old.load)
                self.engine = old
            reason = str(exc) if isinstance(exc, BotError) else f"{type(exc).__name__}: {exc}"
            job.done.set_exception(BotError(reason))
            return
        self.engine, self.model = new, job.model
        job.done.set_result(job.model)

    async def _run(self, job: Job) -> None:
        engine, model = self.engine, self.model
        assert engine is not None
        loop = asyncio.get_running_loop()
        stats = StreamStats()
        parts: list[str] = []
        job.started_at = time.monotonic()
        try:
            messages, params = await job.prepare(engine)
        except BotError as exc:
            await self._finish_unstarted(job, ReplyStatus.FAILED, str(exc))
            return
        except Exception:  # noqa: BLE001
            log.exception("preparing a reply failed")
            await self._finish_unstarted(job, ReplyStatus.FAILED, "Sorry, something went wrong preparing the reply.")
            return
        job.events.put_nowait(Event("started"))

        def produce() -> None:
            for delta in engine.stream_chat(messages, params, job.cancel, stats):
                parts.append(delta)
                loop.call_soon_threadsafe(job.events.put_nowait, Event("delta", text=delta))

        future = loop.run_in_executor(self._executor, produce)
        error: str | None = None
        timed_out = False
        done, _ = await asyncio.wait({future}, timeout=self.reply_timeout_s)
        if not done:
            timed_out = True
            job.cancel.cancel()
            await asyncio.wait({future})
        try:
            future.result()
        except Exception as exc:  # noqa: BLE001 - one reply fails, the worker keeps serving
            log.warning("generation failed for chat %s: %s", job.chat_key, exc, exc_info=True)
            reason = f" ({exc})" if isinstance(exc, BotError) else ""
            error = f"Sorry, the model failed while answering{reason}. Please try again."
        text = "".join(parts)
        if error:
            status = ReplyStatus.FAILED
        elif timed_out:
            status, error = ReplyStatus.FAILED, f"The reply took longer than {self.reply_timeout_s:.0f} s and was cut off."
        elif job.cancel.cancelled:
            status = ReplyStatus.CANCELLED
        else:
            status = ReplyStatus.COMPLETE
        self._measure(stats, time.monotonic() - job.started_at)
        result = JobResult(text, status, error, stats, model)
        try:
            await job.on_finish(result)
        finally:
            job.events.put_nowait(Event("done", text=text, status=status, error=error))

    async def _finish_unstarted(self, job: Job, status: ReplyStatus, error: str | None) -> None:
        result = JobResult("", status, error, StreamStats(finish_reason=status.value), self.model)
        try:
            await job.on_finish(result)
        finally:
            job.events.put_nowait(Event("done", text="", status=status, error=error))

    # --- positions and ETA -------------------------------------------------------------------
    def _measure(self, stats: StreamStats, seconds: float) -> None:
        if stats.completion_tokens < 2 or seconds <= 0:
            return
        rate = stats.completion_tokens / seconds
        a = ETA_SMOOTHING
        self._tok_per_s = rate if self._tok_per_s is None else (1 - a) * self._tok_per_s + a * rate
        n = float(stats.completion_tokens)
        self._tokens_per_reply = n if self._tokens_per_reply is None else (1 - a) * self._tokens_per_reply + a * n

    def eta(self, position: int) -> float | None:
        """Seconds until the reply at `position` (1 = next) starts, from measured tokens/s."""
        if not self._tok_per_s or not self._tokens_per_reply:
            return None
        per_reply = self._tokens_per_reply / self._tok_per_s
        now = time.monotonic()
        running_left = sum(max(0.0, per_reply - (now - (j.started_at or now))) for j in self._running)
        return (running_left + (position - 1) * per_reply) / self.concurrency

    def _announce_positions(self) -> None:
        position = 0
        for job in self._waiting:
            position += 1
            if isinstance(job, Job) and job.position != position:
                job.position = position
                job.events.put_nowait(Event("queued", position=position, eta_s=self.eta(position)))

    async def _blocking(self, fn: Callable[[], object]) -> object:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)


__all__ = ["Event", "GenerationQueue", "Job", "JobResult", "QueueClosed", "QueueFull", "release_memory"]
