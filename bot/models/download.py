"""`python -m bot models download REPO_ID`: fetch a hub repo's quantized files and register a profile.

Uses huggingface_hub's `snapshot_download`: only the files that match the patterns, several at
once, resumable (a dropped transfer continues with an HTTP Range request; files already complete
are skipped on a re-run), with a progress bar. `HF_ENDPOINT` points it at a mirror and `HF_TOKEN`
at private repos, as with every Hugging Face tool.

Files are stored in MODELS_DIR/<org>--<name>; the profile is added to MODELS_FILE (or
MODELS_DIR/profiles.json when MODELS_FILE is unset), replacing one of the same name.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.config import ModelFormat, ModelProfile
from bot.errors import BotError

if TYPE_CHECKING:
    from bot.config import Settings

log = logging.getLogger(__name__)

MAX_WORKERS = 8  # files downloaded in parallel
# What a Transformers checkpoint needs besides its weights; always fetched for GPTQ/AWQ/HF repos.
METADATA_PATTERNS = [
    "config.json", "generation_config.json", "quantize_config.json", "quant_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
]
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
# Preferred GGUF quantizations when a repo holds several and no --include picks one (4-bit first).
GGUF_PREFERENCE = ["Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1", "IQ4_XS", "IQ4_NL", "Q5_K_M", "Q8_0"]


def cmd_download(args: argparse.Namespace, settings: Settings) -> int:
    """Download `args.repo_id` (optionally `--include`, `--revision`, `--name`) and register it."""
    profile = download_model(settings, args.repo_id, include=args.include, revision=args.revision,
                             name=getattr(args, "name", None))
    target = settings.profiles_file
    print(f"registered model {profile.name!r} ({profile.format}) in {target}")
    print(f"use it with: /model {profile.name}   or   DEFAULT_MODEL={profile.name}")
    return 0


def download_model(settings: Settings, repo_id: str, include: list[str] | None = None,
                   revision: str | None = None, name: str | None = None) -> ModelProfile:
    """Fetch the repo's needed files into MODELS_DIR and register (and return) its profile."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now: the library reads it once at import
    models_dir = Path(settings.models_dir).expanduser()
    local_dir = models_dir / repo_id.replace("/", "--")
    try:
        api = HfApi(endpoint=endpoint)
        files = [f.path for f in api.list_repo_tree(repo_id, revision=revision, recursive=True)
                 if hasattr(f, "size") and hasattr(f, "blob_id")]
        patterns = choose_patterns(files, include)
        wanted = [f for f in files if any(fnmatch.fnmatch(f, p) for p in patterns)]
        if not wanted:
            raise BotError(f"no file of {repo_id} matches {', '.join(patterns)} "
                           f"(it has: {', '.join(files[:12])}{' ...' if len(files) > 12 else ''})")
        print(f"downloading {len(wanted)} of {len(files)} files of {repo_id} to {local_dir}")
        snapshot_download(repo_id, revision=revision, local_dir=local_dir, allow_patterns=patterns,
                          max_workers=MAX_WORKERS, endpoint=endpoint)
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise BotError(f"repo {repo_id!r} not found, or it is private/gated (set HF_TOKEN)") from exc
    except RevisionNotFoundError as exc:
        raise BotError(f"repo {repo_id!r} has no revision {revision!r}") from exc
    except (LocalEntryNotFoundError, EntryNotFoundError) as exc:
        where = endpoint or "the Hugging Face Hub"
        raise BotError(f"could not download {repo_id!r} from {where}: {_first_line(exc)}") from exc
    except HfHubHTTPError as exc:
        raise BotError(f"the hub answered an error for {repo_id!r}: {_first_line(exc)}") from exc
    except OSError as exc:  # connection refused, disk full, consistency check after retries
        raise BotError(f"download of {repo_id!r} failed: {_first_line(exc)}; run the same command again "
                       "to resume") from exc

    fmt, gguf_file = detect_format(local_dir, wanted)
    profile = ModelProfile(
        name=name or default_name(repo_id, gguf_file),
        format=fmt,
        path=_relative(local_dir / gguf_file if gguf_file else local_dir, models_dir),
        hub_id=repo_id,
        gguf_file=gguf_file,
        context_length=_context_length(local_dir),
        description=f"{repo_id}{'@' + revision if revision else ''} ({fmt.upper()}, downloaded)",
    )
    register_profile(settings.profiles_file, profile)
    return profile


def choose_patterns(files: list[str], include: list[str] | None) -> list[str]:
    """The allow-patterns to fetch: --include plus the metadata a checkpoint needs, or a sensible default."""
    ggufs = [f for f in files if f.endswith(".gguf")]
    if include:
        picked = [f for f in files if any(fnmatch.fnmatch(f, p) for p in include)]
        if picked and all(f.endswith(".gguf") for f in picked):
            return list(include)  # a GGUF file is self-contained
        return list(include) + METADATA_PATTERNS
    if ggufs and not any(f.endswith(".safetensors") for f in files):
        return [pick_gguf(ggufs)]
    return WEIGHT_PATTERNS + METADATA_PATTERNS


def pick_gguf(ggufs: list[str]) -> str:
    """One GGUF file of several: the first preferred 4-bit quantization, else the smallest name."""
    for quant in GGUF_PREFERENCE:
        for f in sorted(ggufs):
            if re.search(rf"(?i)[.\-_]{re.escape(quant)}[.\-_]", Path(f).name):
                return f
    return sorted(ggufs)[0]


def detect_format(folder: Path, files: list[str]) -> tuple[ModelFormat, str | None]:
    """("gguf", file) for a GGUF; "gptq"/"awq" from config.json's quantization_config; else "hf"."""
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    if ggufs:
        if len(ggufs) > 1:
            log.warning("several GGUF files downloaded; the profile uses %s", ggufs[0])
        return "gguf", ggufs[0]
    config = _read_json(folder / "config.json")
    if config is None:
        raise BotError(f"{folder} has neither a .gguf file nor a config.json; not a model this bot can run")
    method = str((config.get("quantization_config") or {}).get("quant_method", "")).lower()
    if not method:
        if (folder / "quantize_config.json").exists():
            method = "gptq"  # AutoGPTQ-era layout
        elif (folder / "quant_config.json").exists():
            method = "awq"  # AutoAWQ-era layout
    if method in ("gptq", "awq"):
        return method, None  # type: ignore[return-value]
    if method:
        raise BotError(f"{folder.name} is quantized with {method!r}; this bot runs GPTQ, AWQ and GGUF")
    log.warning("%s is not quantized; registering it as a plain Transformers model", folder.name)
    return "hf", None


def default_name(repo_id: str, gguf_file: str | None) -> str:
    base = repo_id.split("/")[-1].lower()
    if gguf_file:
        quant = next((q for q in GGUF_PREFERENCE if q.lower() in gguf_file.lower()), None)
        if quant and quant.lower() not in base:
            base = f"{base}-{quant.lower()}"
    return re.sub(r"[^a-z0-9._-]+", "-", base)


def register_profile(target: Path, profile: ModelProfile) -> None:
    """Add `profile` to the JSON list in `target`, replacing one of the same name (atomic write)."""
    existing: list[dict[str, Any]] = []
    if target.exists():
        data = json.loads(target.read_text() or "[]")
        if not isinstance(data, list):
            raise BotError(f"{target} should hold a JSON list of model profiles")
        existing = [p for p in data if p.get("name") != profile.name]
    existing.append(profile.model_dump(mode="json", exclude_none=True, exclude_defaults=True) | {
        "name": profile.name, "format": profile.format})
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(json.dumps(existing, indent=2) + "\n")
    tmp.replace(target)


def _context_length(folder: Path) -> int | None:
    config = _read_json(folder / "config.json") or {}
    value = config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
