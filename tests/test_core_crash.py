"""SIGKILL in the middle of a reply: nothing the user wrote is lost, the database stays sound."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from bot.core.messages import IncomingMessage, ReplyStatus
from tests.sinks import RecordingSink

ROOT = Path(__file__).resolve().parents[1]


async def test_killed_mid_reply_then_restart(tmp_path, make_toy_service):
    child = subprocess.Popen([sys.executable, "-m", "tests.crash_child", str(tmp_path)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip() == "READY", f"child did not start a reply: {line!r}"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)

    db = tmp_path / "bot.db"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("SELECT role, status FROM messages ORDER BY id").fetchall()
    assert rows == [("user", "complete"), ("assistant", "pending")]

    async with make_toy_service() as service:  # same tmp_path, same database file
        chat = await service.store.chat_id("test", "c1")
        stored = await service.store.messages(chat)
        assert stored[0].content.startswith("w0 w1 w2") and stored[0].status == "complete"
        assert stored[1].status == "incomplete"
        assert stored[1].content.startswith("You said: w0 w1")  # the text so far survived kill -9
        sink = RecordingSink()
        await service.handle(IncomingMessage("test", "c1", "u1", "Ann", "still there?"), sink)
        assert sink.status == ReplyStatus.COMPLETE
        prompt = service.toy_engines.engines["toy-a"].prompts[-1]
        assert [m.role for m in prompt] == ["system", "user"]  # the lost reply is not context
        assert prompt[-1].content.startswith("w0 w1") and prompt[-1].content.endswith("still there?")
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
