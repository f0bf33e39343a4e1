"""The history store: chats and their messages, behind a small async API."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.core.messages import PROMPT_STATUSES, MessageStatus
from bot.storage.db import make_engine, make_sessionmaker
from bot.storage.models import Chat, Message, utcnow

HISTORY_LIMIT = 200  # newest messages considered when building a prompt


@dataclass(frozen=True)
class StoredMessage:
    id: int
    role: str
    content: str
    status: MessageStatus
    model: str | None
    user_id: str | None
    token_count: int | None
    created_at: datetime
    author_name: str | None = None


def _stored(m: Message) -> StoredMessage:
    return StoredMessage(m.id, m.role, m.content, MessageStatus(m.status), m.model, m.user_id, m.token_count,
                         m.created_at, m.author_name)


class HistoryStore:
    def __init__(self, database_url: str, engine: AsyncEngine | None = None) -> None:
        self.url = database_url
        self.engine = engine or make_engine(database_url)
        self._session = make_sessionmaker(self.engine)

    async def close(self) -> None:
        await self.engine.dispose()

    async def chat_id(self, platform: str, external_id: str) -> int:
        """The chat's row id, created on first use (safe against a concurrent creator)."""
        async with self._session() as s:
            found = await s.scalar(select(Chat.id).where(Chat.platform == platform,
                                                         Chat.external_id == external_id))
            if found is not None:
                return found
            chat = Chat(platform=platform, external_id=external_id)
            s.add(chat)
            try:
                await s.commit()
                return chat.id
            except IntegrityError:
                await s.rollback()
        async with self._session() as s:
            return (await s.scalar(select(Chat.id).where(Chat.platform == platform,
                                                         Chat.external_id == external_id)))  # type: ignore[return-value]

    async def system_prompt(self, chat_id: int) -> str | None:
        async with self._session() as s:
            return await s.scalar(select(Chat.system_prompt).where(Chat.id == chat_id))

    async def set_system_prompt(self, chat_id: int, prompt: str | None) -> None:
        """The chat's own system prompt; None returns the chat to the configured default."""
        async with self._session() as s:
            await s.execute(update(Chat).where(Chat.id == chat_id).values(system_prompt=prompt))
            await s.commit()

    async def add(self, chat_id: int, role: str, content: str, status: MessageStatus = MessageStatus.COMPLETE, *,
                  user_id: str | None = None, author_name: str | None = None, model: str | None = None,
                  token_count: int | None = None, external_id: str | None = None) -> int:
        async with self._session() as s:
            msg = Message(chat_id=chat_id, role=role, content=content, status=MessageStatus(status).value,
                          user_id=user_id, author_name=author_name, model=model, token_count=token_count,
                          external_id=external_id or None)
            s.add(msg)
            await s.commit()
            return msg.id

    async def finish(self, message_id: int, content: str, status: MessageStatus, token_count: int | None = None,
                     model: str | None = None) -> None:
        values: dict[str, object] = {"content": content, "status": MessageStatus(status).value,
                                     "updated_at": utcnow()}
        if token_count is not None:
            values["token_count"] = token_count
        if model is not None:
            values["model"] = model
        async with self._session() as s:
            await s.execute(update(Message).where(Message.id == message_id).values(**values))
            await s.commit()

    async def set_status(self, message_ids: int | list[int], status: MessageStatus) -> None:
        """One status for one message or several (a message and all that were folded into it)."""
        ids = [message_ids] if isinstance(message_ids, int) else list(message_ids)
        async with self._session() as s:
            await s.execute(update(Message).where(Message.id.in_(ids))
                            .values(status=MessageStatus(status).value, updated_at=utcnow()))
            await s.commit()

    async def save_partial(self, message_id: int, content: str) -> None:
        """The text so far of a reply still being written, so a hard kill loses only the last interval."""
        async with self._session() as s:
            await s.execute(update(Message).where(Message.id == message_id,
                                                  Message.status == MessageStatus.PENDING.value)
                            .values(content=content, updated_at=utcnow()))
            await s.commit()

    async def context(self, chat_id: int, limit: int = HISTORY_LIMIT) -> list[StoredMessage]:
        """Turns that belong in a prompt, oldest first: only rows whose status says so (PROMPT_STATUSES)."""
        statuses = sorted(s.value for s in PROMPT_STATUSES)
        async with self._session() as s:
            rows = (await s.scalars(
                select(Message).where(Message.chat_id == chat_id, Message.status.in_(statuses))
                .order_by(Message.id.desc()).limit(limit))).all()
        return [_stored(m) for m in reversed(rows)]

    async def messages(self, chat_id: int) -> list[StoredMessage]:
        """Everything stored for a chat, oldest first, whatever its status."""
        async with self._session() as s:
            rows = (await s.scalars(select(Message).where(Message.chat_id == chat_id)
                                    .order_by(Message.id))).all()
        return [_stored(m) for m in rows]

    async def find_external(self, chat_id: int, external_id: str) -> StoredMessage | None:
        """The stored message the platform knows as `external_id` in this chat (a person's message)."""
        async with self._session() as s:
            found = await s.scalar(select(Message).where(Message.chat_id == chat_id, Message.external_id == external_id)
                                   .order_by(Message.id.desc()).limit(1))
        return _stored(found) if found is not None else None

    async def set_content(self, message_id: int, content: str) -> None:
        """A person edited their message: the stored turn says what it says now (token count redone)."""
        async with self._session() as s:
            await s.execute(update(Message).where(Message.id == message_id)
                            .values(content=content, token_count=None, updated_at=utcnow()))
            await s.commit()

    async def set_token_counts(self, counts: dict[int, int]) -> None:
        """Token counts of messages measured after they were stored (people's messages, when answered)."""
        async with self._session() as s:
            for message_id, tokens in counts.items():
                await s.execute(update(Message).where(Message.id == message_id).values(token_count=tokens))
            await s.commit()

    async def usage_rows(self, chat_id: int) -> list[tuple[str, str, int | None, float | None]]:
        """(role, status, token_count, seconds from creation to last update) of every message of a chat.

        A reply row is created when generation starts and last updated when it ends, so its span is
        the time it took to write (`/stats` speed) without storing anything more.
        """
        async with self._session() as s:
            rows = (await s.execute(select(Message.role, Message.status, Message.token_count, Message.created_at,
                                           Message.updated_at).where(Message.chat_id == chat_id))).all()
        return [(role, status, tokens, (updated - created).total_seconds() if created and updated else None)
                for role, status, tokens, created, updated in rows]

    async def clear(self, chat_id: int) -> int:
        async with self._session() as s:
            result = await s.execute(delete(Message).where(Message.chat_id == chat_id))
            await s.commit()
            return result.rowcount or 0

    async def mark_interrupted(self) -> int:
        """Replies left `pending` by a process that died become `incomplete`."""
        async with self._session() as s:
            result = await s.execute(update(Message).where(Message.status == MessageStatus.PENDING.value)
                                     .values(status=MessageStatus.INCOMPLETE.value, updated_at=utcnow()))
            await s.commit()
            return result.rowcount or 0
