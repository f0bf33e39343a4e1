"""The bot speaks the reader's language: the catalogues match the code, and both platforms pick the language."""

from __future__ import annotations

import gettext
import re
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from babel.messages.frontend import CommandLineInterface
from babel.messages.pofile import read_po

from bot.adapters.terminal import terminal_locale
from bot.core import i18n, queue
from bot.core.service import QUEUE_TEXTS, ChatService
from tests.conftest import toy_settings
from tests.core_helpers import say
from tests.test_discord_adapter import discord_world  # noqa: F401 - the fixture
from tests.test_telegram_adapter import running_bot, wait_contains

MakeService = Callable[..., AbstractAsyncContextManager[ChatService]]
ROOT = Path(__file__).resolve().parents[1]
POT = i18n.LOCALE_DIR / f"{i18n.DOMAIN}.pot"
CATALOGUES = sorted(i18n.LOCALE_DIR.glob(f"*/LC_MESSAGES/{i18n.DOMAIN}.po"))
PLACEHOLDER = re.compile(r"%\((\w+)\)")
HELP_ZH = "给我发消息，我就会回答。"  # the first line of /help in Chinese
HELP_EN = "Send me a message and I'll answer."


# --------------------------------------------------------------------------- languages


@pytest.mark.parametrize("tag, language", [
    ("zh-hans", i18n.CHINESE), ("zh-Hans", i18n.CHINESE), ("zh_CN", i18n.CHINESE), ("zh-cn", i18n.CHINESE),
    ("zh", i18n.CHINESE), ("zh-SG", i18n.CHINESE), ("zh-Hans-CN", i18n.CHINESE), ("zh_CN.UTF-8", i18n.CHINESE),
    ("zh-TW", None), ("zh-Hant", None), ("zh_HK", None), ("en", i18n.ENGLISH), ("en-GB", i18n.ENGLISH),
    ("fr", None), ("C.UTF-8", None), ("", None), (None, None),
])
def test_language_tags_normalize_to_the_catalogues(tag: str | None, language: str | None) -> None:
    assert i18n.normalize(tag) == language


def test_language_forces_one_and_an_unknown_language_falls_back_to_english() -> None:
    assert i18n.pick("zh", "en-US") == i18n.CHINESE
    assert i18n.pick("fr_FR:zh_CN:en", "en") == i18n.CHINESE  # GNU-style list: the first one we have
    assert i18n.pick("", "zh-hans") == i18n.CHINESE
    assert i18n.pick("", "fr") == i18n.ENGLISH
    assert i18n.pick("fr", "zh-hans") == i18n.CHINESE  # a LANGUAGE we don't have forces nothing
    assert i18n.translator("fr").gettext("bye") == "bye"
    assert i18n.translator("zh-CN").gettext("bye") == "再见"


def test_the_terminal_reads_language_then_the_posix_locale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LC_ALL", "LC_MESSAGES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LANG", "zh_CN.UTF-8")
    assert terminal_locale(toy_settings(tmp_path)) == i18n.CHINESE
    assert terminal_locale(toy_settings(tmp_path, language="en")) == i18n.ENGLISH


# --------------------------------------------------------------------------- catalogues


def test_the_queue_texts_are_in_the_catalogue() -> None:
    """bot/core/queue.py writes them in English; the service's copies put them in the catalogue."""
    assert QUEUE_TEXTS == (queue.NO_MODEL, queue.SHUTTING_DOWN), "queue.py changed a text: update QUEUE_TEXTS"
    with i18n.using(i18n.CHINESE):
        assert i18n._(queue.SHUTTING_DOWN) == "机器人正在关闭。"


def _ids(path: Path) -> set[Any]:
    with path.open("rb") as f:
        return {m.id for m in read_po(f) if m.id}


def test_every_text_in_the_code_is_in_the_template_and_every_catalogue(tmp_path: Path) -> None:
    """scripts/i18n extracts with pyproject.toml's mapping; run it after changing a text."""
    extracted = tmp_path / "extracted.pot"
    CommandLineInterface().run(["pybabel", "-q", "extract", "-F", str(ROOT / "pyproject.toml"), "--no-location",
                                "-o", str(extracted), str(ROOT / "bot")])
    in_code = _ids(extracted)
    assert len(in_code) > 100
    assert _ids(POT) == in_code, "bot/locale/quantbot.pot is stale: run scripts/i18n"
    assert CATALOGUES, "no .po files"
    for po in CATALOGUES:
        assert _ids(po) == in_code, f"{po} misses texts or keeps old ones: run scripts/i18n and translate"


@pytest.mark.parametrize("po", CATALOGUES, ids=lambda p: p.parts[-3])
def test_each_catalogue_is_translated_with_the_same_placeholders(po: Path) -> None:
    with po.open("rb") as f:
        catalog = read_po(f)
    problems = []
    for m in catalog:
        if not m.id:
            continue
        ids = m.id if isinstance(m.id, tuple) else (m.id,)
        strings = m.string if isinstance(m.string, tuple) else (m.string,)
        if m.fuzzy or not all(strings):
            problems.append(f"untranslated or fuzzy: {ids[0]!r}")
            continue
        wanted = set(PLACEHOLDER.findall(ids[-1]))
        problems += [f"placeholders of {ids[0]!r}: {s!r}" for s in strings if set(PLACEHOLDER.findall(s)) != wanted]
        if re.search(r"\{\w*\}", ids[0]):
            problems.append(f"{{}} placeholder (use %(name)s): {ids[0]!r}")
    problems += [f"{m.id!r}: {err}" for m, errors in catalog.check() for err in errors]  # Babel's python-format check
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("po", CATALOGUES, ids=lambda p: p.parts[-3])
def test_the_compiled_catalogue_matches_its_source(po: Path) -> None:
    """The committed .mo is what the bot reads: it must say what the .po says (scripts/i18n compiles it)."""
    with po.open("rb") as f:
        source = read_po(f)
    expected: dict[Any, str] = {}
    for m in source:
        if not m.id:
            continue
        if isinstance(m.id, tuple):
            expected |= {(m.id[0], i): s for i, s in enumerate(m.string)}
        else:
            expected[m.id] = m.string
    with po.with_suffix(".mo").open("rb") as f:
        compiled = gettext.GNUTranslations(f)
    assert {k: v for k, v in compiled._catalog.items() if k != ""} == expected, \
        f"{po.with_suffix('.mo')} is stale: run scripts/i18n"  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- Telegram

LI = 2002  # a person whose Telegram app is in Simplified Chinese


async def test_telegram_help_in_chinese_for_a_zh_hans_user(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service) as (fake, _service):
        fake.set_language(LI, "zh-hans")
        await fake.user_says("/help", user_id=LI, name="Li")
        shown = await wait_contains(fake, LI, HELP_ZH)
        assert "/reset - 清除本聊天的历史记录" in shown and "模型：toy-a" in shown

        fake.set_language(1001, "en")
        await fake.user_says("/help")
        await wait_contains(fake, 1001, HELP_EN)
        fake.set_language(3003, "fr")  # no French catalogue: English
        await fake.user_says("/help", user_id=3003, name="Zoé")
        await wait_contains(fake, 3003, HELP_EN)


async def test_telegram_command_menus_per_language(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service) as (fake, _service):
        default, chinese = fake.command_lists[("default", "")], fake.command_lists[("default", "zh")]
        assert [c["command"] for c in chinese] == [c["command"] for c in default]
        assert {c["command"]: c["description"] for c in default}["help"] == "list the commands"
        assert {c["command"]: c["description"] for c in chinese}["help"] == "列出所有命令"


async def test_telegram_language_setting_forces_chinese_for_an_english_user(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service, language="zh") as (fake, _service):
        assert {c["command"]: c["description"] for c in fake.commands}["help"] == "列出所有命令"
        fake.set_language(1001, "en-US")
        await fake.user_says("/help")
        await wait_contains(fake, 1001, HELP_ZH)


# --------------------------------------------------------------------------- Discord


async def test_discord_help_in_chinese_for_a_zh_cn_interaction(discord_world: Callable[..., Any]) -> None:
    async with discord_world() as w:
        w.fake.set_locale(w.alice, "zh-CN")
        inter = await w.command("help")
        assert inter.ephemeral and inter.content.startswith(HELP_ZH), inter.content
        english = await w.command("help", user=w.bob)  # en-US, the default
        assert english.content.startswith(HELP_EN)


async def test_discord_commands_are_described_in_chinese_for_zh_cn(discord_world: Callable[..., Any]) -> None:
    async with discord_world() as w:
        commands = {c["name"]: c for c in w.fake.commands[None]}
        assert commands["help"]["description"] == "List the commands"
        assert commands["help"]["description_localizations"]["zh-CN"] == "列出所有命令"
        assert "zh-TW" not in commands["help"]["description_localizations"]  # Traditional: English, not Simplified
        prompt = commands["chat"]["options"][0]
        assert prompt["description_localizations"]["zh-CN"] == "你要发给模型的消息"
        assert not commands["chat"].get("name_localizations")  # names stay as they are


async def test_discord_language_setting_and_the_guild_locale(discord_world: Callable[..., Any]) -> None:
    async with discord_world(language="zh") as w:
        inter = await w.command("help")  # alice's client is en-US
        assert inter.content.startswith(HELP_ZH)
    async with discord_world() as w:
        w.guild["preferred_locale"] = "zh-CN"  # a plain message carries no locale: the server's is used
        await w.fake.dispatch("GUILD_UPDATE", w.guild)
        await w.say(f"{w.fake.mention()} /help")
        replies = [m["content"] for m in w.fake.messages[w.channel["id"]].values()
                   if m["author"]["id"] == w.fake.app_id]
        assert replies and replies[-1].startswith(HELP_ZH), replies


# --------------------------------------------------------------------------- the service


async def test_refusals_written_in_the_queue_worker_keep_the_askers_language(make_toy_service: MakeService) -> None:
    """A too-long request is refused when its reply starts, in the queue's worker: still in the asker's language."""
    async with make_toy_service(context_length=64, max_new_tokens=16) as service:
        huge = " ".join(f"w{i}" for i in range(200))  # the scripted engine counts a word as a token
        refused = await say(service, huge, locale=i18n.CHINESE)
        assert refused.errors and refused.errors[0].startswith("你的消息太长了："), refused.errors
        english = await say(service, huge, chat="c2")
        assert english.errors[0].startswith("Your message is too long:")
        stats = await say(service, "/stats", locale=i18n.CHINESE, is_admin=True)
        assert stats.notices[0].startswith("本对话：") and "机器人自" in stats.notices[0], stats.notices
