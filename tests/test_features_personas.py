"""Personas and per-chat system prompts (issue #18 item 1): core service, Telegram, Discord."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from bot.core.personas import load_personas
from bot.core.service import ChatService
from bot.errors import BotError
from tests.core_helpers import say
from tests.test_discord_adapter import discord_world  # noqa: F401 - the fixture
from tests.test_telegram_adapter import ALICE, _until, running_bot, wait_contains

MakeService = Callable[..., AbstractAsyncContextManager[ChatService]]
DEFAULT = "You are a helpful, concise assistant."


def system_of(service: ChatService, model: str = "toy-a") -> str | None:
    """The system prompt of the last prompt the engine was asked to continue."""
    prompt = service.toy_engines.engines[model].prompts[-1]  # type: ignore[attr-defined]
    return prompt[0].content if prompt[0].role == "system" else None


# --------------------------------------------------------------------------- core


async def test_persona_list_choose_and_prompt_sent_to_engine(make_toy_service: MakeService) -> None:
    async with make_toy_service() as service:
        listing = await say(service, "/persona")
        assert "assistant" in listing.notices[0] and "coder" in listing.notices[0]
        assert "\n* " not in listing.notices[0]  # the default prompt is no persona

        await say(service, "hello")
        assert system_of(service) == DEFAULT

        chosen = await say(service, "/persona Coder")
        assert chosen.notices == ["Persona coder chosen for this chat."]
        await say(service, "write a loop")
        assert system_of(service) == service.personas["coder"].prompt
        assert "* coder" in (await say(service, "/persona")).notices[0]
        assert "persona coder" in (await say(service, "/system")).notices[0]

        other = await say(service, "hi", chat="c2")  # other chats keep the default
        assert other.final is not None and system_of(service) == DEFAULT

        bad = await say(service, "/persona pirate")
        assert bad.errors and "Unknown persona 'pirate'" in bad.errors[0] and "tutor" in bad.errors[0]
        await say(service, "again")
        assert system_of(service) == service.personas["coder"].prompt  # a bad name changed nothing


async def test_system_show_set_reset(make_toy_service: MakeService) -> None:
    async with make_toy_service() as service:
        assert (await say(service, "/system")).notices == [f"System prompt (the default):\n{DEFAULT}"]
        await say(service, "/system You answer like a pirate.")
        await say(service, "hello")
        assert system_of(service) == "You answer like a pirate."
        assert "You answer like a pirate." in (await say(service, "/system")).notices[0]
        too_long = await say(service, "/system " + "x" * 4001)
        assert too_long.errors and "too long" in too_long.errors[0]
        assert (await say(service, "/system RESET")).notices == ["System prompt reset to the default."]
        await say(service, "hello again")
        assert system_of(service) == DEFAULT


async def test_only_moderators_change_a_group_prompt(make_toy_service: MakeService) -> None:
    async with make_toy_service() as service:
        group = {"is_group": True, "is_admin": False}
        refused = await say(service, "/persona tutor", chat="g", user="bob", **group)
        assert refused.errors and "administrators" in refused.errors[0]
        refused = await say(service, "/system be rude", chat="g", user="bob", **group)
        assert refused.errors and "administrators" in refused.errors[0]
        assert "(the default)" in (await say(service, "/system", chat="g", user="bob", **group)).notices[0]
        ok = await say(service, "/persona tutor", chat="g", user="mod", is_chat_admin=True, **group)
        assert ok.notices == ["Persona tutor chosen for this chat."]
        await say(service, "explain fractions", chat="g", user="bob", **group)
        assert system_of(service) == service.personas["tutor"].prompt


async def test_system_prompt_counts_in_the_token_budget(make_toy_service: MakeService) -> None:
    async with make_toy_service(context_length=80, max_new_tokens=20) as service:
        await say(service, "/system " + " ".join(["word"] * 60))
        refused = await say(service, "a short question please")
        assert refused.errors and "too long" in refused.errors[0]  # the long prompt left no room
        await say(service, "/system reset")
        answered = await say(service, "a short question please")
        assert answered.final == "You said: a short question please (turn 1)"


async def test_persona_survives_a_restart_on_the_same_database(make_toy_service: MakeService) -> None:
    async with make_toy_service() as service:
        await say(service, "/persona translator")
    async with make_toy_service() as service:  # same SQLite file (the fixture's tmp_path)
        await say(service, "bonjour")
        assert system_of(service) == service.personas["translator"].prompt


async def test_personas_file_setting_and_its_errors(make_toy_service: MakeService, tmp_path: Path) -> None:
    shipped = load_personas()
    assert {"assistant", "translator", "coder", "tutor"} <= set(shipped)
    mine = tmp_path / "personas.json"
    mine.write_text(json.dumps([{"name": "Chef", "prompt": "You are a chef.", "description": "recipes"}]))
    async with make_toy_service(personas_file=mine) as service:
        assert "chef - recipes" in (await say(service, "/persona")).notices[0]
        await say(service, "/persona chef")
        await say(service, "soup?")
        assert system_of(service) == "You are a chef."
    mine.write_text('[{"name": "two words", "prompt": "x"}]')
    with pytest.raises(BotError, match="one-word name"):
        load_personas(mine)
    mine.write_text("{not json")
    with pytest.raises(BotError, match="cannot read it as JSON"):
        load_personas(mine)


# --------------------------------------------------------------------------- Telegram


async def test_telegram_persona_buttons_choose_and_reach_the_engine(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service) as (fake, service):
        assert {"system", "persona"} <= {c["command"] for c in fake.commands}
        await fake.user_says("/persona")
        listing = (await _until(lambda: [m for m in fake.bot_messages(ALICE) if m.reply_markup]))[0]
        buttons = [b["callback_data"] for row in listing.reply_markup["inline_keyboard"] for b in row]  # type: ignore[index]
        assert buttons == [f"persona:{n}" for n in service.personas]
        await fake.press_button(listing.message_id, "persona:coder", chat=fake.private_chat(ALICE))
        await wait_contains(fake, ALICE, "Persona coder chosen")
        assert fake.calls_to("answerCallbackQuery")
        await fake.user_says("sort a list")
        await wait_contains(fake, ALICE, "You said: sort a list")
        assert system_of(service) == service.personas["coder"].prompt


async def test_telegram_group_persona_needs_a_group_admin(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service) as (fake, service):
        group = fake.group_chat(-100500)
        fake.set_member_status(-100500, 2002, "member")
        fake.set_member_status(-100500, 3003, "administrator")
        await fake.user_says("/persona", user_id=2002, name="Bob", chat=group)
        await wait_contains(fake, -100500, "Personas (* = current)")
        assert not any(m.reply_markup for m in fake.bot_messages(-100500))  # no buttons for who may not
        await fake.user_says("/persona tutor", user_id=2002, name="Bob", chat=group)
        await wait_contains(fake, -100500, "only its administrators can change")

        await fake.user_says("/persona", user_id=3003, name="Mia", chat=group)
        listing = (await _until(lambda: [m for m in fake.bot_messages(-100500) if m.reply_markup]))[0]
        await fake.press_button(listing.message_id, "persona:tutor", chat=group, user_id=2002)  # Bob presses
        await _until(lambda: [c for c in fake.calls_to("sendMessage", -100500)
                              if "only its administrators" in c.params["text"]][1:])
        await fake.press_button(listing.message_id, "persona:tutor", chat=group, user_id=3003)
        await wait_contains(fake, -100500, "Persona tutor chosen")
        chat = await service.store.chat_id("telegram", "-100500")
        assert await service.store.system_prompt(chat) == service.personas["tutor"].prompt


# --------------------------------------------------------------------------- Discord


async def test_discord_persona_autocomplete_and_system_command(discord_world) -> None:  # noqa: F811
    async with discord_world() as w:
        names = {c["name"]: c for c in w.fake.commands[None]}
        assert names["persona"]["options"][0]["autocomplete"] is True
        typed = await w.fake.interact("persona", w.alice, w.dm, {"name": ""}, focused="name")
        await asyncio.wait_for(typed.responded.wait(), 5)
        assert typed.ack_type == 8
        assert [c["value"] for c in typed.choices or []] == list(w.service.personas)
        assert (typed.choices or [])[0]["name"].startswith("assistant - ")
        narrowed = await w.fake.interact("persona", w.alice, w.dm, {"name": "TR"}, focused="name")
        await asyncio.wait_for(narrowed.responded.wait(), 5)
        assert [c["value"] for c in narrowed.choices or []] == ["translator"]

        chosen = await w.command("persona", {"name": "tutor"}, channel=w.dm)
        assert chosen.ephemeral and chosen.content == "Persona tutor chosen for this chat."
        await w.say("what is a prime?", channel=w.dm)
        assert system_of(w.service) == w.service.personas["tutor"].prompt

        shown = await w.command("system", channel=w.dm)
        assert "persona tutor" in shown.content
        await w.command("system", {"text": "Answer in haiku."}, channel=w.dm)
        await w.say("rain?", channel=w.dm)
        assert system_of(w.service) == "Answer in haiku."


async def test_discord_channel_persona_needs_manage_messages(discord_world) -> None:  # noqa: F811
    async with discord_world() as w:
        refused = await w.command("persona", {"name": "coder"}, user=w.alice)
        assert "only its administrators" in refused.content
        ok = await w.command("persona", {"name": "coder"}, user=w.carol)  # the "mods" role: Manage Messages
        assert ok.content == "Persona coder chosen for this chat."
