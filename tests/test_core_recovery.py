"""The queue keeps working: slow prompt building times out, failed loads and worker crashes recover."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import weakref

import pytest

from bot.core import queue as queue_module
from bot.core.messages import ReplyStatus
from bot.core.queue import NO_MODEL
from bot.engines.base import EngineError
from bot.engines.scripted import ScriptedEngine
from tests.core_helpers import say, until

WITHIN_S = 10.0  # a request that hangs past this is a stuck queue


async def test_timeout_covers_building_the_prompt(make_toy_service):
    async with make_toy_service(reply_timeout_s=0.5) as service:
        engine = service.toy_engines.engines["toy-a"]
        count, release = engine.count_tokens, threading.Event()

        def slow_tokenize(messages):  # a remote /tokenize that hangs on this prompt
            if any("slowly" in m.content for m in messages):
                release.wait(WITHIN_S + 5)
            return count(messages)

        engine.count_tokens = slow_tokenize
        loop = asyncio.get_running_loop()
        try:
            started = loop.time()
            slow = await asyncio.wait_for(say(service, "answer slowly"), WITHIN_S)
            assert loop.time() - started < 5
            assert slow.errors == ["The reply took longer than 0.5 s and was cut off."]
            nxt = await asyncio.wait_for(say(service, "and quickly", chat="c2"), WITHIN_S)
            assert nxt.status == ReplyStatus.COMPLETE
        finally:
            release.set()


async def test_timeout_covers_a_slow_database_while_building_the_prompt(make_toy_service):
    async with make_toy_service(reply_timeout_s=0.5) as service:
        context = service.store.context
        slow_chat = await service.store.chat_id("test", "slow")

        async def slow_context(chat: int, *args, **kwargs):
            if chat == slow_chat:
                await asyncio.sleep(WITHIN_S + 5)  # a database that stopped answering
            return await context(chat, *args, **kwargs)

        service.store.context = slow_context
        slow = await asyncio.wait_for(say(service, "hello", chat="slow"), WITHIN_S)
        assert slow.errors == ["The reply took longer than 0.5 s and was cut off."]
        nxt = await asyncio.wait_for(say(service, "hello", chat="fine"), WITHIN_S)
        assert nxt.status == ReplyStatus.COMPLETE


async def test_failed_switch_and_failed_reload_keep_the_queue_alive(make_toy_service, monkeypatch):
    monkeypatch.setattr(queue_module, "RELOAD_RETRY_S", 0.2)
    async with make_toy_service() as service:
        engines = service.toy_engines.engines
        engines["toy-b"] = ScriptedEngine("toy-b", fail_load=True)
        engines["toy-a"].fail_load = True  # e.g. its files were deleted, or the GPU is out of memory
        switch = await asyncio.wait_for(say(service, "/model toy-b"), WITHIN_S)
        assert "Could not load toy-b" in switch.errors[0] and "No model could be loaded" in switch.errors[0]

        waiting_user = await asyncio.wait_for(say(service, "hello?", chat="c2"), WITHIN_S)
        assert waiting_user.errors == [NO_MODEL]  # told what is happening, at once
        assert "toy-a" not in waiting_user.errors[0]  # the reasons are the owner's (log, /model reply)

        engines["toy-a"].fail_load = False  # the default loads again: the queue finds out by itself
        await until(lambda: service.current_model == "toy-a", timeout=WITHIN_S)
        assert (await asyncio.wait_for(say(service, "back?", chat="c3"), WITHIN_S)).status == ReplyStatus.COMPLETE


async def test_any_model_that_loads_is_served_when_the_old_one_cannot_come_back(make_toy_service, tmp_path):
    models = tmp_path / "three.json"
    models.write_text(json.dumps([{"name": n, "format": "hf", "path": n} for n in ("toy-a", "toy-b", "toy-c")]))
    async with make_toy_service(models_file=models) as service:
        engines = service.toy_engines.engines
        engines["toy-c"] = ScriptedEngine("toy-c", fail_load=True)
        engines["toy-a"].fail_load = True  # the old model (also the default) cannot come back
        switch = await asyncio.wait_for(say(service, "/model toy-c"), WITHIN_S)
        assert "Could not load toy-c" in switch.errors[0] and "Still using toy-b" in switch.errors[0]
        reply = await asyncio.wait_for(say(service, "who answers?", chat="c2"), WITHIN_S)
        assert reply.status == ReplyStatus.COMPLETE and engines["toy-b"].prompts


async def test_a_crashed_worker_is_logged_and_restarted(make_toy_service, monkeypatch, caplog):
    monkeypatch.setattr(queue_module, "WORKER_RESTART_S", 0.01)
    async with make_toy_service() as service:
        real_switch = service.queue._switch
        calls = 0

        async def crash_once(job):
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("a bug in the worker")
            await real_switch(job)

        monkeypatch.setattr(service.queue, "_switch", crash_once)
        with caplog.at_level(logging.ERROR, logger="bot.core.queue"):
            switch = await asyncio.wait_for(say(service, "/model toy-b"), WITHIN_S)
        assert "Could not load toy-b" in switch.errors[0]
        assert any("worker crashed" in r.getMessage() for r in caplog.records)
        still = await asyncio.wait_for(say(service, "still there?", chat="c2"), WITHIN_S)
        assert still.status == ReplyStatus.COMPLETE
        assert (await asyncio.wait_for(say(service, "/model toy-b"), WITHIN_S)).notices == ["Switched to toy-b."]


class _Weights:
    """Stands in for tensors a load had allocated when it failed."""


async def test_a_failed_load_leaves_nothing_alive_before_the_old_model_comes_back(make_toy_service):
    probe: list[weakref.ref[_Weights]] = []
    alive_at_reload: list[bool] = []

    class HalfLoads(ScriptedEngine):
        def load(self) -> None:
            weights = _Weights()  # half the model is in memory ...
            probe.append(weakref.ref(weights))
            raise EngineError("CUDA out of memory")  # ... when the load fails

    async with make_toy_service() as service:
        old = service.toy_engines.engines["toy-a"]
        old_load = old.load

        def reload() -> None:
            alive_at_reload.append(probe[0]() is not None)
            old_load()

        old.load = reload
        service.toy_engines.engines["toy-b"] = HalfLoads("toy-b")
        sink = await asyncio.wait_for(say(service, "/model toy-b"), WITHIN_S)
        assert "CUDA out of memory" in sink.errors[0] and "Still using toy-a" in sink.errors[0]
        assert alive_at_reload == [False]  # freed before the old model was loaded again (one GPU)


@pytest.fixture(autouse=True)
def _quiet_worker_logs(caplog):
    caplog.set_level(logging.WARNING, logger="bot.core.queue")
