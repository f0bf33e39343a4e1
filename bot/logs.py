"""Quiet, structured logging that never prints a bot token."""

from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.config import Settings

# Telegram tokens look like 123456:ABC-...; Discord tokens are three dot-separated base64 parts.
_TOKEN_PATTERNS = [
    re.compile(r"\d{5,}:[A-Za-z0-9_-]{20,}"),
    re.compile(r"[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{20,}"),
]
_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Redact this exact string from every log record from now on."""
    if value:
        _secrets.add(value)


def redact(text: str) -> str:
    for secret in _secrets:
        text = text.replace(secret, "[REDACTED]")
    for pattern in _TOKEN_PATTERNS:
        text = pattern.sub("[REDACTED]", text)
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {"t": self.formatTime(record), "level": record.levelname, "logger": record.name,
                "msg": record.getMessage()}
        data.update(getattr(record, "fields", {}) or {})
        if record.exc_text:
            data["exc"] = record.exc_text
        return json.dumps(data, default=str)


def setup_logging(settings: Settings, verbose: bool = False) -> None:
    level = logging.INFO if verbose else getattr(logging, settings.log_level.upper(), logging.WARNING)
    handler = logging.StreamHandler()
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter() if settings.log_json else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs request URLs, which carry the Telegram token, at INFO.
    for noisy in ("httpx", "httpcore", "discord.http", "discord.gateway", "telegram.ext", "transformers",
                  "gptqmodel", "logbar", "urllib3"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    for token in (settings.telegram_bot_token, settings.discord_bot_token):
        register_secret(token.get_secret_value() if token else None)
