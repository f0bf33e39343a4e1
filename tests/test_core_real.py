"""The core service on the real embedded GPTQ and AWQ builds, with a real SQLite file."""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path
from typing import Any

import psutil
import pytest

from bot.config import ModelProfile, Settings
from bot.core.messages import IncomingMessage, ReplyStatus
from bot.core.service import ChatService
from bot.engines import create_engine
from bot.engines.recording import RecordingEngine
from tests.sinks import RecordingSink

pytestmark = pytest.mark.slow


class RealEngines:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engines: dict[str, RecordingEngine] = {}

    def __call__(self, profile: ModelProfile) -> RecordingEngine:
        self.engines[profile.name] = RecordingEngine(create_engine(profile, self.settings))
        return self.engines[profile.name]


def real_settings(tmp_path: Path, models: Path, **kw: Any) -> Settings:
    values: dict[str, Any] = {"models_dir": models, "default_model": "smollm2-gptq",
                              "database_url": f"sqlite+aiosqlite:///{tmp_path}/real.db",
                              "max_new_tokens": 12, "temperature": 0.0, "_env_file": None}
    values.update(kw)
    return Settings(**values)


async def say(service: ChatService, text: str, chat: str = "c1") -> RecordingSink:
    sink = RecordingSink()
    await service.handle(IncomingMessage("test", chat, f"u-{chat}", "Ann", text), sink)
    return sink


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


async def test_multi_turn_reset_and_restart(tmp_path, prepared_models):
    settings = real_settings(tmp_path, prepared_models)
    engines = RealEngines(settings)
    async with ChatService(settings, engine_factory=engines) as service:
        first = await say(service, "My name is Zed and I live in Oslo.")
        assert first.status == ReplyStatus.COMPLETE and first.final and len(first.updates) >= 2
        await say(service, "I like green tea.")
        await say(service, "What is my name?")
        prompt = engines.engines["smollm2-gptq"].prompts[-1]
        assert "My name is Zed and I live in Oslo." in [m.content for m in prompt]
        assert [m.role for m in prompt] == ["system", "user", "assistant", "user", "assistant", "user"]
        assert (await say(service, "/reset")).notices
        await say(service, "What is my name?")
        assert not any("Zed" in m.content for m in engines.engines["smollm2-gptq"].prompts[-1])
        await say(service, "Remember: the code word is Falcon.")
    engines = RealEngines(settings)
    async with ChatService(settings, engine_factory=engines) as service:
        await say(service, "What is the code word?")
        assert any("Falcon" in m.content for m in engines.engines["smollm2-gptq"].prompts[-1])
        rows = await service.store.messages(await service.store.chat_id("test", "c1"))
        assert [r.status for r in rows] == ["complete"] * 6


async def test_ten_chats_at_once(tmp_path, prepared_models):
    settings = real_settings(tmp_path, prepared_models, max_new_tokens=8)
    engines = RealEngines(settings)
    async with ChatService(settings, engine_factory=engines) as service:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        timer = asyncio.create_task(ticker())
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        sinks = await asyncio.gather(*(say(service, f"Say hello to person number {i}.", chat=f"chat{i}")
                                       for i in range(10)))
        elapsed = loop.time() - t0
        timer.cancel()
        assert all(s.status == ReplyStatus.COMPLETE and s.final for s in sinks)
        # the loop kept ticking while the model ran in its thread (at least half the ideal count)
        assert ticks >= elapsed / 0.05 / 2
        assert any(s.positions for s in sinks), "later chats were told their place in line"
        for i, sink in enumerate(sinks):
            rows = await service.store.messages(await service.store.chat_id("test", f"chat{i}"))
            assert [r.content for r in rows] == [f"Say hello to person number {i}.", sink.final]
        for prompt in engines.engines["smollm2-gptq"].prompts:
            assert sum("person number" in m.content for m in prompt) == 1


async def test_stop_a_running_real_reply(tmp_path, prepared_models):
    settings = real_settings(tmp_path, prepared_models, max_new_tokens=200)
    async with ChatService(settings) as service:
        task = asyncio.create_task(say(service, "Write a long story about a dragon and a knight."))
        while not service.queue.is_running("test:c1"):
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        assert (await say(service, "/stop")).notices == ["Stopped your reply."]
        sink = await task
        assert sink.status == ReplyStatus.CANCELLED
        rows = await service.store.messages(await service.store.chat_id("test", "c1"))
        assert rows[-1].status == "cancelled" and rows[-1].content
        assert (rows[-1].token_count or 0) < 200


async def test_switch_gptq_to_awq_with_chats_queued(tmp_path, prepared_models):
    settings = real_settings(tmp_path, prepared_models, max_new_tokens=16)
    engines = RealEngines(settings)
    async with ChatService(settings, engine_factory=engines) as service:
        await say(service, "Hi!", chat="warm")
        running = asyncio.create_task(say(service, "Tell me about cats.", chat="r"))
        while not service.queue.is_running("test:r"):
            await asyncio.sleep(0.01)
        switch = asyncio.create_task(say(service, "/model smollm2-awq", chat="admin"))
        while not service.queue._waiting:
            await asyncio.sleep(0.01)
        queued = [asyncio.create_task(say(service, "What is the capital of France?", chat=f"q{i}"))
                  for i in range(3)]
        assert (await switch).notices == ["Switched to smollm2-awq."]
        assert (await running).status == ReplyStatus.COMPLETE
        for i, task in enumerate(queued):
            sink = await task
            assert sink.status == ReplyStatus.COMPLETE
            rows = await service.store.messages(await service.store.chat_id("test", f"q{i}"))
            assert rows[-1].model == "smollm2-awq"
        old = engines.engines["smollm2-gptq"]
        assert not old.loaded and len(old.prompts) == 2
        # switching back and forth does not pile up models: every model switched away from is freed
        awq_loaded = rss_mb()
        models = []
        for name in ("smollm2-gptq", "smollm2-awq", "smollm2-gptq", "smollm2-awq"):
            assert (await say(service, f"/model {name}", chat="admin")).notices == [f"Switched to {name}."]
            models.append(weakref.ref(engines.engines[name].inner.model))
        gc.collect()
        assert [m() is None for m in models] == [True, True, True, False]
        # and the process does not grow by the four models loaded meanwhile (glibc's per-thread arenas
        # account for some growth under CPU load, hence the margin)
        model_mb = sum(f.stat().st_size for f in (prepared_models / "smollm2-135m-awq").iterdir()) / 2**20
        assert rss_mb() - awq_loaded < 3 * model_mb, (awq_loaded, rss_mb(), model_mb)
