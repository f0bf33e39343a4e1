"""Alembic migrations: from empty to head, and a full downgrade/upgrade round trip."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from bot.storage import migrate

ROOT = Path(__file__).resolve().parents[1]


def tables(db: Path) -> dict[str, list[str]]:
    with sqlite3.connect(db) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' "
                                            "AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        return {n: [c[1] for c in conn.execute(f"PRAGMA table_info({n})")] for n in names}


def test_upgrade_from_empty(tmp_path):
    db = tmp_path / "m.db"
    migrate.upgrade(f"sqlite+aiosqlite:///{db}")
    t = tables(db)
    assert set(t) == {"alembic_version", "chats", "messages"}
    assert {"chat_id", "role", "content", "status", "model", "token_count", "user_id",
            "author_name"} <= set(t["messages"])
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "0006"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_downgrade_upgrade_round_trip_keeps_data(tmp_path):
    db = tmp_path / "m.db"
    url = f"sqlite+aiosqlite:///{db}"
    migrate.upgrade(url)
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO chats (platform, external_id, created_at) VALUES ('t', '1', '2026-01-01')")
        conn.execute("INSERT INTO messages (chat_id, role, content, status, created_at, updated_at, user_id) "
                     "VALUES (1, 'user', 'hello', 'complete', '2026-01-01', '2026-01-01', 'u1')")
    migrate.downgrade(url, "0003")
    assert "user_id" not in tables(db)["messages"]
    migrate.upgrade(url)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT content, user_id FROM messages").fetchall() == [("hello", None)]
    migrate.downgrade(url, "base")
    assert set(tables(db)) == {"alembic_version"}
    migrate.upgrade(url)
    assert set(tables(db)) == {"alembic_version", "chats", "messages"}


def test_cli_db_upgrade(tmp_path):
    db = tmp_path / "cli.db"
    env = {"DATABASE_URL": f"sqlite+aiosqlite:///{db}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "bot", "db", "upgrade"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "latest schema" in out.stdout
    assert "chats" in tables(db)
