"""The history store: chats and their messages, behind a small async API."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.storage.db import make_engine, make_sessionmaker
from bot.storage.models import Chat, Message, utcnow

HISTORY_LIMIT = 200  # newest messages considered when building a prompt


@dataclass(frozen=True)
class StoredMessage:
    id: int
    role: str
    content: str
    status: str
    model: str | None
    user_id: str | None
    token_count: int | None
    created_at: datetime


def _stored(m: Message) -> StoredMessage:
    return StoredMessage(m.id, m.role, m.content, m.status, m.model, m.user_id, m.token_count, m.created_at)


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

    async def add(self, chat_id: int, role: str, content: str, status: str = "complete", *,
                  user_id: str | None = None, model: str | None = None,
                  token_count: int | None = None) -> int:
        async with self._session() as s:
            msg = Message(chat_id=chat_id, role=role, content=content, status=status, user_id=user_id,
                          model=model, token_count=token_count)
            s.add(msg)
            await s.commit()
            return msg.id

    async def finish(self, message_id: int, content: str, status: str, token_count: int | None = None,
                     model: str | None = None) -> None:
        values: dict[str, object] = {"content": content, "status": status, "updated_at": utcnow()}
        if token_count is not None:
            values["token_count"] = token_count
        if model is not None:
            values["model"] = model
        async with self._session() as s:
            await s.execute(update(Message).where(Message.id == message_id).values(**values))
            await s.commit()

    async def set_status(self, message_id: int, status: str) -> None:
        async with self._session() as s:
            await s.execute(update(Message).where(Message.id == message_id)
                            .values(status=status, updated_at=utcnow()))
            await s.commit()

    async def context(self, chat_id: int, limit: int = HISTORY_LIMIT) -> list[StoredMessage]:
        """Turns that belong in a prompt, oldest first: user messages and complete replies."""
        async with self._session() as s:
            rows = (await s.scalars(
                select(Message).where(Message.chat_id == chat_id,
                                      ((Message.role == "user") & (Message.status != "rejected"))
                                      | ((Message.role == "assistant") & (Message.status == "complete")))
                .order_by(Message.id.desc()).limit(limit))).all()
        return [_stored(m) for m in reversed(rows)]

    async def messages(self, chat_id: int) -> list[StoredMessage]:
        """Everything stored for a chat, oldest first, whatever its status."""
        async with self._session() as s:
            rows = (await s.scalars(select(Message).where(Message.chat_id == chat_id)
                                    .order_by(Message.id))).all()
        return [_stored(m) for m in rows]

    async def clear(self, chat_id: int) -> int:
        async with self._session() as s:
            result = await s.execute(delete(Message).where(Message.chat_id == chat_id))
            await s.commit()
            return result.rowcount or 0

    async def mark_interrupted(self) -> int:
        """Replies left `pending` by a process that died become `incomplete`."""
        async with self._session() as s:
            result = await s.execute(update(Message).where(Message.status == "pending")
                                     .values(status="incomplete", updated_at=utcnow()))
            await s.commit()
            return result.rowcount or 0
