"""The generation queue: one worker owns the engine (one GPU); fair FIFO across chats and users.

Generation runs in an executor thread and text deltas come back to the event loop as they are
made, so the loop never blocks. A model switch is a barrier in the same queue. Rules:

- a chat has at most one reply running: its next one starts after the previous one is stored,
  however many replies the engine runs at once;
- a user has at most `user_max_running` replies running and `user_max_waiting` requests waiting
  (replies and model switches) across all their chats, so one person cannot fill the queue;
- the reply time limit covers building the prompt as well as generating;
- the worker survives anything: a crash is logged and the worker restarted, and when no model
  loads it keeps retrying (the previous model, the fallbacks, in order) and tells whoever waits.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, Protocol

from bot.core.messages import ReplyStatus
from bot.engines.base import CancelToken, ChatMessage, Engine, GenerationParams, StreamStats
from bot.errors import BotError

log = logging.getLogger(__name__)

ETA_SMOOTHING = 0.3  # weight of the newest reply in the moving averages behind the ETA
CLOSE_GRACE_S = 10.0  # how long shutdown lets a running reply finish before cancelling it
STORE_TIMEOUT_S = 60.0  # longest a reply's slot waits for the database to store it
PARTIAL_SAVE_S = 3.0  # a streaming reply's text so far is stored this often (what `kill -9` can lose)
MAX_ENGINE_BATCH = 64  # the most replies one engine may run at once (MAX_BATCH's upper bound)
WORKER_RESTART_S = 1.0  # pause before restarting a crashed worker (a crash loop must not spin)
RELOAD_RETRY_S = 30.0  # first wait before trying again to load a model when none loads
RELOAD_RETRY_MAX_S = 600.0  # the wait doubles up to this

# Told to anyone waiting; why loading failed (paths, memory) is for the owner's log, not for strangers.
NO_MODEL = ("No model could be loaded right now, so I can't answer. I keep trying to load one; "
            "please try again in a few minutes.")
SHUTTING_DOWN = "The bot is shutting down."


class QueueFull(BotError):
    pass


class UserBusy(BotError):
    """This user already has as many requests waiting as they may (in any of their chats)."""


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
Progress = Callable[[str], Awaitable[None]]


@dataclass(eq=False)
class Job:
    chat_key: str
    prepare: Prepare  # builds the prompt at start time (so it sees the previous reply of the chat)
    on_finish: Finish  # stores the result; awaited before the `done` event
    user_key: str = ""  # who asked (fairness across all their chats); "" = nobody in particular
    askers: set[str] = field(default_factory=set)  # whose messages the request holds (folded ones too): theirs to /stop
    on_progress: Progress | None = None  # stores the text so far, every `partial_save_s` while streaming
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancel: CancelToken = field(default_factory=CancelToken)
    position: int = 0
    started_at: float | None = None

    def __post_init__(self) -> None:
        if self.user_key:
            self.askers.add(self.user_key)


@dataclass(eq=False)
class SwitchJob:
    model: str
    done: asyncio.Future[str]
    user_key: str = ""


class QueueObserver(Protocol):
    """Told of every reply that ends, before it is stored (bot/metrics.py counts them); must not block."""

    def reply_finished(self, job: Job, result: JobResult) -> None: ...


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


def forget_traceback(exc: BaseException) -> None:
    """Drop the frames a failed load left behind: their locals (half-loaded weights) must not live on."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if current.__traceback__ is not None:
            traceback.clear_frames(current.__traceback__)
            current.__traceback__ = None
        current = current.__cause__ or current.__context__


def _settle(future: asyncio.Future[str], result: str | None = None, error: BaseException | None = None) -> None:
    """Resolve a switch request unless its caller has gone away (cancelled) meanwhile."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result or "")


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, BotError) else f"{type(exc).__name__}: {exc}"


class GenerationQueue:
    def __init__(self, engine_factory: Callable[[str], Engine], max_waiting: int = 32,
                 reply_timeout_s: float = 300.0, concurrency: int = 1, user_max_waiting: int = 1,
                 user_max_running: int = 1, fallback_models: Sequence[str] = (),
                 partial_save_s: float = PARTIAL_SAVE_S) -> None:
        self._factory = engine_factory
        self.max_waiting = max_waiting
        self.reply_timeout_s = reply_timeout_s
        self.user_max_waiting = max(1, user_max_waiting)
        self.user_max_running = max(1, user_max_running)
        self.fallback_models = list(fallback_models)
        self.partial_save_s = partial_save_s
        self._concurrency_limit = max(1, concurrency)
        self.engine: Engine | None = None
        self.model: str = ""
        self._waiting: list[Job | SwitchJob] = []
        self._running: dict[Job, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._switching: SwitchJob | None = None  # the switch the worker is doing (settled if it crashes)
        # Threads are made as needed: each running reply waits on one (a batching engine's torch work runs on its
        # own engine thread), plus one for loads.
        self._executor = ThreadPoolExecutor(max_workers=max(self._concurrency_limit, MAX_ENGINE_BATCH) + 1,
                                            thread_name_prefix="reply")
        self._closed = False
        self._close_done: asyncio.Future[None] | None = None
        self._retry_s = RELOAD_RETRY_S
        self._next_retry = 0.0
        self._tok_per_s: float | None = None
        self._tokens_per_reply: float | None = None
        self.observer: QueueObserver | None = None  # set by bot/metrics.py when METRICS_PORT is on

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self, model: str) -> None:
        engine = self._factory(model)
        await self._blocking(engine.load)
        self.engine, self.model = engine, model
        self._worker = asyncio.create_task(self._supervise(), name="generation-worker")

    async def close(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Refuse new work, cancel what waits, let running replies finish (or cancel after grace).

        Never raises: a shutdown must end cleanly whatever is waiting, loading or streaming, and
        running replies are stored with their text so far. Safe to call twice.
        """
        if self._close_done is not None:
            await asyncio.shield(self._close_done)
            return
        self._close_done = asyncio.get_running_loop().create_future()
        self._closed = True
        self._wake.set()
        try:
            for item in list(self._waiting):
                self._waiting.remove(item)
                if isinstance(item, Job):
                    await self._finish_unstarted(item, ReplyStatus.CANCELLED, SHUTTING_DOWN)
                else:
                    _settle(item.done, error=QueueClosed("the bot is shutting down"))
            if self._running:
                await asyncio.wait(list(self._running.values()), timeout=grace_s)
                for job in list(self._running):
                    job.cancel.cancel()
                if self._running:
                    await asyncio.wait(list(self._running.values()))
            if self._worker is not None:
                await asyncio.wait({self._worker}, timeout=grace_s)  # a switch in progress may finish
                self._worker.cancel()
                await asyncio.gather(self._worker, return_exceptions=True)
            if self._switching is not None:
                _settle(self._switching.done, error=QueueClosed("the bot is shutting down"))
            if self.engine is not None:
                engine, self.engine = self.engine, None
                await self._blocking(engine.unload)
                release_memory()
        except Exception:  # noqa: BLE001 - shutdown goes on; the cause is in the log
            log.exception("error while closing the generation queue")
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._close_done.set_result(None)

    # --- requests ----------------------------------------------------------------------------
    @property
    def concurrency(self) -> int:
        """Replies that run at once: a remote server's REMOTE_CONCURRENCY, a batching engine's batch, else 1."""
        if getattr(self.engine, "supports_concurrency", False):
            return self._concurrency_limit
        return max(1, int(getattr(self.engine, "max_concurrent", 1)))

    def has_waiting(self, chat_key: str) -> bool:
        return any(isinstance(j, Job) and j.chat_key == chat_key for j in self._waiting)

    def is_running(self, chat_key: str) -> bool:
        return any(j.chat_key == chat_key for j in self._running)

    def waiting_count(self) -> int:
        return sum(1 for j in self._waiting if isinstance(j, Job))

    def user_waiting(self, user_key: str) -> int:
        """Requests (replies and model switches) this user has waiting, in all their chats."""
        return sum(1 for j in self._waiting if user_key and j.user_key == user_key)

    def _admit(self, user_key: str) -> None:
        if self._closed:
            raise QueueClosed("the bot is shutting down")
        if self.user_waiting(user_key) >= self.user_max_waiting:
            raise UserBusy("you already have a request waiting")

    def submit(self, job: Job) -> None:
        """Enqueue; raises UserBusy past the user's bound, QueueFull past the global one."""
        self._admit(job.user_key)
        if self.waiting_count() >= self.max_waiting:
            raise QueueFull("busy")
        self._waiting.append(job)
        if self._startable() is not job:
            self._announce_positions()
        self._wake.set()

    async def cancel(self, chat_key: str, user_key: str | None = None) -> Literal["running", "queued"] | None:
        """`/stop`: remove this chat's waiting reply, or stop its running one between tokens.

        With `user_key`, only a reply whose request holds a message of that user: in a shared chat
        someone else's waiting reply must not shield the caller's own running one.
        """
        def hit(job: Job) -> bool:
            return job.chat_key == chat_key and (user_key is None or user_key in job.askers)

        for job in self._waiting:
            if isinstance(job, Job) and hit(job):
                self._waiting.remove(job)
                self._announce_positions()
                await self._finish_unstarted(job, ReplyStatus.CANCELLED, None)
                self._wake.set()
                return "queued"
        for job in self._running:
            if hit(job):
                job.cancel.cancel()
                return "running"
        return None

    async def switch_model(self, model: str, user_key: str = "") -> str:
        """Queue a switch barrier; returns the model now loaded, raises BotError if `model` failed.

        A waiting switch counts against the user's waiting bound like a waiting reply.
        """
        self._admit(user_key)
        job = SwitchJob(model, asyncio.get_running_loop().create_future(), user_key)
        self._waiting.append(job)
        self._announce_positions()
        self._wake.set()
        return await job.done

    # --- worker ------------------------------------------------------------------------------
    async def _supervise(self) -> None:
        """Run the worker; if it ever crashes, log it, fail the switch it was doing, and restart it."""
        while not self._closed:
            try:
                await self._work()
                return
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the queue must outlive any bug in one step
                log.exception("the generation worker crashed; restarting it")
                if self._switching is not None:
                    _settle(self._switching.done, error=BotError("an internal error stopped the switch"))
                    self._switching = None
                await asyncio.sleep(WORKER_RESTART_S)

    async def _work(self) -> None:
        while not self._closed:
            if self.engine is None:
                await self._without_model()
                continue
            head = self._startable()
            if head is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._waiting.remove(head)
            if isinstance(head, SwitchJob):
                if not head.done.cancelled():  # its caller gave up (its task was cancelled): skip it
                    self._switching = head
                    await self._switch(head)
                    self._switching = None
                self._announce_positions()
                continue
            self._announce_positions()
            task = asyncio.create_task(self._run(head), name=f"reply-{head.chat_key}")
            self._running[head] = task
            task.add_done_callback(lambda _t, j=head: self._release(j))

    def _startable(self) -> Job | SwitchJob | None:
        """The oldest request that may start now, or None.

        A switch waits for everything ahead of it and for running replies (it is a barrier); a
        reply waits while its chat has a reply running (so its prompt includes that reply) or
        its user has as many running as they may; others behind it may go first meanwhile.
        """
        if self._closed:
            return None
        for item in self._waiting:
            if isinstance(item, SwitchJob):
                return item if item is self._waiting[0] and not self._running else None
            if len(self._running) >= self.concurrency:
                return None
            if self.is_running(item.chat_key):
                continue
            if item.user_key and sum(j.user_key == item.user_key for j in self._running) >= self.user_max_running:
                continue
            return item
        return None

    def _release(self, job: Job) -> None:
        self._running.pop(job, None)
        self._wake.set()

    async def _switch(self, job: SwitchJob) -> None:
        """Unload, load the new model; if that fails, bring back the previous one, else any that loads."""
        if job.model == self.model and self.engine is not None:
            _settle(job.done, job.model)
            return
        log.info("switching model %s -> %s", self.model or "(none)", job.model)
        previous = self.model
        await self._unload()
        reason = await self._load(job.model)
        if reason is None:
            _settle(job.done, job.model)
            return
        await self._load_any([previous, *self.fallback_models])
        _settle(job.done, error=BotError(reason))  # `self.model` says what is loaded now ("" = none yet)

    async def _unload(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            try:
                await self._blocking(engine.unload)
            except Exception:  # noqa: BLE001 - whatever unload left, it is dropped below
                log.warning("unloading %s failed", self.model, exc_info=True)
        del engine
        release_memory()

    async def _load(self, name: str) -> str | None:
        """Load `name` as the engine; None on success, else why not. A failed load leaves nothing alive."""
        engine: Engine | None = None
        reason: str | None = None
        try:
            engine = self._factory(name)
            await self._blocking(engine.load)
        except Exception as exc:  # noqa: BLE001 - any load failure: report it, bring a model back
            reason = _describe(exc)
            log.warning("loading %s failed: %s", name, reason)
            forget_traceback(exc)
        if reason is None:
            self.engine, self.model = engine, name
            return None
        if engine is not None:
            try:
                await self._blocking(engine.unload)  # whatever the half-done load holds
            except Exception:  # noqa: BLE001
                log.debug("unloading a failed load of %s failed", name, exc_info=True)
        engine = None
        self.model = ""
        release_memory()
        return reason

    async def _load_any(self, candidates: Sequence[str]) -> str | None:
        """The first candidate that loads (in order, each once), or None with no engine at all."""
        failures: list[str] = []
        for name in dict.fromkeys(c for c in candidates if c):
            reason = await self._load(name)
            if reason is None:
                log.warning("serving with %s", name)
                return name
            failures.append(f"{name}: {reason}")
        log.error("no model loads (%s); retrying in %g s", "; ".join(failures), self._retry_s)
        self._next_retry = time.monotonic() + self._retry_s
        return None

    async def _without_model(self) -> None:
        """No engine: tell whoever waits, try a requested switch at once, else retry on a back-off."""
        for item in [j for j in self._waiting if isinstance(j, Job)]:
            self._waiting.remove(item)
            await self._finish_unstarted(item, ReplyStatus.FAILED, NO_MODEL)
        if self._waiting:  # only switches are left: each is an attempt to load, made at once
            switch = self._waiting.pop(0)
            assert isinstance(switch, SwitchJob)
            if not switch.done.cancelled():
                self._switching = switch
                await self._switch(switch)
                self._switching = None
            return
        wait = self._next_retry - time.monotonic()
        if wait > 0:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                pass
            return
        if await self._load_any(self.fallback_models) is None:
            self._retry_s = min(self._retry_s * 2, RELOAD_RETRY_MAX_S)
        else:
            self._retry_s = RELOAD_RETRY_S

    async def _run(self, job: Job) -> None:
        engine, model = self.engine, self.model
        assert engine is not None
        loop = asyncio.get_running_loop()
        stats = StreamStats()
        parts: list[str] = []
        job.started_at = time.monotonic()
        deadline = loop.time() + self.reply_timeout_s
        timed_out_text = f"The reply took longer than {self.reply_timeout_s:g} s and was cut off."
        try:
            messages, params = await asyncio.wait_for(job.prepare(engine), self.reply_timeout_s)
        except TimeoutError:
            log.warning("building the prompt for chat %s took over %.0f s", job.chat_key, self.reply_timeout_s)
            await self._finish_unstarted(job, ReplyStatus.FAILED, timed_out_text)
            return
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
        timed_out = await self._stream(job, future, parts, deadline)
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
            status, error = ReplyStatus.FAILED, timed_out_text
        elif job.cancel.cancelled:
            status = ReplyStatus.CANCELLED
            if self._closed:
                error = SHUTTING_DOWN
        else:
            status = ReplyStatus.COMPLETE
        self._measure(stats, time.monotonic() - job.started_at)
        await self._finish(job, JobResult(text, status, error, stats, model))

    async def _stream(self, job: Job, future: asyncio.Future[None], parts: list[str], deadline: float) -> bool:
        """Wait for the stream to end, storing its text so far now and then; True if it ran out of time.

        A save runs beside the stream: a slow database skips intervals instead of holding the reply.
        """
        loop = asyncio.get_running_loop()
        saved = 0
        saving: asyncio.Task[None] | None = None
        while True:
            left = deadline - loop.time()
            if left <= 0:
                job.cancel.cancel()
                await asyncio.wait({future})
                return True
            done, _ = await asyncio.wait({future}, timeout=min(left, self.partial_save_s))
            if done:
                return False
            if job.on_progress is not None and len(parts) != saved and (saving is None or saving.done()):
                saved = len(parts)
                saving = asyncio.create_task(self._save_progress(job, "".join(parts[:saved])))

    @staticmethod
    async def _save_progress(job: Job, text: str) -> None:
        assert job.on_progress is not None
        try:
            await job.on_progress(text)
        except Exception:  # noqa: BLE001 - a failing save must not stop the reply
            log.warning("saving the partial reply of chat %s failed", job.chat_key, exc_info=True)

    async def _finish(self, job: Job, result: JobResult) -> None:
        """Store the result, then tell the waiting relay; a storage failure is logged, never raised.

        A database that hangs holds this reply's slot for STORE_TIMEOUT_S at most; the store goes
        on in the background.
        """
        if self.observer is not None:
            self.observer.reply_finished(job, result)
        try:
            await asyncio.wait_for(asyncio.shield(job.on_finish(result)), STORE_TIMEOUT_S)
        except TimeoutError:
            log.error("storing the reply of chat %s takes over %g s; serving others meanwhile",
                      job.chat_key, STORE_TIMEOUT_S)
        except Exception:  # noqa: BLE001
            log.exception("storing the reply of chat %s failed", job.chat_key)
        finally:
            job.events.put_nowait(Event("done", text=result.text, status=result.status, error=result.error))

    async def _finish_unstarted(self, job: Job, status: ReplyStatus, error: str | None) -> None:
        await self._finish(job, JobResult("", status, error, StreamStats(finish_reason=status.value), self.model))

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


__all__ = ["Event", "GenerationQueue", "Job", "JobResult", "QueueClosed", "QueueFull", "QueueObserver", "UserBusy",
           "forget_traceback", "release_memory"]
