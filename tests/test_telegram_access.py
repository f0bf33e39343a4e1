"""Who may switch, reset and stop on Telegram (the shared rules of bot.core.access), against the fake Bot API."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bot.core.messages import IncomingMessage
from tests.sinks import RecordingSink
from tests.test_telegram_adapter import ALICE, MakeService, running_bot, texts, wait_contains, wait_text

BOB = 1002
GROUP = -300
LONG = " ".join(f"w{i}" for i in range(60))


async def test_without_admin_users_nobody_switches_the_model_from_a_chat(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service) as (fake, service):
        await fake.user_says("/model toy-b")
        refusal = await wait_contains(fake, ALICE, "ADMIN_USERS")
        assert f"ADMIN_USERS={ALICE}" in refusal  # the owner is told exactly what to set
        assert service.current_model == "toy-a"
        await fake.user_says("/model")  # the list is still shown, without buttons that would not work
        listing = await wait_contains(fake, ALICE, "Models (* = current)")
        assert "toy-b" in listing
        assert not any(m.reply_markup for m in fake.bot_messages(ALICE))


async def test_the_terminal_owner_may_switch_without_admin_users(make_toy_service: MakeService) -> None:
    async with make_toy_service() as service:
        sink = RecordingSink()
        await service.handle(IncomingMessage("terminal", "local", "local", "you", "/model toy-b"), sink)
        assert sink.notices == ["Switched to toy-b."] and service.current_model == "toy-b"


async def test_an_embedded_build_not_built_is_not_ready_and_cannot_be_switched_to(
        make_toy_service: MakeService, tmp_path: Path) -> None:
    empty = tmp_path / "no-builds"
    empty.mkdir()
    async with running_bot(make_toy_service, include_embedded_models=True, models_dir=empty,
                           admin_users=[str(ALICE)]) as (fake, service):
        await fake.user_says("/model")
        listing = await wait_contains(fake, ALICE, "Models (* = current)")
        assert "smollm2-awq" in listing
        assert all("(not ready)" in line for line in listing.splitlines() if line.strip().startswith("smollm2"))
        assert "(not ready)" not in next(line for line in listing.splitlines() if "toy-b" in line)
        (keyboard,) = [m.reply_markup for m in fake.bot_messages(ALICE) if m.reply_markup]
        labels = [b["text"] for row in keyboard["inline_keyboard"] for b in row]
        assert "smollm2-awq (not ready)" in labels and "toy-b" in labels
        await fake.user_says("/model smollm2-awq")
        refusal = await wait_contains(fake, ALICE, "smollm2-awq is not ready")
        assert "python -m bot models prepare --only awq" in refusal
        assert service.current_model == "toy-a"
        assert "smollm2-awq" not in service.toy_engines.engines  # no load was even tried


async def test_in_a_group_only_chat_administrators_and_bot_admins_reset(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service, admin_users=["42"]) as (fake, service):
        group = fake.group_chat(GROUP, "Friends")
        await fake.user_says("@quant_test_bot remember the word apple", chat=group)
        await wait_contains(fake, GROUP, "apple (turn 1)")
        await fake.user_says("/reset", chat=group, user_id=BOB, name="Bob")
        await wait_contains(fake, GROUP, "only its administrators")
        chat = await service.store.chat_id("telegram", str(GROUP))
        assert len(await service.store.messages(chat)) == 2  # nothing was erased
        assert fake.calls_to("getChatMember")[-1].params["user_id"] == BOB

        fake.set_member_status(GROUP, BOB, "administrator")
        await fake.user_says("/reset", chat=group, user_id=BOB, name="Bob")
        await wait_contains(fake, GROUP, "History cleared")
        assert await service.store.messages(chat) == []

        await fake.user_says("@quant_test_bot again", chat=group)
        await wait_contains(fake, GROUP, "again (turn 1)")
        await fake.user_says("/reset", chat=group, user_id=42, name="Root")  # a bot admin, not a group admin
        await fake.wait_for(lambda: texts(fake, GROUP).count("History cleared. Let's start over.") == 2)

        fake.set_member_status(GROUP, ALICE, "creator")
        await fake.user_says("/reset", chat=group)
        await fake.wait_for(lambda: texts(fake, GROUP).count("History cleared. Let's start over.") == 3)

        await fake.user_says("/reset")  # her private chat is hers alone
        await wait_contains(fake, ALICE, "History cleared")


async def test_in_a_group_stop_stops_your_own_reply_but_not_someone_elses(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service, delay_s=0.05) as (fake, service):
        group = fake.group_chat(GROUP, "Friends")
        await fake.user_says(f"@quant_test_bot {LONG}", chat=group)
        await wait_contains(fake, GROUP, "w0 w1")
        await fake.user_says("/stop", chat=group, user_id=BOB, name="Bob")
        await wait_contains(fake, GROUP, "answers someone else")
        assert service.queue.is_running(f"telegram:{GROUP}")  # still going
        await fake.user_says("/stop", chat=group)  # Alice stops her own
        await wait_contains(fake, GROUP, "Stopped your reply.")
        chat = await service.store.chat_id("telegram", str(GROUP))
        await fake.wait_for(lambda: not service.queue.is_running(f"telegram:{GROUP}"))
        await asyncio.sleep(0.1)
        assert (await service.store.messages(chat))[-1].status == "cancelled"

        fake.set_member_status(GROUP, BOB, "administrator")
        await fake.user_says(f"@quant_test_bot {LONG}", chat=group)
        await fake.wait_for(lambda: service.queue.is_running(f"telegram:{GROUP}"))
        await fake.user_says("/stop", chat=group, user_id=BOB, name="Bob")  # a group admin may stop anyone's
        await fake.wait_for(lambda: texts(fake, GROUP).count("Stopped your reply.") == 2)
        await wait_text(fake, GROUP, "Stopped your reply.")
