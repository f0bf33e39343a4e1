"""The one thread that runs every torch and llama.cpp operation of the process: load, warm-up, prefill, decode,
unload.

Why one: on a 2-core CPU the compiled GPTQ decode runs at 62-71 tok/s while only one thread has run torch ops;
once a second thread runs a decode, every thread drops to 30-39 tok/s for the rest of the process (OpenMP keeps a
spinning worker team per calling thread). So the queue's worker threads only wait on this thread, and the batch
scheduler (:mod:`bot.engines.batching`) runs its loop here. Shared by all local engines, so a model switch
does not start a second OpenMP team either: llama.cpp's decode, on the queue's worker threads, had halved the same
way (90 tokens/s on one worker, 45-54 once a second worker or a torch model had run).
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

THREAD_NAME = "engine"


class EngineThread:
    """A single daemon thread with an inbox of calls; long work (a decode loop) runs as one call that polls
    :meth:`run_pending` between steps, so a call posted meanwhile waits at most one step."""

    def __init__(self, name: str = THREAD_NAME) -> None:
        self._inbox: queue.SimpleQueue[tuple[Callable[[], object], Future[object]]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    def on_thread(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the thread; its result (or exception) arrives in the future."""
        future: Future[T] = Future()
        if not self._thread.is_alive():  # stopped at exit: a call would wait forever
            raise RuntimeError("the engine thread has stopped")
        if self.on_thread():  # a call from the thread itself runs at once (waiting on itself would deadlock)
            _run(fn, future)  # type: ignore[arg-type]
        else:
            self._inbox.put((fn, future))  # type: ignore[arg-type]
        return future

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the thread and wait for it."""
        return self.submit(fn).result()

    def run_pending(self) -> None:
        """Run the calls posted while a long call was busy (called by that call between its steps)."""
        while True:
            try:
                fn, future = self._inbox.get_nowait()
            except queue.Empty:
                return
            if fn is _STOP:  # for the serving loop, once the long call has returned
                self._inbox.put((fn, future))
                return
            _run(fn, future)

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the thread after what it is running (at exit: a torch thread alive then aborts the process)."""
        if self._thread.is_alive() and not self.on_thread():
            self._inbox.put((_STOP, Future()))
            self._thread.join(timeout_s)

    def _serve(self) -> None:
        while True:
            fn, future = self._inbox.get()
            if fn is _STOP:
                return
            _run(fn, future)


def _STOP() -> None:  # noqa: N802 - a sentinel
    """Posted by :meth:`EngineThread.stop`."""


def _run(fn: Callable[[], object], future: Future[object]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
        future.set_exception(exc)


_shared: EngineThread | None = None
_shared_lock = threading.Lock()


def shared() -> EngineThread:
    """The process's engine thread (torch and llama.cpp), started on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = EngineThread()
            atexit.register(_shared.stop)
        return _shared
