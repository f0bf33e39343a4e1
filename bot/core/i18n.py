"""The bot's own words in the reader's language: gettext catalogues under bot/locale (domain `quantbot`).

The English text in the code is the message id; `bot/locale/<lang>/LC_MESSAGES/quantbot.po` holds
each translation and its compiled `.mo` beside it (`scripts/i18n` extracts, updates and compiles;
tests/test_i18n.py fails when they drift apart). Module constants are marked with `N_` and
translated where they are shown with `_`, which reads the language of the message being answered:
`using(locale)` sets it for one message (the adapters and `ChatService.handle` do), so every text
written while answering, down to the reply sink, speaks it without passing it around.

Languages: English (the ids) and Simplified Chinese. `zh`, `zh-CN`, `zh-SG`, `zh-Hans` (any case,
`-` or `_`) read Simplified Chinese; Traditional (`zh-TW`, `zh-HK`, `zh-MO`, `zh-Hant`) is not
offered and falls back to English, as does any other language. LANGUAGE (the setting) forces one;
like GNU gettext's variable it may list several (`zh_CN:en`): the first one available wins.
"""

from __future__ import annotations

import gettext
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path

DOMAIN = "quantbot"
LOCALE_DIR = Path(__file__).resolve().parents[1] / "locale"
ENGLISH = "en"
CHINESE = "zh_Hans"
LANGUAGES = (ENGLISH, CHINESE)  # catalogue names (ENGLISH needs none: the ids are English)
TRADITIONAL = frozenset({"hant", "tw", "hk", "mo"})  # script or region subtags of Traditional Chinese

_current: ContextVar[str] = ContextVar("quantbot_locale", default=ENGLISH)


def N_(message: str) -> str:  # noqa: N802 - the gettext convention, and a Babel keyword
    """Marks a constant for the catalogue; it is translated where it is shown (`_`)."""
    return message


def normalize(tag: str | None) -> str | None:
    """A language tag from a platform or the environment -> one of LANGUAGES, or None if not offered."""
    if not tag:
        return None
    parts = tag.split(".")[0].split("@")[0].replace("_", "-").lower().split("-")
    if parts[0] == "en":
        return ENGLISH
    if parts[0] == "zh" and not TRADITIONAL & set(parts[1:]):
        return CHINESE
    return None


def pick(forced: str | None, *wanted: str | None) -> str:
    """The language to answer in: LANGUAGE's first available one, else the first available of `wanted`."""
    for tag in [*(forced or "").split(":"), *wanted]:
        if found := normalize(tag.strip() if tag else tag):
            return found
    return ENGLISH


@lru_cache(maxsize=None)
def translator(locale: str) -> gettext.NullTranslations:
    """The catalogue for `locale` (any tag `normalize` knows); English and unknown tags: the ids as they are."""
    language = normalize(locale)
    if language is None or language == ENGLISH:
        return gettext.NullTranslations()
    return gettext.translation(DOMAIN, LOCALE_DIR, languages=[language])


@contextmanager
def using(locale: str) -> Iterator[None]:
    """Answer in `locale` within this block (this task and the tasks it starts)."""
    token = _current.set(locale)
    try:
        yield
    finally:
        _current.reset(token)


def current() -> str:
    return _current.get()


def _(message: str) -> str:
    """`message` in the language of the message being answered ("" stays "": it is the catalogue's header)."""
    return translator(_current.get()).gettext(message) if message else message


def ngettext(singular: str, plural: str, n: int) -> str:
    return translator(_current.get()).ngettext(singular, plural, n)
