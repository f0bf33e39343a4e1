"""The engine thread at exit: a stop posted during a long call (the batch loop) ends it, and a stopped thread
refuses calls instead of leaving the caller waiting forever (the bot would hang on exit)."""

from __future__ import annotations

import threading

import pytest

from bot.engines.engine_thread import EngineThread


def test_a_stop_posted_during_a_long_call_ends_the_thread_after_it() -> None:
    thread = EngineThread("test-engine")
    started, release = threading.Event(), threading.Event()

    def long_call() -> str:  # the batch loop: it runs what is posted between its steps
        started.set()
        while not release.wait(0.01):
            thread.run_pending()
        return "done"

    result = thread.submit(long_call)
    assert started.wait(5)
    stopper = threading.Thread(target=thread.stop)
    stopper.start()
    threading.Event().wait(0.1)  # the long call polls the inbox meanwhile, with the stop in it
    release.set()
    stopper.join(5)
    assert result.result(5) == "done"
    with pytest.raises(RuntimeError, match="stopped"):
        thread.call(lambda: 1)


def test_a_stopped_engine_thread_refuses_calls() -> None:
    thread = EngineThread("test-engine")
    assert thread.call(lambda: 2) == 2
    thread.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        thread.call(lambda: 1)
