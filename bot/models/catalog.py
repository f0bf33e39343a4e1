"""`python -m bot models list`: the configured model profiles and whether their files are present."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.config import ModelProfile, Settings


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    format: str
    location: str  # path, remote URL, or "-"
    available: bool
    is_default: bool
    description: str


def profile_files_present(profile: ModelProfile, models_dir: Path) -> bool:
    """True when the files an engine needs for this profile exist (remote profiles need none)."""
    if profile.format == "openai":
        return bool(profile.base_url)
    path = profile.resolved_path(models_dir)
    if path is None:
        return False
    if profile.format == "gguf":
        if path.is_dir():
            return (path / profile.gguf_file).is_file() if profile.gguf_file else any(path.glob("*.gguf"))
        return path.is_file()
    return (path / "config.json").is_file()


def catalog(settings: Settings) -> list[CatalogEntry]:
    entries = []
    for profile in settings.profiles.values():
        if profile.format == "openai":
            location = f"{profile.base_url or '-'} ({profile.remote_model or profile.name})"
        else:
            path = profile.resolved_path(settings.models_dir)
            location = str(path) if path else "-"
        entries.append(CatalogEntry(profile.name, profile.format, location,
                                    profile_files_present(profile, settings.models_dir),
                                    profile.name == settings.default_model, profile.description))
    return entries


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    entries = catalog(settings)
    width = max(len(e.name) for e in entries) + 2
    print(f"{'model':{width}} {'format':7} {'files':8} location")
    for e in entries:
        mark = "*" if e.is_default else " "
        state = "ready" if e.available else "missing"
        print(f"{mark}{e.name:{width - 1}} {e.format:7} {state:8} {e.location}")
    if not all(e.available for e in entries):
        print("\nmissing builds: run `python -m bot models prepare` (embedded models) "
              "or `python -m bot models download REPO` (hub models)")
    return 0
