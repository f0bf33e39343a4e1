"""split_message: chunks fit the platform limit, cut at natural boundaries, keep code blocks whole."""

from __future__ import annotations

import random
import re

import pytest

from bot.adapters.textsplit import split_message, split_parts, utf16_length

FENCE_LINE = re.compile(r"^ {0,3}```", re.MULTILINE)


def _rejoin(text: str, limit: int, **kw: object) -> str:
    return "".join(c.body for c in split_parts(text, limit, **kw))  # type: ignore[arg-type]


def _balanced(chunk: str) -> bool:
    return len(FENCE_LINE.findall(chunk)) % 2 == 0


def test_short_text_is_one_chunk() -> None:
    assert split_message("hello world", 4096) == ["hello world"]
    assert split_message("", 10) == []


def test_splits_at_paragraph_boundary() -> None:
    a, b = "a" * 60, "b" * 60
    chunks = split_message(f"{a}\n\n{b}", 100)
    assert [c.strip() for c in chunks] == [a, b]


def test_prefers_line_then_word_boundary() -> None:
    lines = "\n".join(f"line number {i:02d}" for i in range(20))  # 14 chars + newline each
    chunks = split_message(lines, 50)
    assert all(len(c) <= 50 for c in chunks)
    for c in chunks:
        assert re.fullmatch(r"(line number \d\d\n?)+", c), c  # only whole lines
    words = " ".join(f"word{i}" for i in range(40))
    chunks = split_message(words, 30)
    assert all(len(c) <= 30 for c in chunks)
    assert all(re.fullmatch(r"(word\d+ ?)+", c) for c in chunks)  # no word cut in half


def test_hard_cut_only_when_no_boundary() -> None:
    text = "x" * 250
    chunks = split_message(text, 100)
    assert chunks == ["x" * 100, "x" * 100, "x" * 50]


def test_code_block_closed_and_reopened_with_language() -> None:
    code = "\n".join(f"print({i})" for i in range(40))
    text = f"Here is code:\n\n```python\n{code}\n```\n\nDone."
    chunks = split_message(text, 120)
    assert len(chunks) > 2
    assert all(len(c) <= 120 for c in chunks)
    assert all(_balanced(c) for c in chunks), chunks
    for c in chunks[1:]:
        if "print(" in c:
            assert c.startswith("```python\n"), c
    assert _rejoin(text, 120) == text


def test_unclosed_block_at_end_stays_open_but_chunks_balanced_before() -> None:
    text = "intro\n```js\n" + "\n".join(f"let v{i} = {i};" for i in range(30))
    parts = split_parts(text, 80)
    assert "".join(p.body for p in parts) == text
    assert all(len(p.text) <= 80 for p in parts)
    assert all(_balanced(p.text) for p in parts[:-1])
    assert parts[-1].text.startswith("```js\n")


def test_counts_with_custom_length() -> None:
    text = "😀" * 300  # 2 UTF-16 units each
    chunks = split_message(text, 100, length=utf16_length)
    assert all(utf16_length(c) <= 100 for c in chunks)
    assert "".join(chunks) == text


@pytest.mark.parametrize("seed", range(40))
def test_random_texts_never_exceed_limit_and_lose_nothing(seed: int) -> None:
    rng = random.Random(seed)
    pieces = ["word", "longerword", " ", " ", "\n", "\n\n", "```", "```py\n", "\n```\n", "`", "*", "é",
              "🙂", "x" * rng.randint(1, 200)]
    text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 600)))
    limit = rng.choice([20, 50, 200, 4096])
    parts = split_parts(text, limit, length=utf16_length)
    assert "".join(p.body for p in parts) == text
    for p in parts:
        assert 0 < utf16_length(p.text) <= limit
        assert p.body


def test_long_reply_fills_chunks_reasonably() -> None:
    para = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 8).strip()
    text = "\n\n".join([para] * 30)
    chunks = split_message(text, 4096)
    assert len(chunks) == 4  # about 13.8k characters in 4096-character messages, cut at paragraphs
    assert all(c.rstrip().endswith("elit.") for c in chunks)
