"""Soak (issue 14, Must show): the real python-telegram-bot adapter against the Bot API fake, many people at once.

50 chats from 20 users: 20 private chats, 26 groups and 4 topics of a forum. People talk in their
chats one message at a time, a few send bursts (one across four forum topics), some `/stop` their
reply, a group administrator `/reset`s a group, a bot admin switches the model, one message makes
the engine fail, and a 429 storm hits sendMessage/editMessageText for a few seconds. Afterwards:
every message anyone sent is stored exactly once, every reply row has a final status, no reply
reached another chat (the scripted engine echoes each prompt, which names its chat), nobody was
told "busy" because of someone else, nothing is left showing a placeholder, and the bot still
answers. Group traffic stays small on purpose: PTB's AIORateLimiter lets a bot send 20 calls a
minute to one group, as Telegram does, and this test must stay bounded (~1 minute on 2 cores).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from bot.core.messages import MessageStatus
from bot.core.service import BUSY, FOLDED
from bot.engines.base import ChatMessage
from tests.fakes.telegram_api import FakeTelegram
from tests.test_telegram_adapter import MakeService, running_bot, wait_contains

USERS, GROUPS, TOPICS = 20, 26, 4
FIRST_USER = 2001
ADMIN = FIRST_USER  # ADMIN_USERS: may switch the model
BOOM_USER = FIRST_USER + 5  # their first message makes the engine fail
FORUM_ID = -1001000000000999
RESET_GROUP = 0  # index of the group whose administrator resets it
STORM_AT_S, STORM_S = 2.0, 4.0
SOAK_LIMIT_S = 100.0  # the whole soak, settling included
FINAL = {MessageStatus.COMPLETE, MessageStatus.CANCELLED, MessageStatus.FAILED}
TAG = re.compile(r"\[([a-z]\d+)\]")
STUCK = ("✍️ …", "⏳")  # a placeholder or a queue position left as a message's last text


def tagged_echo(messages: list[ChatMessage]) -> str:
    """Echo the newest user text (it names its chat); 'boom' makes the engine fail (the injected failure)."""
    last = next(m.content for m in reversed(messages) if m.role == "user")
    if "boom" in last:
        raise RuntimeError("injected engine failure")
    return f"You said: {last} " + " ".join("pad" for _ in range(8))


@dataclass
class Place:
    """One of the 50 chats: where on Telegram, and its key in the service."""

    label: str
    chat: dict[str, Any]
    thread: int | None = None
    members: list[int] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.chat['id']}:{self.thread}" if self.thread else str(self.chat["id"])

    @property
    def shared(self) -> bool:
        return self.chat["type"] != "private"


def name(user: int) -> str:
    return f"User{user - FIRST_USER:02d}"


class Soak:
    """Drives the people; remembers every text they sent per chat (what must be stored)."""

    def __init__(self, fake: FakeTelegram, service: Any) -> None:
        self.fake, self.service = fake, service
        self.rng = random.Random(14)
        users = [FIRST_USER + i for i in range(USERS)]
        self.places: list[Place] = [Place(f"p{u - FIRST_USER}", fake.private_chat(u, name(u)), members=[u])
                                    for u in users]
        for g in range(GROUPS):
            members = self.rng.sample(users, 2)
            self.places.append(Place(f"g{g}", fake.group_chat(-500 - g, f"Group {g}"), members=members))
        forum = fake.group_chat(FORUM_ID, "Forum", forum=True)
        for t in range(TOPICS):
            self.places.append(Place(f"t{t}", forum, thread=100 + t, members=self.rng.sample(users, 2)))
        assert len({p.key for p in self.places}) == 50
        self.reset_place = self.places[USERS + RESET_GROUP]
        self.sent: dict[str, list[str]] = {p.key: [] for p in self.places}
        self.by_key = {p.key: p for p in self.places}

    async def say(self, place: Place, user: int, text: str, *, record: bool = True) -> None:
        prompt = f"{text}" if not place.shared or text.startswith("/") else f"@{self.fake.username} {text}"
        if record and not text.startswith("/"):
            self.sent[place.key].append(text)
        update = await self.fake.user_says(prompt, user_id=user, name=name(user), chat=place.chat,
                                           thread_id=place.thread)
        await self._fetched(update["update_id"])

    async def _fetched(self, update_id: int) -> None:
        await self.fake.wait_for(lambda: self.fake.fetched_update_id >= update_id, 20)

    async def idle(self, place: Place, timeout: float = 30.0) -> None:
        """Until the texts sent to the chat are stored and it has no reply running or waiting."""
        queue, key = self.service.queue, f"telegram:{place.key}"
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            await asyncio.sleep(0.1)
            stored = Counter(r.content for r in await self.rows(place.key) if r.role == "user")
            # The queue is asked after the rows: a stored message is queued in the same step.
            if not Counter(self.sent[place.key]) - stored and not queue.is_running(key) and not queue.has_waiting(key):
                return

    async def person(self, user: int) -> None:
        """Talks in each of their chats in turn, waiting for the answer; sometimes a burst or a /stop.

        Private chats get twice the traffic of shared ones: Telegram (and PTB's limiter) allow a bot
        only 20 messages a minute in one group.
        """
        private, *shared = [p for p in self.places if user in p.members and p is not self.reset_place]
        for n, place in enumerate([private, *shared, private]):
            label = f"[{place.label}] {name(user)} says {n}" + (" boom" if user == BOOM_USER and n == 0 else "")
            if not place.shared and self.rng.random() < 0.25:  # a burst: three at once
                await asyncio.gather(*(self.say(place, user, f"{label}.{b}") for b in range(3)))
            else:
                await self.say(place, user, label)
            if self.rng.random() < 0.12:
                await self.say(place, user, "/stop")
            await self.idle(place)
            if user == ADMIN and n == 0:  # nothing of theirs waits now (a switch counts as waiting)
                await self.say(private, ADMIN, "/model toy-b")
                await wait_contains(self.fake, ADMIN, "Switched to toy-b.", 60)
            await asyncio.sleep(self.rng.uniform(0, 0.1))

    async def topic_burst(self) -> None:
        """One person mentions the bot in four forum topics at once: only they may be told to wait."""
        user = FIRST_USER + USERS - 1
        topics = [p for p in self.places if p.thread][:4]
        await asyncio.gather(*(self.say(t, user, f"[{t.label}] {name(user)} burst") for t in topics))

    async def reset_group(self) -> None:
        """A member's /reset is refused; the group's administrator's erases its history."""
        place = self.reset_place
        owner, other = place.members
        self.fake.set_member_status(place.chat["id"], owner, "administrator")
        await self.say(place, other, f"[{place.label}] before the reset")
        await self.idle(place)
        await self.say(place, other, "/reset")
        await wait_contains(self.fake, place.chat["id"], "only its administrators", 30)
        await self.say(place, owner, "/reset")
        await wait_contains(self.fake, place.chat["id"], "History cleared", 30)
        self.sent[place.key].clear()
        await self.say(place, other, f"[{place.label}] after the reset")

    async def stranger_switch(self) -> None:
        """A stranger's /model is refused (the bot admin's, in `person`, switches while everyone talks)."""
        stranger = self.places[1]
        await self.say(stranger, FIRST_USER + 1, "/model toy-b")
        await wait_contains(self.fake, stranger.chat["id"], "Only admins can switch the model.", 30)

    async def storm(self) -> None:
        await asyncio.sleep(STORM_AT_S)
        self.fake.rate_limit_storm(STORM_S)

    async def settled(self, timeout: float) -> None:
        """Until every text is stored, the queue is empty and no bot message is left unfinished."""
        end = time.monotonic() + timeout
        while True:
            stored = Counter()
            for key in self.sent:
                stored[key] = len([r for r in await self.rows(key) if r.role == "user"])
            done = all(stored[k] >= len(v) for k, v in self.sent.items())
            queue = self.service.queue
            busy = any(queue.is_running(f"telegram:{k}") or queue.has_waiting(f"telegram:{k}") for k in self.sent)
            if done and not busy and not self.stuck():
                return
            assert time.monotonic() < end, f"never settled: stuck messages {self.stuck()[:5]}"
            await asyncio.sleep(0.2)

    def stuck(self) -> list[str]:
        return [m.text for (_, _), m in self.fake.messages.items() if m.from_bot and m.text.startswith(STUCK)]

    async def rows(self, key: str) -> list[Any]:
        return await self.service.store.messages(await self.service.store.chat_id("telegram", key))


@pytest.mark.slow
async def test_soak_telegram_many_people_with_a_429_storm(make_toy_service: MakeService) -> None:
    started = time.monotonic()
    async with running_bot(make_toy_service, script=tagged_echo, delay_s=0.005, admin_users=[str(ADMIN)],
                           grace=10.0) as (fake, service):
        soak = Soak(fake, service)
        actors = [soak.person(FIRST_USER + i) for i in range(USERS)]
        actors += [soak.topic_burst(), soak.reset_group(), soak.stranger_switch(), soak.storm()]
        await asyncio.wait_for(asyncio.gather(*actors), SOAK_LIMIT_S)
        await soak.settled(SOAK_LIMIT_S - (time.monotonic() - started))

        counts: Counter[str] = Counter()
        for key, texts in soak.sent.items():
            rows = await soak.rows(key)
            users = [r.content for r in rows if r.role == "user"]
            assert Counter(users) == Counter(texts), key  # every message stored exactly once
            replies = [r for r in rows if r.role == "assistant"]
            assert all(r.status in FINAL for r in replies), (key, [r.status for r in replies])
            label = soak.by_key[key].label
            assert all(set(TAG.findall(r.content)) <= {label} for r in replies), key  # stored in its own chat
            counts.update(f"{r.role}:{r.status.value}" for r in rows)
        for (chat_id, _), m in fake.messages.items():  # and shown in its own chat (and topic)
            if m.from_bot and (tags := set(TAG.findall(m.text))):
                place = next(p for p in soak.places if p.chat["id"] == chat_id and p.thread == m.thread_id)
                assert tags == {place.label}, (place.label, m.text)
        bot_texts = [m.text for m in fake.messages.values() if m.from_bot]
        assert not any(BUSY in t for t in bot_texts)  # nobody was refused because of other people
        boom_chat = soak.places[BOOM_USER - FIRST_USER]
        assert any("the model failed while answering" in t for t in fake_texts(fake, boom_chat))
        assert counts["assistant:failed"] == 1 and counts["assistant:complete"] > 50  # the failure broke one reply
        refused = {r.user_id for key in soak.sent for r in await soak.rows(key) if r.status == MessageStatus.REJECTED}
        assert refused <= {str(FIRST_USER + USERS - 1), *map(str, soak.reset_place.members)}  # only who sent at once
        assert fake.served_429 > 0 and service.current_model == "toy-b"

        await fake.user_says("still there? [z9]", user_id=9999, name="Late")  # the bot is alive and answers
        await wait_contains(fake, 9999, "You said: still there? [z9] pad", 30)
        duration = time.monotonic() - started
        folded = sum(FOLDED in t for t in bot_texts)
        print(f"\ntelegram soak: {sum(len(v) for v in soak.sent.values())} messages in {len(soak.sent)} chats, "
              f"rows by status {dict(sorted(counts.items()))}, folded {folded}, 429s served {fake.served_429}, "
              f"model {service.current_model}, {duration:.1f} s")
        assert duration < SOAK_LIMIT_S


def fake_texts(fake: FakeTelegram, place: Place) -> list[str]:
    return [m.text for m in fake.bot_messages(place.chat["id"]) if m.thread_id == place.thread]


async def test_a_429_storm_answers_like_the_bot_api() -> None:
    """The fake's flood control is Telegram's: HTTP 429, `retry_after` in `parameters`, other methods unaffected."""
    async with FakeTelegram() as fake:
        fake.rate_limit_storm(3.0)
        async with aiohttp.ClientSession() as http:
            url = f"{fake.base_url}{fake.token}"
            async with http.post(f"{url}/sendMessage", json={"chat_id": 1001, "text": "hi"}) as resp:
                assert resp.status == 429
                assert json.loads(await resp.text()) == {
                    "ok": False, "error_code": 429, "description": "Too Many Requests: retry after 3",
                    "parameters": {"retry_after": 3}}
            async with http.post(f"{url}/getMe") as resp:
                assert resp.status == 200
            fake.rate_limit_storm(0.0)  # the window is over
            async with http.post(f"{url}/sendMessage", json={"chat_id": 1001, "text": "hi"}) as resp:
                assert resp.status == 200
        assert fake.served_429 == 1
