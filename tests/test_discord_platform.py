"""Discord, the awkward moments: a deleted source message, people writing while the model loads at
start-up, and a gateway Discord will not give back (real discord.py against the fake Discord)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import discord
import pytest
import yarl
from discord.gateway import DiscordWebSocket

from bot.adapters.delivery import LOADING
from bot.app import run
from bot.core.service import ChatService
from tests.conftest import ToyEngines, toy_settings
from tests.fakes.discord_api import FakeDiscord
from tests.test_discord_adapter import discord_world, words_script  # noqa: F401 - the fixture

Json = dict


async def test_a_reply_to_a_deleted_message_is_still_delivered(discord_world) -> None:  # noqa: F811
    async with discord_world(script=words_script(12), delay_s=0.02) as w:
        asked = await w.fake.user_message(w.channel, w.alice, f"{w.fake.mention()} count please")
        await w.fake.delete_message(asked)  # a moderator removes it before the bot answers
        await w.until_idle()
        (reply,) = w.fake.bot_messages(w.channel)
        assert reply["content"] == " ".join(f"w{i}" for i in range(12))
        assert "message_reference" not in reply  # sent as a plain message, not as a reply
        assert not [c for c in w.fake.calls if c.status == 400]


@asynccontextmanager
async def _fake_discord(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[FakeDiscord, Json, Json, Json]]:
    fake = FakeDiscord()
    guild = fake.add_guild()
    channel = fake.add_channel(guild)
    bob = fake.add_user("bob")
    fake.add_member(guild["id"], bob)
    dm = fake.add_dm(bob)
    await fake.start()
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
    try:
        yield fake, channel, bob, dm
    finally:
        await fake.close()


def _toy_service(tmp_path: Path, fake: FakeDiscord, load_s: float = 0.0) -> ChatService:
    settings = toy_settings(tmp_path, discord_bot_token=fake.token, discord_edit_interval_s=0.05)
    return ChatService(settings, engine_factory=ToyEngines(load_s=load_s, delay_s=0.01))


async def test_people_who_write_while_the_model_loads_are_answered(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    async with _fake_discord(monkeypatch) as (fake, channel, bob, dm):
        service = _toy_service(tmp_path, fake, load_s=4.0)  # a slow model load at start-up
        stop = asyncio.Event()
        bot = asyncio.create_task(run(service.settings, stop, service))
        await asyncio.wait_for(fake.ready.wait(), 10)  # connected while the model still loads
        await fake.wait_for(lambda: bool(fake.commands.get(None)))
        assert not service.queue.engine  # still loading
        inter = await fake.interact("chat", bob, channel, {"prompt": "early bird"})
        await fake.user_message(dm, bob, "hello?")
        await fake.wait_for(lambda: inter.ack_type == 5 and LOADING in inter.original_edits, timeout=5)
        await fake.wait_for(lambda: inter.content.endswith("early bird (turn 1)"), timeout=20)
        await fake.wait_for(lambda: any(m["content"] == "You said: hello? (turn 1)" for m in fake.bot_messages(dm)),
                            timeout=20)
        stop.set()
        assert await asyncio.wait_for(bot, 30) == 0


async def test_a_gateway_discord_will_not_give_back_ends_the_process_non_zero(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    async with _fake_discord(monkeypatch) as (fake, channel, bob, dm):
        service = _toy_service(tmp_path, fake)
        bot = asyncio.create_task(run(service.settings, asyncio.Event(), service))
        await asyncio.wait_for(fake.ready.wait(), 10)
        await fake.user_message(dm, bob, "hi")
        await fake.wait_for(lambda: bool(fake.bot_messages(dm)), timeout=10)
        await fake.close_gateway(4004, "Authentication failed.")  # the token was reset in the portal
        assert await asyncio.wait_for(bot, 30) == 1  # not a silent, half-dead process
        assert any("4004" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


async def test_an_ordinary_gateway_drop_is_reconnected(discord_world) -> None:  # noqa: F811
    async with discord_world() as w:
        await w.fake.close_gateway(4000, "Unknown error")
        await w.fake.wait_for(lambda: bool(w.fake._sockets), timeout=20)  # back (resumed)
        assert (await w.chat("still there?")).content.endswith("still there? (turn 1)")
        assert not w.adapter.failed.is_set()
