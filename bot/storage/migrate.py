"""Apply and revert Alembic migrations (at start-up and via `python -m bot db ...`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from alembic import command
from alembic.config import Config

from bot.config import Settings

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    """Blocking (alembic runs its own event loop): call via asyncio.to_thread from async code."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


def cmd_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    upgrade(settings.database_url)
    print("database is at the latest schema")
    return 0


def cmd_downgrade(args: argparse.Namespace, settings: Settings) -> int:
    downgrade(settings.database_url, args.revision)
    print(f"database downgraded to {args.revision}")
    return 0
