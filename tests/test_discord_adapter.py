"""The Discord adapter with the real discord.py client against the fake Discord on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import discord
import pytest
import yarl
from discord.gateway import DiscordWebSocket
from pydantic import SecretStr

from bot.adapters.discord import DiscordAdapter
from bot.adapters.textsplit import split_parts
from bot.core.service import ChatService
from bot.engines.base import ChatMessage
from bot.errors import BotError
from tests.fakes.discord_api import MANAGE_MESSAGES, FakeDiscord, FakeInteraction

Json = dict[str, Any]
FAST_EDITS = 0.05  # seconds between edits in these tests (the default is 1 s)
BUSY_TASKS = ("CommandTree-invoker", "discord.py: on_message", "streaming-reply")


@dataclass
class World:
    fake: FakeDiscord
    adapter: DiscordAdapter
    service: ChatService
    guild: Json
    channel: Json
    other_channel: Json
    alice: Json  # a member with the "chatters" role
    bob: Json  # a member without roles
    dm: Json  # alice's DM with the bot
    carol: Json  # a member with the "mods" role (Manage Messages)

    async def command(self, name: str, options: dict[str, Any] | None = None, user: Json | None = None,
                      channel: Json | None = None) -> FakeInteraction:
        """Run a slash command and wait until the bot has finished answering it."""
        inter = await self.fake.interact(name, user or self.alice, channel or self.channel, options)
        await self.until_idle()
        return inter

    async def chat(self, prompt: str, user: Json | None = None, channel: Json | None = None) -> FakeInteraction:
        return await self.command("chat", {"prompt": prompt}, user, channel)

    async def say(self, content: str, user: Json | None = None, channel: Json | None = None,
                  reply_to: Json | None = None) -> Json:
        """Post a message as a person and wait until the bot is done with it."""
        msg = await self.fake.user_message(channel or self.channel, user or self.alice, content, reply_to=reply_to)
        await self.until_idle()
        return msg

    async def until_idle(self, timeout: float = 15.0) -> None:
        """Wait until the adapter's command and message handlers (and their edit loops) have returned."""
        await asyncio.sleep(0.05)

        def busy() -> bool:
            return any(t.get_name() in BUSY_TASKS and not t.done() for t in asyncio.all_tasks())

        await self.fake.wait_for(lambda: not busy(), timeout)

    async def stored(self, channel: Json) -> list[tuple[str, str, str]]:
        chat = await self.service.store.chat_id("discord", channel["id"])
        return [(m.role, m.content, m.status) for m in await self.service.store.messages(chat)]

    async def stored_replies(self, channel: Json) -> list[str]:
        return [content for role, content, _ in await self.stored(channel) if role == "assistant"]


@asynccontextmanager
async def running_world(make_service: Callable[..., AbstractAsyncContextManager[ChatService]],
                        monkeypatch: pytest.MonkeyPatch, fake_kwargs: dict[str, Any] | None = None,
                        sync_to_guild: bool = False, settings: Callable[[dict[str, Json]], dict[str, Any]] | None = None,
                        **kwargs: Any) -> AsyncIterator[World]:
    """A fake Discord (a guild with #general and #random, alice with the "chatters" role, bob, alice's DM,
    carol with the "mods" role that has Manage Messages)
    and the real adapter connected to it, around the service `make_service(**settings)` makes.

    `fake_kwargs` go to FakeDiscord; `sync_to_guild=True` sets DISCORD_GUILD_IDS to the test guild;
    `settings(ids)` may compute settings from the fake's objects (users, roles, channels).
    """
    fake = FakeDiscord(**(fake_kwargs or {}))
    guild = fake.add_guild(roles=["chatters", "mods"], permissions={"mods": MANAGE_MESSAGES})
    channel, other = fake.add_channel(guild, "general"), fake.add_channel(guild, "random")
    alice, bob, carol = fake.add_user("alice"), fake.add_user("bob"), fake.add_user("carol")
    fake.add_member(guild["id"], alice, ["chatters"])
    fake.add_member(guild["id"], bob)
    fake.add_member(guild["id"], carol, ["mods"])
    dm = fake.add_dm(alice)
    await fake.start()
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
    kwargs.setdefault("discord_edit_interval_s", FAST_EDITS)
    if sync_to_guild:
        kwargs["discord_guild_ids"] = guild["id"]
    if settings is not None:
        kwargs.update(settings({"guild": guild, "channel": channel, "other": other, "alice": alice, "bob": bob,
                                "carol": carol}))
    try:
        async with make_service(discord_bot_token=fake.token, **kwargs) as service:
            adapter = DiscordAdapter(service.settings, service, guild_ready_timeout_s=0.1)
            await adapter.start()
            try:
                await asyncio.wait_for(adapter.ready.wait(), 10)
                yield World(fake, adapter, service, guild, channel, other, alice, bob, dm, carol)
            finally:
                await adapter.stop()
    finally:
        await fake.close()


@pytest.fixture
def discord_world(make_toy_service: Callable[..., AbstractAsyncContextManager[ChatService]],
                  monkeypatch: pytest.MonkeyPatch) -> Callable[..., AbstractAsyncContextManager[World]]:
    """`async with discord_world(**settings_or_engine_kwargs) as w:` -> a bot on the toy service."""

    def make(**kwargs: Any) -> AbstractAsyncContextManager[World]:
        kwargs.setdefault("delay_s", 0.01)
        return running_world(make_toy_service, monkeypatch, **kwargs)

    return make


def growing(edits: list[str]) -> bool:
    """Each edit extends the one before it (an edit that repeats the text changes only the buttons: the final
    one adds Regenerate, a newer reply takes it away)."""
    distinct = [e for i, e in enumerate(edits) if i == 0 or e != edits[i - 1]]
    return all(b.startswith(a) and len(b) > len(a) for a, b in zip(distinct, distinct[1:]))


def words_script(n: int) -> Callable[[list[ChatMessage]], str]:
    return lambda messages: " ".join(f"w{i}" for i in range(n))


# --------------------------------------------------------------------------- command sync


async def test_all_four_commands_are_synced_globally(discord_world) -> None:
    async with discord_world() as w:
        assert [scope for scope, _ in w.fake.command_puts] == [None]
        commands = {c["name"]: c for c in w.fake.commands[None]}
        assert set(commands) == {"chat", "help", "reset", "model", "stop", "system", "persona", "retry", "stats"}
        prompt = commands["chat"]["options"][0]
        assert (prompt["name"], prompt["type"], prompt["required"]) == ("prompt", 3, True)
        name = commands["model"]["options"][0]
        assert name["name"] == "name" and name["autocomplete"] is True and not name.get("required", False)


async def test_guild_ids_sync_the_commands_to_that_guild_instead(discord_world) -> None:
    async with discord_world(sync_to_guild=True) as w:
        assert [scope for scope, _ in w.fake.command_puts] == [w.guild["id"]]
        assert {c["name"] for c in w.fake.commands[w.guild["id"]]} == {"chat", "help", "reset", "model", "stop", "system",
                                                                       "persona", "retry", "stats"}
        inter = await w.chat("hi there")
        assert inter.content == "You said: Alice: hi there (turn 1)"


# --------------------------------------------------------------------------- /chat


async def test_chat_defers_then_edits_the_original_with_growing_text(discord_world) -> None:
    async with discord_world(script=words_script(40), delay_s=0.02) as w:
        inter = await w.chat("count please")
        assert inter.ack_type == 5 and not inter.ephemeral  # deferred (in time: the fake enforces 3 s), public
        assert len(inter.original_edits) >= 3, inter.original_edits
        assert growing(inter.original_edits)
        final = " ".join(f"w{i}" for i in range(40))
        assert inter.content == final == inter.original_edits[-1]
        assert await w.stored_replies(w.channel) == [final]
        assert inter.followups == []


async def test_chat_keeps_history_per_channel_over_several_turns(discord_world) -> None:
    async with discord_world() as w:
        assert (await w.chat("one")).content == "You said: Alice: one (turn 1)"
        # a second person in the channel: from now on each user turn names its speaker
        assert (await w.chat("two", user=w.bob)).content == "You said: Bob: two (turn 2)"
        assert (await w.chat("elsewhere", channel=w.other_channel)).content == "You said: Alice: elsewhere (turn 1)"
        assert (await w.chat("three")).content == "You said: Alice: three (turn 3)"
        prompts = w.service.toy_engines.engines["toy-a"].prompts
        assert [m.content for m in prompts[-1] if m.role == "user"] == ["Alice: one", "Bob: two", "Alice: three"]


async def test_reset_answers_ephemerally_and_forgets_the_channel(discord_world) -> None:
    async with discord_world() as w:
        await w.chat("one")
        reset = await w.command("reset", user=w.carol)  # in a channel: a moderator's command
        assert reset.ephemeral and reset.ack_type == 5
        assert reset.content == "History cleared. Let's start over."
        assert (await w.chat("again")).content == "You said: Alice: again (turn 1)"


async def test_model_autocomplete_marks_the_current_model_and_switching_works(discord_world) -> None:
    async with discord_world(settings=lambda ids: {"admin_users": ids["alice"]["id"]}) as w:
        typed = await w.fake.interact("model", w.alice, w.channel, {"name": ""}, focused="name")
        await asyncio.wait_for(typed.responded.wait(), 5)
        assert typed.ack_type == 8
        assert typed.choices == [{"name": "toy-a (current)", "value": "toy-a"}, {"name": "toy-b", "value": "toy-b"}]
        narrowed = await w.fake.interact("model", w.alice, w.channel, {"name": "B"}, focused="name")
        await asyncio.wait_for(narrowed.responded.wait(), 5)
        assert narrowed.choices == [{"name": "toy-b", "value": "toy-b"}]

        switch = await w.command("model", {"name": "toy-b"})
        assert switch.ephemeral and switch.content == "Switched to toy-b."
        assert w.service.current_model == "toy-b"
        listing = await w.command("model")
        assert "* toy-b" in listing.content and listing.ephemeral
        assert (await w.chat("hello")).content == "You said: Alice: hello (turn 1)"
        assert w.service.toy_engines.engines["toy-b"].prompts


async def test_model_switch_is_admin_only_when_admins_are_configured(discord_world) -> None:
    async with discord_world(settings=lambda ids: {"admin_users": ids["alice"]["id"]}) as w:
        refused = await w.command("model", {"name": "toy-b"}, user=w.bob)
        assert refused.ephemeral and refused.content == "Only admins can switch the model."
        assert w.service.current_model == "toy-a"
        allowed = await w.command("model", {"name": "toy-b"}, user=w.alice)
        assert allowed.content == "Switched to toy-b."


async def test_a_slow_model_switch_is_still_acknowledged_in_time(discord_world) -> None:
    # The fake refuses acknowledgements after 0.5 s here; loading takes 1 s.
    async with discord_world(fake_kwargs={"ack_timeout_s": 0.5}, load_s=1.0,
                             settings=lambda ids: {"admin_users": ids["alice"]["id"]}) as w:
        switch = await w.command("model", {"name": "toy-b"})
        assert switch.ack_type == 5
        assert switch.content == "Switched to toy-b."
        assert not [c for c in w.fake.calls if c.status == 404]


async def test_stop_ends_a_running_reply_and_the_partial_text_stays(discord_world) -> None:
    async with discord_world(script=words_script(400), delay_s=0.01) as w:
        inter = await w.fake.interact("chat", w.alice, w.channel, {"prompt": "long"})
        await w.fake.wait_for(lambda: len(inter.original_edits) >= 2)
        stop = await w.command("stop")
        assert stop.ephemeral and stop.content == "Stopped your reply."
        assert inter.content.endswith("(stopped)")
        assert inter.content.startswith("w0 w1")
        (_, content, status), = [r for r in await w.stored(w.channel) if r[0] == "assistant"]
        assert status == "cancelled" and inter.content.startswith(content)


# --------------------------------------------------------------------------- mentions and DMs


async def test_a_mention_is_answered_with_a_reply_that_is_then_edited(discord_world) -> None:
    async with discord_world(script=words_script(30), delay_s=0.02) as w:
        asked = await w.say(f"{w.fake.mention()} count please")
        (reply,) = w.fake.bot_messages(w.channel)
        assert reply["message_reference"]["message_id"] == asked["id"]
        assert reply["content"] == " ".join(f"w{i}" for i in range(30))
        assert len(reply.get("_edits", [])) >= 2 and growing([reply["_edits"][0], reply["content"]])
        prompt = w.service.toy_engines.engines["toy-a"].prompts[-1]
        assert prompt[-1].content == "Alice: count please"  # the mention itself is not part of the prompt


async def test_mentioning_the_bots_role_counts_as_mentioning_the_bot(discord_world) -> None:
    async with discord_world() as w:
        await w.say(f"{w.fake.bot_role_mention(w.guild)} are you there?")
        assert [m["content"] for m in w.fake.bot_messages(w.channel)] == ["You said: Alice: are you there? (turn 1)"]


async def test_channel_messages_that_do_not_address_the_bot_are_ignored(discord_world) -> None:
    async with discord_world() as w:
        await w.say("just chatting among people")
        await w.say("hey <@123456789012345678> look")
        assert w.fake.bot_messages(w.channel) == []
        assert await w.stored(w.channel) == []


async def test_replying_to_the_bot_without_a_mention_continues_the_conversation(discord_world) -> None:
    async with discord_world() as w:
        await w.say(f"{w.fake.mention()} first")
        (answer,) = w.fake.bot_messages(w.channel)
        await w.say("second", reply_to=answer)
        replies = w.fake.bot_messages(w.channel)
        assert [m["content"] for m in replies] == ["You said: Alice: first (turn 1)", "You said: Alice: second (turn 2)"]


async def test_direct_messages_are_prompts_and_text_commands_work_there(discord_world) -> None:
    async with discord_world() as w:
        await w.say("hello in private", channel=w.dm)
        await w.say("/reset", channel=w.dm)
        await w.say("fresh start", channel=w.dm)
        contents = [m["content"] for m in w.fake.bot_messages(w.dm)]
        assert contents == ["You said: hello in private (turn 1)", "History cleared. Let's start over.",
                            "You said: fresh start (turn 1)"]
        assert w.fake.bot_messages(w.channel) == []
        assert (await w.chat("and a slash command", channel=w.dm)).content == \
            "You said: and a slash command (turn 2)"  # /chat in the DM shares the DM's history


async def test_threads_have_their_own_history(discord_world) -> None:
    async with discord_world() as w:
        thread = w.fake.add_thread(w.channel)
        await w.fake.dispatch("THREAD_CREATE", thread | {"newly_created": True})
        await w.say(f"{w.fake.mention()} in channel")
        await w.say(f"{w.fake.mention()} in thread", channel=thread)
        assert [m["content"] for m in w.fake.bot_messages(thread)] == ["You said: Alice: in thread (turn 1)"]


# --------------------------------------------------------------------------- long replies, limits


CODE_REPLY = ("Here is the program:\n\n```python\n" + "".join(f"print('line {i:03d} of the listing')\n"
                                                              for i in range(120)) + "```\nThat's all.")


async def test_a_reply_over_2000_characters_continues_in_follow_ups_without_loss(discord_world) -> None:
    assert len(CODE_REPLY) > 4000
    async with discord_world(script=lambda m: CODE_REPLY, delay_s=0.0, max_new_tokens=1000) as w:
        inter = await w.chat("write code")
        messages = [inter.original] + inter.followups
        assert len(messages) >= 3
        assert all(len(m["content"]) <= 2000 for m in messages)
        assert [m["content"] for m in messages] == [c.text for c in split_parts(CODE_REPLY, 2000)]
        assert "".join(c.body for c in split_parts(CODE_REPLY, 2000)) == CODE_REPLY
        for m in messages:  # every message renders on its own: fences balanced
            assert m["content"].count("```") % 2 == 0
        assert not [c for c in w.fake.calls if c.status == 400]
        assert await w.stored_replies(w.channel) == [CODE_REPLY]


async def test_a_long_mention_reply_continues_in_channel_messages(discord_world) -> None:
    async with discord_world(script=lambda m: CODE_REPLY, delay_s=0.0, max_new_tokens=1000) as w:
        await w.say(f"{w.fake.mention()} code please")
        contents = [m["content"] for m in w.fake.bot_messages(w.channel)]
        assert contents == [c.text for c in split_parts(CODE_REPLY, 2000)]


async def test_a_rate_limited_edit_is_retried_and_the_final_text_arrives(discord_world) -> None:
    async with discord_world(script=words_script(40), delay_s=0.02) as w:
        w.fake.fail_next("PATCH", r"/messages/@original$", status=429, retry_after=0.3, count=2)
        inter = await w.chat("go")
        limited = [c for c in w.fake.calls if c.status == 429]
        assert len(limited) == 2
        patches = w.fake.calls_to("PATCH", r"/messages/@original$")
        first_ok = next(c for c in patches if c.status == 200)
        assert first_ok.t - limited[0].t >= 0.25  # waited retry_after instead of hammering
        assert inter.content == " ".join(f"w{i}" for i in range(40))


async def test_an_expired_interaction_token_continues_in_channel_messages(discord_world) -> None:
    # The fake's tokens die after 0.6 s (Discord: 15 min); the reply takes about 1.5 s.
    async with discord_world(fake_kwargs={"token_ttl_s": 0.6}, script=words_script(60), delay_s=0.025) as w:
        inter = await w.chat("take your time")
        final = " ".join(f"w{i}" for i in range(60))
        assert [c for c in w.fake.calls if isinstance(c.response, dict) and c.response.get("code") == 50027]
        later = [m for m in w.fake.bot_messages(w.channel) if "webhook_id" not in m]
        assert later and later[-1]["content"] == final
        assert final.startswith(inter.content)  # the original keeps what it had shown
        assert await w.stored_replies(w.channel) == [final]


async def test_the_adapter_switches_to_channel_messages_before_the_token_expires(discord_world) -> None:
    async with discord_world(script=words_script(60), delay_s=0.025) as w:
        w.adapter.token_ttl_s = 0.6
        await w.chat("take your time")
        assert not [c for c in w.fake.calls if c.status >= 400]
        later = [m for m in w.fake.bot_messages(w.channel) if "webhook_id" not in m]
        assert later[-1]["content"] == " ".join(f"w{i}" for i in range(60))


async def test_a_reply_deleted_while_streaming_continues_in_a_new_message(discord_world) -> None:
    async with discord_world(script=words_script(60), delay_s=0.02) as w:
        await w.fake.user_message(w.channel, w.alice, f"{w.fake.mention()} count")
        await w.fake.wait_for(lambda: any(m.get("_edits") for m in w.fake.bot_messages(w.channel)))
        await w.fake.delete_message(w.fake.bot_messages(w.channel)[0])
        await w.until_idle()
        assert [c.status for c in w.fake.calls if c.method == "PATCH"].count(404) >= 1
        (survivor,) = w.fake.bot_messages(w.channel)
        assert survivor["content"] == " ".join(f"w{i}" for i in range(60))


async def test_missing_permissions_give_up_at_once_and_the_reply_is_still_stored(discord_world) -> None:
    async with discord_world() as w:
        w.fake.fail_next("POST", r"/channels/\d+/messages$", status=403, code=50013, message="Missing Permissions",
                         count=100)
        await w.say(f"{w.fake.mention()} hello")
        assert len(w.fake.calls_to("POST", r"/channels/\d+/messages$")) == 1  # no retry storm
        assert await w.stored_replies(w.channel) == ["You said: Alice: hello (turn 1)"]


# --------------------------------------------------------------------------- access


async def test_unauthorized_users_are_refused_politely_and_privately(discord_world) -> None:
    async with discord_world(settings=lambda ids: {"allowed_users": ids["alice"]["id"]}) as w:
        refused = await w.chat("let me in", user=w.bob)
        assert refused.ephemeral and refused.content == "Sorry, you are not allowed to use this bot."
        await w.say(f"{w.fake.mention()} please?", user=w.bob)
        await w.say(f"{w.fake.mention()} pretty please?", user=w.bob)
        (reply,) = [m for m in w.fake.bot_messages(w.channel) if "webhook_id" not in m]  # told once, not twice
        assert reply["content"] == "Sorry, you are not allowed to use this bot."
        assert (await w.chat("hi")).content == "You said: Alice: hi (turn 1)"  # alice is fine
        assert w.service.toy_engines.engines["toy-a"].prompts[-1][-1].content == "Alice: hi"


async def test_allowed_roles_let_members_with_the_role_in(discord_world) -> None:
    async with discord_world(settings=lambda ids: {"discord_allowed_roles": next(
            r["id"] for r in ids["guild"]["roles"] if r["name"] == "chatters")}) as w:
        assert (await w.chat("hi")).content == "You said: Alice: hi (turn 1)"
        assert (await w.chat("me too", user=w.bob)).content == "Sorry, you are not allowed to use this bot."


async def test_allowed_chats_let_everyone_in_a_listed_channel_in(discord_world) -> None:
    async with discord_world(settings=lambda ids: {"allowed_chats": ids["channel"]["id"]}) as w:
        assert (await w.chat("hi", user=w.bob)).content == "You said: Bob: hi (turn 1)"
        refused = await w.chat("hi", user=w.bob, channel=w.other_channel)
        assert refused.content == "Sorry, you are not allowed to use this bot."


async def test_stopping_the_bot_mid_reply_leaves_a_note_not_a_hanging_message(discord_world) -> None:
    async with discord_world(script=words_script(150), delay_s=0.02) as w:
        w.adapter.stop_grace_s = 0.3
        inter = await w.fake.interact("chat", w.alice, w.channel, {"prompt": "long"})
        await w.fake.wait_for(lambda: len(inter.original_edits) >= 2)
        await w.adapter.stop()
        assert inter.content.startswith("w0 w1") and inter.content.endswith(
            "(stopped: the bot is restarting; please ask again in a minute)")


async def test_outside_the_allowed_channels_the_bot_stays_silent(discord_world) -> None:
    async with discord_world(settings=lambda ids: {"discord_allowed_channels": ids["channel"]["id"]}) as w:
        await w.say(f"{w.fake.mention()} hello?", channel=w.other_channel)
        assert w.fake.bot_messages(w.other_channel) == []
        elsewhere = await w.chat("hello?", channel=w.other_channel)
        assert elsewhere.ephemeral and elsewhere.content == "Sorry, I don't answer in this channel."
        assert (await w.chat("here")).content == "You said: Alice: here (turn 1)"


# --------------------------------------------------------------------------- gateway facts


async def test_without_the_message_content_intent_mentions_still_work(discord_world, caplog) -> None:
    async with discord_world(fake_kwargs={"privileged_intents": 0}) as w:
        assert not w.adapter.message_content
        assert "Message Content Intent" in caplog.text
        await w.say(f"{w.fake.mention()} still there?")
        assert [m["content"] for m in w.fake.bot_messages(w.channel)] == ["You said: Alice: still there? (turn 1)"]


async def test_the_bot_token_never_appears_in_the_logs(discord_world, caplog) -> None:
    caplog.set_level("DEBUG")
    async with discord_world() as w:
        await w.chat("hello")
        await w.say(f"{w.fake.mention()} hi")
        assert w.fake.token not in caplog.text


async def test_a_wrong_token_is_a_clear_error_that_does_not_show_the_token(discord_world) -> None:
    async with discord_world() as w:
        wrong = "x" * 24 + ".abcde." + "y" * 27
        settings = w.service.settings.model_copy(update={"discord_bot_token": SecretStr(wrong)})
        with pytest.raises(BotError, match="refused the bot token") as info:
            await DiscordAdapter(settings, w.service).start()
        assert wrong not in str(info.value)
