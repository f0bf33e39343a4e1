"""Telegram and Discord adapters in one process share one service, so one queue and one model."""

from __future__ import annotations

import asyncio
from typing import Any

import discord
import pytest
import yarl
from discord.gateway import DiscordWebSocket

from bot.adapters.discord import DiscordAdapter
from bot.adapters.telegram import TelegramAdapter
from bot.app import configured_adapters
from bot.engines.base import ChatMessage
from tests.fakes.discord_api import FakeDiscord
from tests.fakes.telegram_api import FakeTelegram

ALICE_TG = 1001
WORDS = 25


def numbered(messages: list[ChatMessage]) -> str:
    last = messages[-1].content
    return " ".join(f"{last}-{i}" for i in range(WORDS))


async def test_both_adapters_share_one_queue_and_model(make_toy_service: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    discord_fake = FakeDiscord()
    guild = discord_fake.add_guild()
    channel = discord_fake.add_channel(guild)
    bob = discord_fake.add_user("bob")
    discord_fake.add_member(guild["id"], bob)
    await discord_fake.start()
    monkeypatch.setattr(discord.http.Route, "BASE", discord_fake.api_base)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(discord_fake.gateway_url))
    try:
        async with FakeTelegram() as tg_fake:
            settings = {"telegram_bot_token": tg_fake.token, "telegram_api_base_url": tg_fake.base_url,
                        "discord_bot_token": discord_fake.token, "telegram_edit_interval_private_s": 0.05,
                        "discord_edit_interval_s": 0.05}
            async with make_toy_service(script=numbered, delay_s=0.04, **settings) as service:
                assert set(configured_adapters(service.settings, service)) == {"telegram", "discord"}
                telegram = TelegramAdapter(service.settings, service, poll_timeout=1, stop_grace=5)
                discord_adapter = DiscordAdapter(service.settings, service, guild_ready_timeout_s=0.1)
                await telegram.start()
                await discord_adapter.start()
                try:
                    await asyncio.wait_for(discord_adapter.ready.wait(), 10)
                    await tg_fake.user_says("tg")
                    await tg_fake.wait_for(lambda: any("tg-" in d.text for d in tg_fake.drafts_in(ALICE_TG)))  # began
                    inter = await discord_fake.interact("chat", bob, channel, {"prompt": "dc"})

                    tg_final = " ".join(f"tg-{i}" for i in range(WORDS))
                    dc_final = " ".join(f"Bob: dc-{i}" for i in range(WORDS))  # a guild channel: the turn names its speaker
                    await discord_fake.wait_for(lambda: inter.content == dc_final, timeout=20)
                    await tg_fake.wait_for(lambda: [m.text for m in tg_fake.bot_messages(ALICE_TG)] == [tg_final])

                    # Discord's request waited in the one queue while Telegram's reply was generated.
                    assert any(e.startswith("⏳ Waiting in line: number 1") for e in inter.original_edits)
                    first_text = next(e for e in inter.original_edits if e.startswith("Bob: dc-"))
                    assert inter.original_edits.index(first_text) > 0
                    engine = service.toy_engines.engines["toy-a"]
                    assert list(service.toy_engines.engines) == ["toy-a"]  # one model for both
                    assert [p[-1].content for p in engine.prompts] == ["tg", "Bob: dc"]
                finally:
                    await discord_adapter.stop()
                    await telegram.stop()
    finally:
        await discord_fake.close()
