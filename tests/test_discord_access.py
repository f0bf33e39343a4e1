"""Who may switch, reset and stop on Discord, roles by id, and DMs under the same lists (bot.core.access)."""

from __future__ import annotations

import logging

from tests.test_discord_adapter import discord_world, words_script  # noqa: F401 - the fixture

NOT_ALLOWED = "Sorry, you are not allowed to use this bot."


def chatters_id(ids: dict) -> str:
    return next(r["id"] for r in ids["guild"]["roles"] if r["name"] == "chatters")


async def test_without_admin_users_nobody_switches_the_model(discord_world) -> None:  # noqa: F811
    async with discord_world() as w:
        refused = await w.command("model", {"name": "toy-b"})
        assert refused.ephemeral and f"ADMIN_USERS={w.alice['id']}" in refused.content
        assert w.service.current_model == "toy-a"
        await w.say("/model toy-b", channel=w.dm)  # a DM is no way around it
        assert "ADMIN_USERS" in w.fake.bot_messages(w.dm)[-1]["content"]
        assert w.service.current_model == "toy-a"


async def test_unbuilt_embedded_builds_are_offered_as_not_ready_and_refused(discord_world, tmp_path) -> None:  # noqa: F811
    empty = tmp_path / "no-builds"
    empty.mkdir()
    async with discord_world(include_embedded_models=True, models_dir=empty,
                             settings=lambda ids: {"admin_users": ids["alice"]["id"]}) as w:
        typed = await w.fake.interact("model", w.alice, w.channel, {"name": "smollm2-g"}, focused="name")
        await w.fake.wait_for(lambda: typed.choices is not None)
        assert {c["name"] for c in typed.choices} == {"smollm2-gptq (not ready)", "smollm2-gguf (not ready)"}
        refused = await w.command("model", {"name": "smollm2-gguf"})
        assert "python -m bot models prepare --only gguf" in refused.content
        assert w.service.current_model == "toy-a"


async def test_in_a_channel_reset_needs_manage_messages(discord_world) -> None:  # noqa: F811
    async with discord_world() as w:
        await w.chat("remember apples")
        refused = await w.command("reset", user=w.bob)
        assert refused.ephemeral and "only its administrators" in refused.content
        assert len(await w.stored(w.channel)) == 2  # nothing erased
        await w.say(f"{w.fake.mention()} /reset", user=w.alice)  # by mention, same rule
        assert "only its administrators" in w.fake.bot_messages(w.channel)[-1]["content"]
        assert len(await w.stored(w.channel)) == 2
        done = await w.command("reset", user=w.carol)  # Manage Messages
        assert done.content == "History cleared. Let's start over."
        assert await w.stored(w.channel) == []
        await w.say("hi", channel=w.dm)
        await w.say("/reset", channel=w.dm)  # alice's own DM: hers to reset
        assert w.fake.bot_messages(w.dm)[-1]["content"] == "History cleared. Let's start over."


async def test_in_a_channel_stop_is_for_your_own_reply_or_a_moderator(discord_world) -> None:  # noqa: F811
    async with discord_world(script=words_script(400), delay_s=0.01) as w:
        inter = await w.fake.interact("chat", w.alice, w.channel, {"prompt": "long"})
        await w.fake.wait_for(lambda: len(inter.original_edits) >= 2)
        refused = await w.fake.interact("stop", w.bob, w.channel)
        await w.fake.wait_for(lambda: bool(refused.original_edits))
        assert "answers someone else" in refused.content
        assert w.service.queue.is_running(f"discord:{w.channel['id']}")  # still going
        stopped = await w.command("stop", user=w.carol)
        assert stopped.content == "Stopped your reply."
        assert inter.content.endswith("(stopped)")

        again = await w.fake.interact("chat", w.bob, w.channel, {"prompt": "long"})
        await w.fake.wait_for(lambda: len(again.original_edits) >= 2)
        assert (await w.command("stop", user=w.bob)).content == "Stopped your reply."


async def test_a_role_name_grants_nothing_only_its_id_does(discord_world, caplog) -> None:  # noqa: F811
    caplog.set_level(logging.WARNING)
    async with discord_world(settings=lambda ids: {"discord_allowed_roles": "chatters"}) as w:
        assert (await w.chat("hi")).content == NOT_ALLOWED  # anyone can name a role "chatters"
        assert any("not a role id" in r.getMessage() for r in caplog.records)
    async with discord_world(settings=lambda ids: {"discord_allowed_roles": chatters_id(ids)}) as w:
        assert (await w.chat("hi")).content.endswith("hi (turn 1)")  # (channel replies may name the speaker)


async def test_dms_follow_the_role_allowlist(discord_world) -> None:  # noqa: F811
    async with discord_world(settings=lambda ids: {"discord_allowed_roles": chatters_id(ids)}) as w:
        await w.say("hello in private", channel=w.dm)  # alice has the role in the server
        assert w.fake.bot_messages(w.dm)[-1]["content"] == "You said: hello in private (turn 1)"
        bob_dm = w.fake.add_dm(w.bob)
        await w.say("me too", user=w.bob, channel=bob_dm)  # bob has no role: a DM does not bypass it
        assert [m["content"] for m in w.fake.bot_messages(bob_dm)] == [NOT_ALLOWED]
        assert w.fake.calls_to("GET", r"/guilds/\d+/members/\d+")  # roles looked up by id


async def test_dms_respect_the_allowed_channels(discord_world) -> None:  # noqa: F811
    async with discord_world(settings=lambda ids: {"discord_allowed_channels": ids["channel"]["id"]}) as w:
        assert (await w.chat("hi", user=w.bob)).content.endswith("hi (turn 1)")
        bob_dm = w.fake.add_dm(w.bob)
        await w.say("and here?", user=w.bob, channel=bob_dm)  # the bot works in #general only
        assert [m["content"] for m in w.fake.bot_messages(bob_dm)] == [NOT_ALLOWED]
        assert len(w.service.toy_engines.engines["toy-a"].prompts) == 1
