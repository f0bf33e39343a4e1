"""`python -m bot run` with only DISCORD_BOT_TOKEN set, on the real GPTQ build: short and slow."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import discord
import pytest
import yarl
from discord.gateway import DiscordWebSocket

from bot.app import run
from bot.config import Settings
from bot.storage.store import HistoryStore, StoredMessage
from tests.fakes.discord_api import FakeDiscord
from tests.test_discord_adapter import growing

pytestmark = pytest.mark.slow
TIMEOUT_S = 180.0  # model load plus two short replies on a slow CPU


async def until(check: Callable[[], object], timeout: float = TIMEOUT_S) -> None:
    """Await `check()` (sync or async) until it is true."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.1)


async def test_bot_run_serves_discord_on_the_real_gptq_build(tmp_path: Path, prepared_models: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeDiscord()
    guild = fake.add_guild()
    channel = fake.add_channel(guild)
    alice = fake.add_user("alice")
    fake.add_member(guild["id"], alice)
    await fake.start()
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
    db = f"sqlite+aiosqlite:///{tmp_path}/discord.db"
    settings = Settings(models_dir=prepared_models, default_model="smollm2-gptq", max_new_tokens=24,
                        temperature=0.0, database_url=db, discord_bot_token=fake.token,
                        discord_edit_interval_s=0.05, _env_file=None)
    stop = asyncio.Event()
    app = asyncio.create_task(run(settings, stop))
    reader = HistoryStore(db)

    async def replies() -> list[StoredMessage]:
        chat = await reader.chat_id("discord", channel["id"])
        return [m for m in await reader.messages(chat) if m.role == "assistant" and m.status != "pending"]

    try:
        await until(lambda: fake.ready.is_set() or app.done())
        assert not app.done(), app.exception()
        assert {c["name"] for c in fake.commands[None]} == {"chat", "help", "reset", "model", "stop", "system", "persona", "retry", "stats"}

        inter = await fake.interact("chat", alice, channel, {"prompt": "What is the capital of France?"})

        async def chat_done() -> bool:
            found = await replies()
            return len(found) == 1 and inter.content == found[0].content

        await until(chat_done)
        await fake.user_message(channel, alice, f"{fake.mention()} Say that again, in one word.")

        async def mention_done() -> bool:
            found = await replies()
            mine = [m for m in fake.bot_messages(channel) if "webhook_id" not in m]
            return len(found) == 2 and len(mine) == 1 and mine[0]["content"] == found[1].content

        await until(mention_done)
        stored = await replies()
    finally:
        stop.set()
        await asyncio.wait_for(app, TIMEOUT_S)
        await reader.close()
        await fake.close()

    assert [m.status for m in stored] == ["complete", "complete"]
    assert all(m.content.strip() for m in stored)
    assert inter.ack_type == 5 and growing([e for e in inter.original_edits if not e.startswith(("⏳", "✍️"))])
    assert len(inter.original_edits) >= 2  # streamed, not one final edit
