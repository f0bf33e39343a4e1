"""The fake Discord holds the real discord.py client to Discord's rules (so adapter tests mean something)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import discord
import pytest
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket

from tests.fakes.discord_api import FakeDiscord

Json = dict[str, Any]


@asynccontextmanager
async def plain_client(monkeypatch: pytest.MonkeyPatch, message_content: bool = True,
                       **fake_kwargs: Any) -> AsyncIterator[tuple[FakeDiscord, discord.Client, Json, Json, list[Any]]]:
    """A bare discord.Client with one `/echo text:` command whose behaviour each test sets."""
    fake = FakeDiscord(**fake_kwargs)
    guild = fake.add_guild()
    channel = fake.add_channel(guild)
    alice = fake.add_user("alice")
    fake.add_member(guild["id"], alice)
    await fake.start()
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
    intents = discord.Intents.none()
    intents.guilds = intents.guild_messages = True
    intents.message_content = message_content
    client = discord.Client(intents=intents, guild_ready_timeout=0.05)
    tree = app_commands.CommandTree(client)
    seen: list[Any] = []  # messages the client got, or results/errors the command produced
    client.behaviour = None  # type: ignore[attr-defined]

    @tree.command(description="test command")
    async def echo(interaction: discord.Interaction, text: str) -> None:
        try:
            seen.append(await client.behaviour(interaction, text))  # type: ignore[attr-defined]
        except discord.HTTPException as exc:
            seen.append(exc)

    @client.event
    async def on_message(message: discord.Message) -> None:
        seen.append(message)

    await client.login(fake.token)
    await tree.sync()
    task = asyncio.create_task(client.connect())
    await asyncio.wait_for(client.wait_until_ready(), 10)
    try:
        yield fake, client, channel, alice, seen
    finally:
        await client.close()
        await task
        await fake.close()


async def run_echo(fake: FakeDiscord, client: discord.Client, channel: Json, alice: Json, seen: list[Any],
                   behaviour: Any) -> Any:
    client.behaviour = behaviour  # type: ignore[attr-defined]
    await fake.interact("echo", alice, channel, {"text": "hi"})
    await fake.wait_for(lambda: len(seen) == 1)
    return seen[0]


async def test_an_acknowledgement_after_three_seconds_is_unknown_interaction(monkeypatch) -> None:
    async with plain_client(monkeypatch, ack_timeout_s=0.2) as (fake, client, channel, alice, seen):
        async def late(interaction: discord.Interaction, text: str) -> None:
            await asyncio.sleep(0.3)
            await interaction.response.defer()

        error = await run_echo(fake, client, channel, alice, seen, late)
        assert isinstance(error, discord.NotFound) and error.code == 10062


async def test_acknowledging_twice_is_refused(monkeypatch) -> None:
    async with plain_client(monkeypatch) as (fake, client, channel, alice, seen):
        async def twice(interaction: discord.Interaction, text: str) -> None:
            await interaction.response.defer()
            interaction.response._response_type = None  # get past discord.py's own guard
            await interaction.response.send_message("again")

        error = await run_echo(fake, client, channel, alice, seen, twice)
        assert isinstance(error, discord.HTTPException) and error.code == 40060


async def test_content_over_2000_characters_is_an_invalid_form_body(monkeypatch) -> None:
    async with plain_client(monkeypatch) as (fake, client, channel, alice, seen):
        async def too_long(interaction: discord.Interaction, text: str) -> None:
            await interaction.response.defer()
            await interaction.edit_original_response(content="x" * 2001)

        error = await run_echo(fake, client, channel, alice, seen, too_long)
        assert isinstance(error, discord.HTTPException) and error.status == 400 and error.code == 50035
        with pytest.raises(discord.HTTPException) as info:
            await client.get_channel(int(channel["id"])).send("y" * 2001)
        assert info.value.code == 50035


async def test_an_expired_interaction_token_is_an_invalid_webhook_token(monkeypatch) -> None:
    async with plain_client(monkeypatch, token_ttl_s=0.2) as (fake, client, channel, alice, seen):
        async def slow(interaction: discord.Interaction, text: str) -> None:
            await interaction.response.defer()
            await asyncio.sleep(0.3)
            await interaction.followup.send("too late")

        error = await run_echo(fake, client, channel, alice, seen, slow)
        assert isinstance(error, discord.HTTPException) and error.code == 50027


async def test_a_429_with_via_is_retried_and_one_without_is_a_ban(monkeypatch) -> None:
    async with plain_client(monkeypatch) as (fake, client, channel, alice, seen):
        text_channel = client.get_channel(int(channel["id"]))
        fake.fail_next("POST", r"/channels/\d+/messages$", retry_after=0.1)
        sent = await text_channel.send("after a rate limit")
        assert sent.content == "after a rate limit"
        assert [c.status for c in fake.calls_to("POST", r"/channels/\d+/messages$")] == [429, 200]

        fake.fail_next("POST", r"/channels/\d+/messages$", retry_after=0.1)
        fake._failures[-1].headers.pop("Via")  # what a Cloudflare ban looks like
        with pytest.raises(discord.HTTPException) as info:
            await text_channel.send("banned")
        assert info.value.status == 429


async def test_guild_messages_lack_content_without_the_intent_unless_they_mention_the_bot(monkeypatch) -> None:
    async with plain_client(monkeypatch, message_content=False) as (fake, client, channel, alice, seen):
        await fake.user_message(channel, alice, "hello people")
        await fake.user_message(channel, alice, f"{fake.mention()} hello bot")
        await fake.wait_for(lambda: len(seen) == 2)
        assert [m.content for m in seen] == ["", f"{fake.mention()} hello bot"]


async def test_privileged_intents_not_enabled_close_the_gateway_with_4014(monkeypatch) -> None:
    fake = FakeDiscord(privileged_intents=0)
    await fake.start()
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
    intents = discord.Intents.none()
    intents.message_content = True
    client = discord.Client(intents=intents)
    try:
        await client.login(fake.token)
        with pytest.raises(discord.PrivilegedIntentsRequired):
            await asyncio.wait_for(client.connect(reconnect=True), 10)
    finally:
        await client.close()
        await fake.close()


async def test_every_call_is_recorded_and_the_bot_token_is_checked(monkeypatch) -> None:
    fake = FakeDiscord()
    await fake.start()
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    client = discord.Client(intents=discord.Intents.none())
    try:
        with pytest.raises(discord.LoginFailure):
            await client.login("wrong" * 12)
        assert [(c.method, c.path, c.status) for c in fake.calls] == [("GET", "/users/@me", 401)]
    finally:
        await client.close()
        await fake.close()
