"""The terminal chat, as a person uses it: a real process, lines in, streamed replies out."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from bot.adapters.terminal import TerminalSink
from bot.core.messages import ReplyStatus

ROOT = Path(__file__).resolve().parents[1]


async def test_sink_prints_each_part_once():
    out = io.StringIO()
    sink = TerminalSink(out)
    await sink.started()
    for text in ("Hel", "Hello, wor", "Hello, world"):
        await sink.update(text)
    await sink.finish("Hello, world", ReplyStatus.COMPLETE)
    assert out.getvalue() == "bot> Hello, world\n"


@pytest.mark.slow
def test_terminal_chat_on_real_build(tmp_path, prepared_models):
    """`python -m bot chat` with the embedded GPTQ build: multi-turn, /model, /reset, history on disk."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "MODELS_DIR": str(prepared_models),
           "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/chat.db", "DEFAULT_MODEL": "smollm2-gptq",
           "MAX_NEW_TOKENS": "24", "TEMPERATURE": "0", "GPTQMODEL_CPU_WORKERS": "2"}
    script = "What is the capital of France?\n/model\n/frobnicate\n/reset\n/quit\n"
    out = subprocess.run([sys.executable, "-m", "bot", "chat"], cwd=ROOT, env=env, input=script,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "Chatting with smollm2-gptq" in text
    assert "loading smollm2-gptq" in out.stderr  # the minute of loading and compiling is announced
    assert "Paris" in text
    assert "* smollm2-gptq" in text and "smollm2-awq" in text
    assert "Unknown command /frobnicate" in text
    assert "History cleared" in text
    assert "Traceback" not in out.stderr
    import sqlite3

    with sqlite3.connect(tmp_path / "chat.db") as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 0  # /reset cleared it
        assert conn.execute("SELECT platform, external_id FROM chats").fetchall() == [("terminal", "local")]
