"""Quiet, structured logging that never prints a secret.

Every record our handler emits passes `RedactingFilter`: the bot tokens, the database password and
profiles' API keys (registered as they are read) are replaced, and so is anything shaped like a
token (Discord interaction tokens, the token in a Telegram API URL, `token=` / `password:` fields).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.config import Settings

REDACTED = "[REDACTED]"
# Secrets by their shape, for the ones never configured (Discord interaction tokens) or not yet registered.
_TOKEN_PATTERNS = [
    re.compile(r"\d{5,}:[A-Za-z0-9_-]{20,}"),  # Telegram bot token (also inside .../bot<token>/getMe URLs)
    re.compile(r"[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{20,}"),  # Discord bot token
    re.compile(r"aW50ZXJhY3Rpb246[A-Za-z0-9_.-]+"),  # Discord interaction token: base64 of "interaction:"
]
# Secrets by where they stand: the token segment of Discord webhook / interaction URLs, a URL's
# password, and the value of token / password / api key / authorization fields in reprs and JSON.
_PLACED_PATTERNS = [
    re.compile(r"(/(?:webhooks|interactions)/\d+/)[^/\s?'\"]+"),
    re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s/]+(?=@)", re.IGNORECASE),
    re.compile(r"""(['"]?\b(?:token|password|passwd|api_key|apikey|secret|authorization)['"]?\s*[:=]\s*['"]?)"""
               r"""(?:Bot |Bearer )?[^'"\s,}&]+""", re.IGNORECASE),
    re.compile(r"((?:Bot|Bearer) )[A-Za-z0-9_.-]{16,}"),
]
_secrets: set[str] = set()

# Third-party lines a user can do nothing about, silenced where they come from unless -v. Environment switches
# are read by those libraries at import time, so they are set (if the user has not) before any is imported.
QUIET_ENV = {
    "GPTQMODEL_DISABLE_GIL_WARNING": "1",  # GPTQModel's "Python GIL is enabled" banner, at import
    "TRANSFORMERS_VERBOSITY": "error",  # "`loss_type=None` was set ...", advisories
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # Transformers' "Loading weights" / GGUF conversion bars
}
QUIET_LOGGERS = {
    "torchao": logging.ERROR,  # "Failed to load ..._C_mxfp8...so" (GPU-only extensions), "Detected no triton"
    "torch.utils._pytree": logging.ERROR,  # deprecation notices about torchao's enums, at import
    "gptqmodel": logging.WARNING,
    "logbar": logging.WARNING,  # GPTQModel's logger: banner, "Kernel: selected ...", quantization tables
}
# (category, module regex) of Python warnings raised inside dependencies, never by us
QUIET_WARNINGS = ((FutureWarning, r"transformers\."), (DeprecationWarning, r"(torch|transformers|gptqmodel)\."),
                  (UserWarning, r"(torch|torchao|gptqmodel)\."))


def register_secret(value: str | None) -> None:
    """Redact this exact string from every log record from now on."""
    if value and len(value) >= 4:  # shorter ones would blank ordinary words
        _secrets.add(value)


def database_password(url: str) -> str | None:
    """The password in a DATABASE_URL, if it has one."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).password
    except ArgumentError:
        return None


def redact(text: str) -> str:
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    for pattern in _TOKEN_PATTERNS:
        text = pattern.sub(REDACTED, text)
    for pattern in _PLACED_PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text


class RedactingFilter(logging.Filter):
    """Renders each record once and removes secrets from its message, traceback and stack."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):  # structured extras that JsonFormatter prints
            record.fields = {k: redact(v) if isinstance(v, str) else v for k, v in fields.items()}
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {"t": self.formatTime(record), "level": record.levelname, "logger": record.name,
                "msg": record.getMessage()}
        data.update(getattr(record, "fields", {}) or {})
        if record.exc_text:
            data["exc"] = record.exc_text
        return json.dumps(data, default=str)


def quiet_third_party() -> None:
    """Silence dependencies' banners, notices and progress bars at their source (our own lines stay)."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for category, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", category=category, module=module)
    _quiet_logbar()


def _quiet_logbar() -> None:
    """GPTQModel's LogBar logger makes itself at INFO, with a blank line on stdout, when first imported: import it
    here with stdout aside, then lower it (it keeps its level from then on)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import logbar  # noqa: F401
    except ImportError:
        return
    logging.getLogger("logbar").setLevel(logging.WARNING)


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
    register_secret(database_password(settings.database_url))  # profiles' API keys: when they are read
    if level >= logging.WARNING:  # -v (or LOG_LEVEL=INFO/DEBUG) shows them
        quiet_third_party()
