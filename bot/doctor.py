"""`python -m bot doctor [--json] [--load]`: the one command to run when the bot is slow or broken.

It reports what this machine gives the bot — Python and torch (CUDA or not), GPUs, nvcc and a C++ compiler, our
CPU kernels, GPTQModel's usable kernels, llama.cpp and its GPU offload, each configured model (files, format, and
with --load the kernel report), the database and which adapters have a token — and never prints a secret.
Exit 0 when the default model can run, 1 otherwise.

Every probe of the outside world is a small module-level function, so tests replace them one by one.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from bot.engines import kernel_report

if TYPE_CHECKING:
    from bot.config import ModelProfile, Settings

Status = Literal["ok", "info", "warn", "error"]

# --- constants ---
PROBE_TIMEOUT_S = 10
GIB = 1024 ** 3
CUDA_TORCH_FIX = "install a CUDA build of torch: pip install --force-reinstall torch --index-url " \
                 "https://download.pytorch.org/whl/cu128 (pick the CUDA version your driver supports)"
NVCC_FIX = "install the CUDA toolkit (nvcc), e.g. the nvidia/cuda:*-devel image or apt install cuda-toolkit"
CXX_FIX = "install a C++ compiler: apt install g++ (Debian/Ubuntu)"
CXX_NAMES = ("c++", "g++", "clang++")
GPTQ_BACKEND_PREFIXES = ("gptq_", "awq_")
MARKS = {"ok": "ok", "info": "--", "warn": "WARN", "error": "ERROR"}


@dataclass
class Finding:
    area: str
    status: Status
    text: str
    fix: str = ""


@dataclass
class GpuInfo:
    name: str
    memory_gib: float
    capability: str  # "8.6"
    bf16: bool | None = None


@dataclass
class TorchFacts:
    version: str
    cuda_build: str | None  # torch.version.cuda: None on a CPU-only build
    cuda_available: bool
    gpus: list[GpuInfo] = field(default_factory=list)


@dataclass
class Report:
    findings: list[Finding]
    default_model: str
    default_can_run: bool
    kernel_reports: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 0 if self.default_can_run else 1

    def as_dict(self) -> dict[str, Any]:
        return {"default_model": self.default_model, "default_can_run": self.default_can_run,
                "exit_code": self.exit_code, "findings": [asdict(f) for f in self.findings],
                "kernel_reports": self.kernel_reports}


# --- probes (each replaced in tests) ---

def torch_facts() -> TorchFacts | None:
    try:
        import torch
    except ImportError:
        return None
    gpus = []
    available = torch.cuda.is_available()
    if available:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            with torch.cuda.device(i):
                bf16 = torch.cuda.is_bf16_supported()
            gpus.append(GpuInfo(props.name, props.total_memory / GIB, f"{props.major}.{props.minor}", bf16))
    return TorchFacts(torch.__version__, torch.version.cuda, available, gpus)


def nvidia_smi_gpus() -> list[GpuInfo]:
    """The GPUs the NVIDIA driver sees, whatever torch was built with."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            try:
                gpus.append(GpuInfo(parts[0], float(parts[1]) / 1024, parts[2]))
            except ValueError:
                continue
    return gpus


def tool_version(names: tuple[str, ...]) -> tuple[str, str] | None:
    """(path, first line of --version) of the first of `names` on PATH."""
    for name in names:
        path = shutil.which(name)
        if path is None:
            continue
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                                 check=False)
        except (OSError, subprocess.SubprocessError):
            return path, "(version unknown)"
        lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
        release = [ln for ln in lines if "release" in ln]  # nvcc puts the version on its 4th line
        return path, (release or lines or ["(version unknown)"])[0].strip()
    return None


def cpu_kernel_facts() -> tuple[str, bool, bool, str | None]:
    """(torch's CPU capability, AVX2 path, built, why not): builds our kernels once (~15 s) if not cached."""
    from bot.engines.cpu import native

    capability, avx2 = native.cpu_capability()
    built = native.kernels() is not None
    return capability, avx2, built, native.build_error()


def gptqmodel_facts(device: str) -> tuple[str, list[str], dict[str, str]] | None:
    """(version, usable GPTQ/AWQ backends on `device`, unusable ones with the reason); None without GPTQModel."""
    from bot.engines.transformers_engine import quiet_gptqmodel

    quiet_gptqmodel()  # its banner goes to stdout, into --json
    try:
        import gptqmodel
        from gptqmodel.utils.importer import _import_all_qlinear_kernels, iter_quant_linear_kernels
    except ImportError:
        return None
    _import_all_qlinear_kernels()
    usable: list[str] = []
    unusable: dict[str, str] = {}
    for cls in iter_quant_linear_kernels():
        devices = {str(getattr(d, "value", d)).lower() for d in (getattr(cls, "SUPPORTS_DEVICES", None) or [])}
        if not devices & {device, "all"}:
            continue
        for backend in getattr(cls, "SUPPORTS_BACKENDS", []) or []:
            name = str(getattr(backend, "value", backend))
            if not name.startswith(GPTQ_BACKEND_PREFIXES):
                continue
            try:
                ok, err = cls.cached_validate_once()
            except Exception as exc:  # noqa: BLE001 - a kernel whose dependency is missing raises instead
                ok, err = False, exc
            if ok:
                usable.append(name)
            else:
                unusable[name] = str(err).splitlines()[0] if err else "not usable"
    return gptqmodel.__version__, sorted(set(usable)), dict(sorted(unusable.items()))


def llamacpp_facts() -> tuple[str, bool] | None:
    """(llama-cpp-python version, GPU offload compiled in); None when not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return getattr(llama_cpp, "__version__", "?"), bool(llama_cpp.llama_supports_gpu_offload())


def module_present(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def database_facts(url: str) -> tuple[str | None, str | None]:
    """(current revision, head revision) of the database; raises when it cannot be reached."""
    import asyncio

    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy.ext.asyncio import create_async_engine

    from bot.storage.migrate import alembic_config

    async def current() -> str | None:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())
        finally:
            await engine.dispose()

    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    return asyncio.run(current()), head


def load_report(profile: ModelProfile, settings: Settings) -> dict[str, Any]:
    """Load the model, take its kernel report, unload it (--load)."""
    from bot.engines import create_engine

    engine = create_engine(profile, settings)
    engine.load()
    try:
        report = getattr(engine, "kernel_report", None)
        return report.as_dict() if report is not None else {"summary": f"{profile.name}: loaded", "rating": "fast",
                                                            "fixes": [], "costs": []}
    finally:
        engine.unload()


# --- diagnosis ---

def diagnose(settings: Settings, load: bool = False) -> Report:
    from bot.engines.transformers_engine import use_model_caches

    use_model_caches(settings.models_dir)  # our kernels are built and found where the engine keeps them
    findings: list[Finding] = []
    torch_info = _python_and_torch(findings)
    driver_gpus = [] if torch_info is not None and torch_info.cuda_available else nvidia_smi_gpus()
    on_gpu = _gpus(findings, torch_info, driver_gpus)
    _toolchain(findings, on_gpu)
    _cpu_kernels(findings, settings)
    _gptqmodel(findings, on_gpu)
    _llamacpp(findings, gpu_present=on_gpu or bool(driver_gpus))
    reports: dict[str, dict[str, Any]] = {}
    can_run = _models(findings, settings, load, reports)
    _database(findings, settings)
    _adapters(findings, settings)
    return Report(findings, settings.default_model, can_run, reports)


def _python_and_torch(findings: list[Finding]) -> TorchFacts | None:
    facts = torch_facts()
    python = f"Python {platform.python_version()} ({sys.executable})"
    if facts is None:
        findings.append(Finding("python", "error", f"{python}; torch is not installed",
                                "pip install -e . (see README: setup)"))
        return None
    build = f"CUDA {facts.cuda_build}" if facts.cuda_build else "CPU-only build, no CUDA"
    findings.append(Finding("python", "ok", f"{python}; torch {facts.version} ({build})"))
    return facts


def _gpus(findings: list[Finding], facts: TorchFacts | None, driver: list[GpuInfo]) -> bool:
    """GPUs as torch sees them; the driver's view when torch cannot use them. True when torch runs on a GPU."""
    if facts is not None and facts.cuda_available:
        for i, gpu in enumerate(facts.gpus):
            bf16 = "" if gpu.bf16 is not False else "; no bf16: models run in fp16"
            findings.append(Finding("gpu", "ok", f"cuda:{i} {gpu.name}, {gpu.memory_gib:.1f} GiB, "
                                                 f"compute capability {gpu.capability}{bf16}"))
        return True
    if driver:
        names = ", ".join(f"{g.name} ({g.memory_gib:.1f} GiB, compute capability {g.capability})" for g in driver)
        why = "this torch has no CUDA" if facts is None or not facts.cuda_build else \
            f"this torch (CUDA {facts.cuda_build}) cannot use it: driver too old or CUDA_VISIBLE_DEVICES empty"
        findings.append(Finding("gpu", "error", f"a GPU is present but {why}: {names}",
                                CUDA_TORCH_FIX if facts is None or not facts.cuda_build else
                                "update the NVIDIA driver, or check CUDA_VISIBLE_DEVICES"))
    else:
        findings.append(Finding("gpu", "info", "no NVIDIA GPU: models run on the CPU"))
    return False


def _toolchain(findings: list[Finding], on_gpu: bool) -> None:
    nvcc = tool_version(("nvcc",))
    if nvcc:
        findings.append(Finding("toolchain", "ok", f"nvcc {nvcc[1]} ({nvcc[0]})"))
    elif on_gpu:
        findings.append(Finding("toolchain", "warn", "no nvcc: GPTQModel cannot build Marlin/ExLlama/Machete, so "
                                                     "GPTQ/AWQ fall back to Triton or Torch kernels (slow)",
                                NVCC_FIX))
    else:
        findings.append(Finding("toolchain", "info", "no nvcc (only needed on a GPU)"))
    cxx = tool_version(CXX_NAMES)
    if cxx:
        findings.append(Finding("toolchain", "ok", f"C++ compiler {cxx[1]} ({cxx[0]})"))
    else:
        findings.append(Finding("toolchain", "warn", "no C++ compiler: our CPU kernels and torch.compile cannot "
                                                     "build (CPU decoding ~2x slower)", CXX_FIX))


def _cpu_kernels(findings: list[Finding], settings: Settings) -> None:
    if settings.cpu_kernels == "off":
        findings.append(Finding("cpu kernels", "warn", f"{kernel_report.CPU_KERNELS_ENV}=off: our CPU kernels are "
                                                       "off, torch's int4 kernel runs (~1.4x slower)",
                                f"unset {kernel_report.CPU_KERNELS_ENV}"))
        return
    try:
        capability, avx2, built, error = cpu_kernel_facts()
    except ImportError:
        return  # no torch: already an error above
    vector = "AVX2 path" if avx2 else f"no AVX2 ({capability}): scalar path"
    if built:
        findings.append(Finding("cpu kernels", "ok", f"our CPU int4/int8 kernels built ({vector})"))
    else:
        findings.append(Finding("cpu kernels", "warn", f"our CPU kernels did not build: {error}; torch's int4 "
                                                       "kernel runs instead (~1.4x slower)", kernel_report.FIX_CXX))


def _gptqmodel(findings: list[Finding], on_gpu: bool) -> None:
    device = "cuda" if on_gpu else "cpu"
    try:
        facts = gptqmodel_facts(device)
    except Exception as exc:  # noqa: BLE001 - a broken install should not stop the rest of the report
        findings.append(Finding("gptqmodel", "error", f"GPTQModel failed to import: {type(exc).__name__}: {exc}"))
        return
    if facts is None:
        findings.append(Finding("gptqmodel", "warn", "GPTQModel is not installed: GPTQ/AWQ models cannot load",
                                "pip install gptqmodel==7.6.0"))
        return
    version, usable, unusable = facts
    findings.append(Finding("gptqmodel", "ok", f"GPTQModel {version}; usable on {device}: "
                                               f"{', '.join(usable) or 'none'}"))
    fast = [b for b in usable if "marlin" in b or "exllama" in b or "machete" in b]
    if on_gpu and not fast:
        reasons = "; ".join(f"{b}: {r}" for b, r in unusable.items() if "marlin" in b or "exllama" in b)
        findings.append(Finding("gptqmodel", "warn", f"no fast GPU kernel usable ({reasons or 'none found'})",
                                NVCC_FIX))


def _llamacpp(findings: list[Finding], gpu_present: bool) -> None:
    facts = llamacpp_facts()
    if facts is None:
        findings.append(Finding("llama.cpp", "info", "llama-cpp-python not installed: GGUF models cannot load",
                                "pip install 'llama-cpp-python[server]==0.3.36'"))
        return
    version, offload = facts
    if offload:
        findings.append(Finding("llama.cpp", "ok", f"llama-cpp-python {version}, offloads to the GPU"))
    elif gpu_present:
        findings.append(Finding("llama.cpp", "warn", f"llama-cpp-python {version} has no GPU offload: GGUF runs on "
                                                     "the CPU while a GPU is present", kernel_report.FIX_GGUF_GPU))
    else:
        findings.append(Finding("llama.cpp", "ok", f"llama-cpp-python {version} (CPU)"))


def _models(findings: list[Finding], settings: Settings, load: bool, reports: dict[str, dict[str, Any]]) -> bool:
    """One line per configured model; whether the default one can run."""
    from bot.models.catalog import profile_files_present

    profiles = settings.profiles
    if settings.default_model not in profiles:
        findings.append(Finding("models", "error", f"the default model {settings.default_model!r} is not "
                                                   f"configured (known: {', '.join(profiles) or 'none'})",
                                "set DEFAULT_MODEL to one of them"))
    can_run = False
    for profile in profiles.values():
        is_default = profile.name == settings.default_model
        area = f"model {profile.name}" + (" (default)" if is_default else "")
        ok = _model_finding(findings, area, profile, settings, profile_files_present(profile, settings.models_dir))
        if ok and load and profile.format != "openai":
            ok = _model_load(findings, area, profile, settings, reports)
        if is_default:
            can_run = ok
    return can_run


def _model_finding(findings: list[Finding], area: str, profile: ModelProfile, settings: Settings,
                   present: bool) -> bool:
    if profile.format == "openai":
        findings.append(Finding(area, "ok" if present else "error",
                                f"remote (OpenAI API) at {profile.base_url}" if present else "no base_url configured"))
        return present
    where = profile.resolved_path(settings.models_dir)
    if not present:
        from bot.engines.transformers_engine import missing_files_message

        findings.append(Finding(area, "error", f"{profile.format}: files missing at {where}",
                                missing_files_message(profile, where).split("; ", 1)[-1]))
        return False
    needs = {"gptq": ("transformers", "gptqmodel"), "awq": ("transformers", "gptqmodel"), "hf": ("transformers",),
             "gguf": ("llama_cpp",)}.get(profile.format, ())
    missing = [m for m in needs if not module_present(m)]
    if missing:
        findings.append(Finding(area, "error", f"{profile.format} at {where}; cannot load: "
                                               f"{', '.join(missing)} not installed"))
        return False
    backend = f", backend {profile.backend}" if profile.format in ("gptq", "awq") and profile.backend != "auto" else ""
    findings.append(Finding(area, "ok", f"{profile.format} at {where}{backend}"))
    return True


def _model_load(findings: list[Finding], area: str, profile: ModelProfile, settings: Settings,
                reports: dict[str, dict[str, Any]]) -> bool:
    try:
        report = load_report(profile, settings)
    except Exception as exc:  # noqa: BLE001 - EngineError and anything a broken install raises
        findings.append(Finding(area, "error", f"does not load: {exc}"))
        return False
    reports[profile.name] = report
    status: Status = "ok" if report.get("rating") == "fast" else "warn"
    costs = "; ".join(report.get("costs") or [])
    findings.append(Finding(area, status, report["summary"] + (f": {costs}" if costs else ""),
                            "; ".join(report.get("fixes") or [])))
    return True


def _database(findings: list[Finding], settings: Settings) -> None:
    url = settings.database_url
    shown = _without_password(url)
    if url.startswith("sqlite") and ":///" in url:
        file = Path(url.split(":///", 1)[1])
        if not file.exists():
            status: Status = "ok" if file.parent.is_dir() else "error"
            findings.append(Finding("database", status, f"{shown}: not created yet (the bot creates and migrates it "
                                                        "at start)" if status == "ok" else
                                    f"{shown}: folder {file.parent} does not exist",
                                    "" if status == "ok" else f"mkdir -p {file.parent}"))
            return
    try:
        current, head = database_facts(url)
    except Exception as exc:  # noqa: BLE001 - wrong host, password, driver missing
        findings.append(Finding("database", "error", f"{shown}: cannot connect ({type(exc).__name__}: "
                                                     f"{_without_password(str(exc)).splitlines()[0]})"))
        return
    if current == head:
        findings.append(Finding("database", "ok", f"{shown}: reachable, migrated ({head})"))
    else:
        findings.append(Finding("database", "warn", f"{shown}: reachable, at {current or 'no'} revision, latest "
                                                    f"{head} (the bot migrates at start)", "python -m bot db upgrade"))


def _without_password(text: str) -> str:
    """A database URL's password replaced, wherever it appears."""
    import re

    return re.sub(r"(://[^:/@\s]+:)[^@\s]+@", r"\1***@", text)


def _adapters(findings: list[Finding], settings: Settings) -> None:
    tokens = {"Telegram": settings.telegram_bot_token, "Discord": settings.discord_bot_token}
    present = [name for name, token in tokens.items() if token is not None and token.get_secret_value().strip()]
    for name in tokens:
        if name in present:
            findings.append(Finding("adapters", "ok", f"{name}: token set"))
    if not present:
        findings.append(Finding("adapters", "info", "no adapter token set: `python -m bot run` starts the terminal "
                                                    "chat", "set TELEGRAM_BOT_TOKEN and/or DISCORD_BOT_TOKEN"))


# --- output ---

def render(report: Report) -> str:
    lines = ["quantbot doctor"]
    area = None
    for f in report.findings:
        if f.area != area:
            lines.append(f"{f.area}:")
            area = f.area
        lines.append(f"  [{MARKS[f.status]:5}] {f.text}")
        if f.fix and f.status in ("warn", "error"):
            lines.append(f"          fix: {f.fix}")
    verdict = "can run" if report.default_can_run else "cannot run"
    lines.append(f"default model {report.default_model}: {verdict}")
    return "\n".join(lines)


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # GPTQModel and others print banners: keep stdout for the report
        report = diagnose(settings, load=args.load)
    print(json.dumps(report.as_dict(), indent=2) if args.json else render(report))
    return report.exit_code
