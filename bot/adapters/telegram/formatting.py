"""Model Markdown -> Telegram HTML, safely: escape first, only ever emit balanced tags.

Handles ``` fenced blocks (with language), `inline code`, **bold** / __bold__, *italic* / _italic_,
~~strike~~, [text](http(s) url) and `#` headings (bold). Anything unbalanced stays literal text.
If the result does not nest cleanly, `markdown_to_html` returns the plain escaped text instead.
"""

from __future__ import annotations

import html
import re

_FENCE = re.compile(r"^ {0,3}(`{3,})([^`\n]*)$")
_INLINE_CODE = re.compile(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)
_LINK = re.compile(r"\[([^\[\]\n]+)\]\((https?://[^\s()<>\"]+|tg://[^\s()<>\"]+)\)")
_BOLD = re.compile(r"(?<![\\*\w])\*\*(?=\S)(.+?)(?<=\S)\*\*(?![*\w])|(?<![\\_\w])__(?=\S)(.+?)(?<=\S)__(?![_\w])")
_ITALIC = re.compile(r"(?<![\\*\w])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![*\w])|(?<![\\_\w])_(?=[^\s_])(.+?)(?<=[^\s_])_(?![_\w])")
_STRIKE = re.compile(r"(?<!~)~~(?=\S)(.+?)(?<=\S)~~(?!~)")
_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
_TAG = re.compile(r"<(/?)(b|i|s|code|pre|a)(?:\s[^>]*)?>")
_HOLE = "\x00{}\x00"


def escape(text: str) -> str:
    return html.escape(text, quote=False)


def _inline(text: str) -> str:
    """One non-code stretch of Markdown -> HTML."""
    holes: list[str] = []

    def hold(fragment: str) -> str:
        holes.append(fragment)
        return _HOLE.format(len(holes) - 1)

    text = text.replace("\x00", "")
    text = _INLINE_CODE.sub(lambda m: hold(f"<code>{escape(m.group(2))}</code>"), text)
    text = _LINK.sub(lambda m: hold(f'<a href="{html.escape(m.group(2), quote=True)}">{_inline(m.group(1))}</a>'), text)
    text = escape(text)
    text = _HEADING.sub(lambda m: f"<b>{m.group(1)}</b>", text)
    for _ in range(2):  # bold inside italic and the other way round
        text = _BOLD.sub(lambda m: f"<b>{m.group(1) or m.group(2)}</b>", text)
        text = _ITALIC.sub(lambda m: f"<i>{m.group(1) or m.group(2)}</i>", text)
    text = _STRIKE.sub(lambda m: f"<s>{m.group(1)}</s>", text)
    return re.sub(r"\x00(\d+)\x00", lambda m: holes[int(m.group(1))], text)


def _balanced(markup: str) -> bool:
    stack: list[str] = []
    for m in _TAG.finditer(markup):
        closing, tag = m.group(1), m.group(2)
        if not closing:
            stack.append(tag)
        elif not stack or stack.pop() != tag:
            return False
    return not stack


def markdown_to_html(text: str) -> str:
    """Telegram HTML for `text`; the escaped plain text when the Markdown is too odd to trust."""
    out: list[str] = []
    plain: list[str] = []
    code: list[str] | None = None
    fence = ("", "")
    for line in text.splitlines(keepends=True):
        m = _FENCE.match(line.rstrip("\r\n"))
        if code is None and m:
            out.append(_inline("".join(plain)))
            plain = []
            code, fence = [], (m.group(1), m.group(2).strip())
        elif code is not None and m and not m.group(2).strip() and len(m.group(1)) >= len(fence[0]):
            out.append(_pre(code, fence[1]))
            code = None
            if line.endswith("\n"):
                out.append("\n")
        elif code is not None:
            code.append(line)
        else:
            plain.append(line)
    if code is not None:  # unclosed block (a reply cut short): still show it as code
        out.append(_pre(code, fence[1]))
    out.append(_inline("".join(plain)))
    result = "".join(out)
    return result if _balanced(result) else escape(text)


def _pre(lines: list[str], language: str) -> str:
    body = escape("".join(lines).rstrip("\n")) or " "
    lang = re.sub(r"[^\w+#.-]", "", language.split()[0]) if language.split() else ""
    if lang:
        return f'<pre><code class="language-{lang}">{body}</code></pre>'
    return f"<pre>{body}</pre>"


def has_markup(text: str) -> bool:
    """Whether `markdown_to_html(text)` formats anything (otherwise plain text is the same)."""
    return markdown_to_html(text) != escape(text)
