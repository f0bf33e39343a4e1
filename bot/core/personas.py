"""Named system-prompt presets (PERSONAS_FILE) that a chat can choose with `/persona NAME`.

A persona is only a shortcut: choosing one stores its prompt as the chat's own system prompt
(`chats.system_prompt`), so a later edit of the file never silently changes chats that chose it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bot.errors import BotError

SHIPPED_PERSONAS = Path(__file__).resolve().parents[1] / "data" / "personas.json"
MAX_NAME_CHARS = 32  # Telegram callback_data is 64 bytes at most, with our prefix


@dataclass(frozen=True)
class Persona:
    name: str
    prompt: str
    description: str = ""


def load_personas(path: Path | None = None) -> dict[str, Persona]:
    """The presets by lower-case name, in file order; a malformed file is a clear start-up error."""
    source = Path(path).expanduser() if path else SHIPPED_PERSONAS
    try:
        entries = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BotError(f"PERSONAS_FILE {source}: cannot read it as JSON: {exc}") from None
    if not isinstance(entries, list):
        raise BotError(f"PERSONAS_FILE {source}: expected a JSON list of {{name, prompt}} objects")
    found: dict[str, Persona] = {}
    for i, entry in enumerate(entries):
        name = str(entry.get("name", "")).strip().lower() if isinstance(entry, dict) else ""
        prompt = str(entry.get("prompt", "")).strip() if isinstance(entry, dict) else ""
        if not name or not prompt or " " in name or len(name) > MAX_NAME_CHARS:
            raise BotError(f"PERSONAS_FILE {source}: entry {i} needs a one-word name (at most "
                           f"{MAX_NAME_CHARS} characters) and a prompt")
        found[name] = Persona(name, prompt, str(entry.get("description", "")).strip())
    return found


def persona_of(personas: dict[str, Persona], system_prompt: str | None) -> str | None:
    """The persona whose prompt a chat's stored system prompt is, if any (shown as current)."""
    return next((p.name for p in personas.values() if p.prompt == system_prompt), None)
