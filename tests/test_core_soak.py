"""A bounded soak of the core: many chats and users, bursts, /stop, /reset, a model switch, a failure.

Afterwards every message anyone sent is stored exactly once, every reply row has a final status,
no reply landed in another chat, and the service still answers. Scripted engine, a few seconds.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from bot.core.messages import MessageStatus, ReplyStatus
from bot.engines.base import ChatMessage
from tests.core_helpers import say, stored

CHATS, USERS, ROUNDS = 50, 20, 4
FINAL = {MessageStatus.COMPLETE, MessageStatus.CANCELLED, MessageStatus.FAILED}


def tagged_echo(messages: list[ChatMessage]) -> str:
    """Echo the newest user text; a message saying 'boom' makes the engine fail (one injected failure)."""
    last = next(m.content for m in reversed(messages) if m.role == "user")
    if "boom" in last:
        raise RuntimeError("injected engine failure")
    return f"You said: {last} " + " ".join("pad" for _ in range(20))


async def test_soak_many_chats_and_users(make_toy_service):
    rng = random.Random(14)
    sent: dict[str, list[str]] = {f"s{c}": [] for c in range(CHATS)}
    async with make_toy_service(delay_s=0.0005, queue_max=100, script=tagged_echo) as service:

        async def person(chat: str, user: str, group: bool) -> None:
            for r in range(ROUNDS):
                burst = 3 if rng.random() < 0.2 else 1
                texts = [f"[{chat}] {user} round {r}.{b}" for b in range(burst)]
                sent[chat].extend(texts)
                await asyncio.gather(*(say(service, t, chat=chat, user=user, is_group=group) for t in texts))
                if rng.random() < 0.1:
                    await say(service, "/stop", chat=chat, user=user)

        async def admin() -> None:
            await asyncio.sleep(0.2)
            await say(service, "/model toy-b", chat="admin", user="root")

        tasks = [person(f"s{c}", f"u{c % USERS}", group=c % 10 == 0) for c in range(CHATS)]
        failing = asyncio.create_task(say(service, "[boom] boom", chat="boom", user="bomber"))
        sent["boom"] = ["[boom] boom"]
        tasks += [person("s0", "guest", group=True), admin()]  # a second person in a group chat
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        assert "the model failed" in (await failing).errors[0]  # the injected failure hit that reply only
        await say(service, "/reset", chat="s3", user="u3")
        sent["s3"] = []

        counts = Counter()
        for chat, texts in sent.items():
            rows = await stored(service, chat)
            users = [r.content for r in rows if r.role == "user"]
            assert Counter(users) == Counter(texts), chat  # every message stored exactly once
            replies = [r for r in rows if r.role == "assistant"]
            assert all(r.status in FINAL for r in replies), chat
            assert all(f"[{chat}]" in r.content for r in replies if r.content), chat
            assert not any(f"[{other}]" in r.content for r in replies for other in sent if other != chat), chat
            counts.update(r.status.value for r in rows)
        assert (await say(service, "still alive?", chat="after", user="late")).status == ReplyStatus.COMPLETE
        print("soak:", dict(counts), "model:", service.current_model)
        assert service.current_model == "toy-b"
