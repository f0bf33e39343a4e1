"""The storage layer and the chat service on a real PostgreSQL (asyncpg), as with SQLite.

Needs POSTGRES_TEST_URL (`eval "$(scripts/start-postgres.sh)"` starts a throwaway server and sets
it); the role must be allowed to create databases: every test gets a fresh database.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from bot.core.messages import IncomingMessage, ReplyStatus
from bot.core.service import ChatService
from bot.storage import migrate
from bot.storage.store import HistoryStore
from tests.conftest import ToyEngines, toy_settings
from tests.sinks import RecordingSink

ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("POSTGRES_TEST_URL", "")
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not PG_URL, reason="POSTGRES_TEST_URL is not set (eval \"$(scripts/start-postgres.sh)\")"),
]


async def _admin(sql: str) -> None:
    import asyncpg

    url = make_url(PG_URL)
    conn = await asyncpg.connect(host=url.host, port=url.port, user=url.username, password=url.password,
                                 database=url.database)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty database on the test server (dropped afterwards)."""
    name = f"qb_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f"CREATE DATABASE {name}"))
    try:
        yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


async def tables(url: str) -> set[str]:
    from sqlalchemy import text

    from bot.storage.db import make_engine

    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
            return {r[0] for r in rows}
    finally:
        await engine.dispose()


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[HistoryStore]:
    await asyncio.to_thread(migrate.upgrade, pg_url)
    s = HistoryStore(pg_url)
    try:
        yield s
    finally:
        await s.close()


def msg(text: str, chat: str = "c1", user: str = "u1") -> IncomingMessage:
    return IncomingMessage(platform="test", chat_id=chat, user_id=user, user_name=user, text=text)


async def test_migrations_upgrade_downgrade_round_trip(pg_url: str) -> None:
    await asyncio.to_thread(migrate.upgrade, pg_url)
    assert await tables(pg_url) == {"alembic_version", "chats", "messages"}
    s = HistoryStore(pg_url)
    try:
        chat = await s.chat_id("t", "1")
        await s.add(chat, "user", "hello", user_id="u1")
    finally:
        await s.close()
    await asyncio.to_thread(migrate.downgrade, pg_url, "0003")  # drops messages.user_id
    await asyncio.to_thread(migrate.upgrade, pg_url)
    s = HistoryStore(pg_url)
    try:
        rows = await s.messages(await s.chat_id("t", "1"))
        assert [(r.content, r.user_id) for r in rows] == [("hello", None)]
    finally:
        await s.close()
    await asyncio.to_thread(migrate.downgrade, pg_url, "base")
    assert await tables(pg_url) == {"alembic_version"}


async def test_store_keeps_history_statuses_and_clears(store: HistoryStore) -> None:
    chat = await store.chat_id("telegram", "42")
    assert await store.chat_id("telegram", "42") == chat
    assert await store.chat_id("discord", "42") != chat
    await store.add(chat, "user", "hi ünïcode ✓", user_id="u1")
    reply = await store.add(chat, "assistant", "", status="pending", model="m")
    await store.add(chat, "user", "rejected one", status="rejected")
    assert await store.mark_interrupted() == 1
    assert [m.status for m in await store.messages(chat)] == ["complete", "incomplete", "rejected"]
    await store.finish(reply, "hello back", "complete", token_count=3)
    assert [(m.role, m.content) for m in await store.context(chat)] == [
        ("user", "hi ünïcode ✓"), ("assistant", "hello back")]
    assert await store.clear(chat) == 3
    assert await store.messages(chat) == []


async def test_concurrent_first_messages_create_one_chat(store: HistoryStore, pg_url: str) -> None:
    other = HistoryStore(pg_url)  # a second process's connection pool
    try:
        ids = await asyncio.gather(*[(store if i % 2 else other).chat_id("telegram", "new-chat") for i in range(10)])
    finally:
        await other.close()
    assert len(set(ids)) == 1


async def test_service_multi_turn_history_on_postgres(pg_url: str, tmp_path: Path) -> None:
    async with ChatService(toy_settings(tmp_path, database_url=pg_url), engine_factory=ToyEngines()) as service:
        for text in ("my name is Zed", "I like tea"):
            await service.handle(msg(text), RecordingSink())
        third = RecordingSink()
        await service.handle(msg("what is my name?"), third)
        assert third.final == "You said: what is my name? (turn 3)"
        prompt = service._engine_factory.engines["toy-a"].prompts[-1]  # type: ignore[attr-defined]
        assert [m.content for m in prompt if m.role == "user"] == ["my name is Zed", "I like tea", "what is my name?"]
        reset = RecordingSink()
        await service.handle(msg("/reset"), reset)
        after = RecordingSink()
        await service.handle(msg("again"), after)
        assert after.final == "You said: again (turn 1)"


async def test_two_services_on_one_database_keep_every_message(pg_url: str, tmp_path: Path) -> None:
    """Two bot processes (own engines, own connection pools) write the same chats at once."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    settings_a = toy_settings(tmp_path / "a", database_url=pg_url, queue_max=100)
    settings_b = toy_settings(tmp_path / "b", database_url=pg_url, queue_max=100)
    service_a = ChatService(settings_a, engine_factory=ToyEngines(delay_s=0.001))
    service_b = ChatService(settings_b, engine_factory=ToyEngines(delay_s=0.001))
    await service_a.start()
    await service_b.start()  # finds the schema at head (concurrent start-ups: see the next test)
    chats = ["shared-1", "shared-2", "only-a", "only-b"]
    per_chat = 6
    try:
        async def talk(service: ChatService, chat: str, who: str) -> list[RecordingSink]:
            sinks = []
            for i in range(per_chat):  # one chat's messages are sequential per person, as in real use
                sink = RecordingSink()
                await service.handle(msg(f"{who} says {i} in {chat}", chat, user=who), sink)
                sinks.append(sink)
            return sinks

        results = await asyncio.gather(
            talk(service_a, "shared-1", "ann"), talk(service_b, "shared-1", "bob"),
            talk(service_a, "shared-2", "cat"), talk(service_b, "shared-2", "dan"),
            talk(service_a, "only-a", "eve"), talk(service_b, "only-b", "fay"),
        )
        assert all(s.status == ReplyStatus.COMPLETE for sinks in results for s in sinks)

        for chat in chats:
            rows = await service_a.store.messages(await service_a.store.chat_id("test", chat))
            users = [r for r in rows if r.role == "user"]
            replies = [r for r in rows if r.role == "assistant"]
            expected_people = 2 if chat.startswith("shared") else 1
            assert len(users) == per_chat * expected_people, chat
            assert len(replies) == per_chat * expected_people, chat
            assert all(r.status == "complete" for r in rows), chat
            assert all(r.content.startswith("You said: ") for r in replies), chat
            assert {u.content for u in users} == {
                f"{who} says {i} in {chat}"
                for who in {r.user_id for r in users} for i in range(per_chat)}
            # each person's own messages keep their order
            for who in {u.user_id for u in users}:
                mine = [u.content for u in users if u.user_id == who]
                assert mine == [f"{who} says {i} in {chat}" for i in range(per_chat)]
        # one database, one set of chats: both services see the same row for a chat
        assert await service_a.store.chat_id("test", "shared-1") == await service_b.store.chat_id("test", "shared-1")
    finally:
        await asyncio.gather(service_a.close(), service_b.close())


def test_bot_processes_migrating_at_once_all_succeed(pg_url: str) -> None:
    """Several bot processes starting together (a compose restart) each run the migrations."""
    env = {**os.environ, "DATABASE_URL": pg_url}
    procs = [subprocess.Popen([sys.executable, "-m", "bot", "db", "upgrade"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-500:] for _, err in results]
    assert asyncio.run(tables(pg_url)) == {"alembic_version", "chats", "messages"}


async def test_a_second_process_starting_does_not_break_a_running_reply(pg_url: str, tmp_path: Path) -> None:
    """Start-up marks replies left pending by a *dead* process; a live one must still finish its reply."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    factory_a = ToyEngines(delay_s=0.05)
    async with ChatService(toy_settings(tmp_path / "a", database_url=pg_url), engine_factory=factory_a) as service_a:
        sink = RecordingSink()
        task = asyncio.create_task(service_a.handle(msg("one two three four five six seven eight"), sink))
        await asyncio.wait_for(sink.started_event.wait(), 30)
        async with ChatService(toy_settings(tmp_path / "b", database_url=pg_url), engine_factory=ToyEngines()):
            pass
        await asyncio.wait_for(task, 60)
        assert sink.status == ReplyStatus.COMPLETE
        rows = await service_a.store.messages(await service_a.store.chat_id("test", "c1"))
        assert [(r.role, r.status) for r in rows] == [("user", "complete"), ("assistant", "complete")]
        assert rows[1].content == sink.final
