"""Markdown -> Telegram HTML: formats what it should, and whatever the model writes still parses."""

from __future__ import annotations

import random

import pytest

from bot.adapters.telegram.formatting import has_markup, markdown_to_html
from tests.fakes.telegram_api import parse_html


def shown(markdown: str) -> tuple[str, list[dict[str, object]]]:
    """What a Telegram user sees: the fake server's parse of our HTML."""
    return parse_html(markdown_to_html(markdown))


def test_common_markdown_becomes_entities() -> None:
    text, ents = shown("**Bold** and *it* and _it2_ and `x<y` and ~~gone~~ [docs](https://example.org/?a=1&b=2)")
    assert text == "Bold and it and it2 and x<y and gone docs"
    kinds = [(e["type"], text[e["offset"]:e["offset"] + e["length"]]) for e in ents]  # type: ignore[operator]
    assert kinds == [("bold", "Bold"), ("italic", "it"), ("italic", "it2"), ("code", "x<y"),
                     ("strikethrough", "gone"), ("text_link", "docs")]
    assert ents[-1]["url"] == "https://example.org/?a=1&b=2"


def test_code_block_keeps_language_and_raw_text() -> None:
    text, ents = shown("Run:\n```python\nif a < b and c > d:\n    print(\"**not bold**\")\n```\nok")
    assert "if a < b and c > d:\n    print(\"**not bold**\")" in text
    assert ents == [{"type": "pre", "offset": 5, "length": 45, "language": "python"}]
    assert text.endswith("\nok")


def test_headings_bold_and_lists_left_alone() -> None:
    text, ents = shown("# Title\n* one\n* two\n2 * 3 * 4 = 24\nsnake_case_name")
    assert text == "Title\n* one\n* two\n2 * 3 * 4 = 24\nsnake_case_name"
    assert [e["type"] for e in ents] == ["bold"]


@pytest.mark.parametrize("hostile", [
    "*unbalanced", "_under", "`tick", "<tag>", "a & b", "**a *b** c*", "[x](javascript:alert(1))",
    "```\nnever closed", "</b>", "&amp; literally", "\x00hole\x00", "*", "__", "~~", "[", "](",
])
def test_hostile_markdown_parses_and_keeps_the_words(hostile: str) -> None:
    text, _ = shown(f"start {hostile} end")
    for word in ("start", "end"):
        assert word in text
    assert not has_markup("plain words only") and has_markup("**x**")


@pytest.mark.parametrize("seed", range(60))
def test_random_markdown_always_parses(seed: int) -> None:
    rng = random.Random(seed)
    atoms = ["*", "**", "_", "__", "`", "```", "```py\n", "\n", " ", "<", ">", "&", "[a](https://x.y/)", "[",
             "]", "(", ")", "~~", "#", "word", "é", "🙂", "&lt;", "\\", "\"", "'"]
    md = "".join(rng.choice(atoms) for _ in range(rng.randint(1, 80)))
    if not md.strip():
        return
    text, _ = shown(md)  # raises like the real server if the markup were malformed
    assert text.strip() or not md.strip("`*_~# \n")
