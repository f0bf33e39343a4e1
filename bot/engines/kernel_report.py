"""What a loaded model's quantized layers run on, rated for this device: fast, acceptable or slow, with the
expected cost and the fix.

A GPTQ model on a generic kernel is many times slower while ``model.device`` still says ``cuda``; this module
makes that visible. It only looks at class names and a few attributes of a module tree (plus facts the caller
probed: compiler present, CPU kernels switched off, compile failed), so every rule is tested on fake modules.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger(__name__)

Rating = Literal["fast", "acceptable", "slow"]

# --- rules ---
RATING_ORDER: dict[str, int] = {"fast": 0, "acceptable": 1, "slow": 2}
# Measured here (README, 2-core AVX2): our int4 kernel ~1.4x torch's; compiled decode 59 tok/s vs eager 33.
TORCH_INT4_COST = "~1.4x slower than our int4 kernel"
EAGER_CPU_COST = "~1.8x slower than the compiled decode step"
# The tutorial's figure for GPTQ on the generic kernel on a GPU; not measured on this project's machines.
TORCH_GPU_COST = "~15x slower than Marlin"
TRITON_GPU_COST = "several times slower than Marlin at one token per step"
CPU_KERNELS_ENV = "QUANTBOT_CPU_KERNELS"
FIX_CPU_KERNELS_OFF = f"{CPU_KERNELS_ENV}=off switched our CPU kernels off; unset it to use them"
FIX_CXX = "install a C++ compiler (g++) and ninja so our CPU kernel builds"
FIX_NVCC = "install the CUDA toolkit (nvcc) so GPTQModel can build Marlin"
FIX_ASYM = ("this checkpoint is asymmetric (sym=False): Marlin needs sym=True; set the profile's backend to "
            "\"exllama_v2\" (takes sym=False) or use a symmetric build")
FIX_BACKEND = "set the profile's backend to \"marlin\" to see why GPTQModel did not pick it"
FIX_COMPILE = "torch.compile needs a working C++ compiler (g++); install one, or set TORCH_COMPILE=off to skip it"
FIX_GGUF_GPU = ("rebuild llama-cpp-python with CUDA: CMAKE_ARGS=\"-DGGML_CUDA=on\" pip install --force-reinstall "
                "--no-cache-dir llama-cpp-python")


@dataclass(frozen=True)
class Kernel:
    """One kind of quantized matmul and how it rates on the device it was found on."""

    label: str
    rating: Rating
    cost: str = ""


# Our own layers (bot/engines/cpu/int4.py, int8_head.py), by exact class name.
OUR_CPU_LAYERS: dict[str, Kernel] = {
    "NativeInt4Linear": Kernel("our int4 kernel", "fast"),
    "Q8Int4Linear": Kernel("our int4 kernel with 8-bit activations", "fast"),
    "PackedInt4Linear": Kernel("torch's int4 kernel", "acceptable", TORCH_INT4_COST),
}
HEAD_CLASSES = ("Int8Linear", "Q8Int8Linear")  # our 8-bit output head, fp32 or 8-bit activations
HEAD_BY_WIDTH_CLASS = "HeadByWidth"  # the 8-bit head for one row or for batches, the 16-bit one for the other
# GPTQModel's layer classes, matched in order by a pattern on the class name (they are many and versioned).
GPU_PATTERNS: tuple[tuple[str, Kernel], ...] = (
    ("marlin", Kernel("Marlin", "fast")),
    ("machete", Kernel("Machete", "fast")),
    ("bitblas", Kernel("BitBLAS", "fast")),
    ("exllama", Kernel("ExLlama", "fast")),
    ("gemvfast", Kernel("AWQ GEMV-fast", "fast")),
    ("triton", Kernel("Triton", "acceptable", TRITON_GPU_COST)),
    ("gemm", Kernel("AWQ GEMM", "acceptable")),
    ("gemv", Kernel("AWQ GEMV", "acceptable")),
    ("torch", Kernel("GPTQModel's Torch kernel", "slow", TORCH_GPU_COST)),
)
CPU_PATTERNS: tuple[tuple[str, Kernel], ...] = (
    ("torchaten", Kernel("GPTQModel's aten int4 layer (not repacked)", "acceptable", TORCH_INT4_COST)),
    ("torchfused", Kernel("GPTQModel's fused Torch layer", "acceptable")),
    ("torch", Kernel("GPTQModel's Torch kernel (dequantizes every call)", "slow")),
)
SLOW_GPU_LABELS = ("Triton", "GPTQModel's Torch kernel")  # where Marlin would be the fix


@dataclass(frozen=True)
class LoadFacts:
    """What the engine knows about the load besides the module tree."""

    device: str  # "cpu" or "cuda"
    compiled: bool = False
    compile_error: str | None = None  # torch.compile failed at warm-up and decoding fell back to eager
    cpu_kernels_off: bool = False  # QUANTBOT_CPU_KERNELS=off
    native_error: str | None = None  # why our CPU kernels did not build
    sym: bool | None = None  # the checkpoint's quantization_config.sym
    nvcc: bool | None = None  # the CUDA toolkit's compiler is on PATH
    backend_note: str | None = None  # "marlin failed, loaded with exllama_v2"
    torch_int4_faster: bool = False  # the race at load found torch's int4 kernel faster than ours on this CPU
    dense_prompts_from: int | None = None  # prompts of this many tokens and more unpack the int4 weights to bf16


@dataclass
class KernelReport:
    """The kernels of one loaded model, rated, with the fixes for whatever is not fast."""

    model: str
    quant: str  # "GPTQ 4-bit", "GGUF Q4_1", "unquantized bf16"
    device: str  # "CPU", "GPU (NVIDIA H100)"
    kernels: dict[str, int] = field(default_factory=dict)  # label -> layers
    extras: list[str] = field(default_factory=list)  # "8-bit head", "compiled", "eager"
    rating: Rating = "fast"
    costs: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for `/model` and the log, e.g. "m: GPTQ 4-bit on CPU, our int4 kernel, compiled"."""
        names = [label if len(self.kernels) == 1 else f"{label} ({n} layers)" for label, n in self.kernels.items()]
        line = f"{self.model}: {self.quant} on {self.device}, " + ", ".join(names + self.extras)
        return line if self.rating == "fast" else f"{line} [{self.rating}]"

    def warning(self) -> str | None:
        """The one load warning for a slow or degraded path (None when everything is fast)."""
        if self.rating == "fast":
            return None
        parts = [f"{self.summary()}: " + "; ".join(self.costs or ["slower than this device allows"])]
        if self.fixes:
            parts.append("fix: " + "; ".join(self.fixes))
        return ". ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "quant": self.quant, "device": self.device, "kernels": self.kernels,
                "extras": self.extras, "rating": self.rating, "costs": self.costs, "fixes": self.fixes,
                "summary": self.summary()}

    def degrade(self, rating: Rating, cost: str = "", fix: str = "") -> None:
        if RATING_ORDER[rating] > RATING_ORDER[self.rating]:
            self.rating = rating
        if cost and cost not in self.costs:
            self.costs.append(cost)
        if fix and fix not in self.fixes:
            self.fixes.append(fix)


def classify_layer(class_name: str, device: str) -> Kernel | None:
    """The kernel a layer class runs on `device` ("cpu"/"cuda"), or None for a layer that is not quantized."""
    if class_name in OUR_CPU_LAYERS:
        return OUR_CPU_LAYERS[class_name]
    key = re.sub(r"[^a-z0-9]", "", class_name.lower())
    if not key.endswith(("linear", "kernel")) or class_name in HEAD_CLASSES:
        return None
    for pattern, kernel in GPU_PATTERNS if device == "cuda" else CPU_PATTERNS:
        if pattern in key:
            return kernel
    return None


def is_quantized_layer(module: Any) -> bool:
    """GPTQModel's layers carry packed weights in ``qweight``; plain nn.Linear does not."""
    return hasattr(module, "qweight") and type(module).__name__ not in HEAD_CLASSES


def quant_label(fmt: str, quantization_config: Any, dtype: Any) -> str:
    """"GPTQ 4-bit", "AWQ 4-bit", or "unquantized bfloat16" from the model's config."""
    if fmt in ("gptq", "awq"):
        bits = config_value(quantization_config, "bits")
        return f"{fmt.upper()} {bits}-bit" if bits else fmt.upper()
    return f"unquantized {str(dtype).removeprefix('torch.')}"


def config_value(config: Any, key: str) -> Any:
    if config is None:
        return None
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def inspect_modules(model_name: str, quant: str, modules: Iterable[Any], facts: LoadFacts,
                    device_label: str | None = None) -> KernelReport:
    """Rate every quantized layer in `modules` (a model's ``.modules()``) for ``facts.device``."""
    report = KernelReport(model_name, quant, device_label or ("GPU" if facts.device == "cuda" else "CPU"))
    counts: Counter[str] = Counter()
    head = ""
    unknown: Counter[str] = Counter()
    for module in modules:
        name = type(module).__name__
        if name == HEAD_BY_WIDTH_CLASS:
            head = "8-bit head for one chat" if type(module.one).__name__ in HEAD_CLASSES else "8-bit head for batches"
            continue
        if name in HEAD_CLASSES:
            head = head or "8-bit head"
            continue
        kernel = classify_layer(name, facts.device)
        if kernel is not None and name == "PackedInt4Linear" and facts.torch_int4_faster:
            kernel = Kernel("torch's int4 kernel (faster than ours here)", "fast")
        if kernel is None:
            if is_quantized_layer(module):
                unknown[name] += 1
            continue
        counts[kernel.label] += 1
        report.degrade(kernel.rating, kernel.cost, _fix_for(kernel, facts))
    for name, n in unknown.items():
        counts[name] += n
        report.degrade("acceptable", f"{name} is a kernel this report does not know")
    report.kernels = dict(counts.most_common())
    if head:
        report.extras.append(head)
    if facts.dense_prompts_from:
        report.extras.append(f"prompts of {facts.dense_prompts_from}+ tokens on bf16 matmuls")
    _rate_decode(report, facts)
    if facts.backend_note:
        report.extras.append(facts.backend_note)
    return report


def _fix_for(kernel: Kernel, facts: LoadFacts) -> str:
    if kernel.rating == "fast":
        return ""
    if facts.device == "cpu":
        if facts.cpu_kernels_off:
            return FIX_CPU_KERNELS_OFF
        if facts.native_error:
            return f"{FIX_CXX} (build failed: {facts.native_error})"
        return FIX_CXX
    if kernel.label in SLOW_GPU_LABELS:
        if facts.sym is False:
            return FIX_ASYM
        if facts.nvcc is False:
            return FIX_NVCC
        return FIX_BACKEND
    return ""


def _rate_decode(report: KernelReport, facts: LoadFacts) -> None:
    """Compiled or eager; eager after a failed compile on the CPU is a degraded path."""
    if facts.compiled:
        report.extras.append("compiled")
        return
    if facts.compile_error:
        report.extras.append("eager (torch.compile failed)")
        report.degrade("acceptable", EAGER_CPU_COST if facts.device == "cpu" else "",
                        f"{FIX_COMPILE} (error: {facts.compile_error})")
    else:
        report.extras.append("eager")


# llama.cpp's `general.file_type` (enum llama_ftype) for the common builds; otherwise the file name says.
GGUF_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
                   12: "Q3_K_M", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}
GGUF_NAME_TYPE = re.compile(r"(IQ\d\w*?|Q\d_K(?:_[SML])?|Q\d_\d|BF16|F16|F32)(?=\.gguf$|[-_.])", re.IGNORECASE)


def gguf_quant(metadata: dict[str, Any], file_name: str) -> str:
    """"Q4_1", "Q4_K_M", ... from the GGUF metadata or, failing that, the file name."""
    try:
        return GGUF_FILE_TYPES[int(metadata.get("general.file_type", -1))]
    except (KeyError, ValueError, TypeError):
        found = GGUF_NAME_TYPE.search(file_name)
        return found.group(1).upper() if found else "(type unknown)"


def gguf_report(model_name: str, quant: str, gpu_layers: int, offload_supported: bool, gpu_present: bool,
                threads: int) -> KernelReport:
    """llama.cpp's path: all layers on the GPU, or the CPU (slow only where a GPU sits idle)."""
    if gpu_layers != 0:
        return KernelReport(model_name, f"GGUF {quant}", "GPU", {"llama.cpp CUDA": 1}, ["all layers offloaded"])
    report = KernelReport(model_name, f"GGUF {quant}", "CPU", {"llama.cpp": 1}, [f"{threads} threads"])
    if gpu_present and not offload_supported:
        report.degrade("slow", "a GPU is present but this llama.cpp build has no GPU offload", FIX_GGUF_GPU)
    return report


def log_report(report: KernelReport) -> None:
    """One WARNING for a slow or degraded path (with the fix), the summary at INFO otherwise."""
    warning = report.warning()
    if warning:
        log.warning("%s", warning)
    else:
        log.info("%s", report.summary())


def nvcc_on_path() -> bool:
    return shutil.which("nvcc") is not None


def nvidia_gpu_visible() -> bool:
    """Whether the NVIDIA driver sees a GPU (``nvidia-smi -L``), whatever torch was built with."""
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout
