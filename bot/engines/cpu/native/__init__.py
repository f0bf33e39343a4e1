"""Our own CPU kernels (``torch.ops.quantbot``: ``int4_linear``, ``int8_linear``, and ``int4pack_weight`` for long
prompts of layers on torch's int4 kernel, in lowbit_linear.cpp; ``int4_linear_q8`` and ``int8_linear_q8``, 8-bit
activations through AVX512-VNNI (int4 also through AVX2), in q8_linear.cpp; ``decode_attention`` for batched decode
steps, AVX-512), compiled on first use with torch's C++ extension builder and cached by torch
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``).

A machine without a C++ compiler, or one where the build fails, keeps torch's kernels: :func:`kernels` then
returns None and :func:`build_error` says why (the engine's kernel report turns that into one load warning).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# --- tuning constants ---
SOURCES = [Path(__file__).with_name(n) for n in ("lowbit_linear.cpp", "q8_linear.cpp", "decode_attention.cpp")]
BASE_FLAGS = ["-O3", "-fopenmp"]  # OpenMP: at::parallel_for splits the outputs over torch's threads
# Vector flags by what torch detected on this CPU: explicit, not -march=native, so a cached build also runs on
# another machine of the same class (the capability is part of the build's name).
AVX2_CAPABLE = ("AVX2", "AVX512")  # torch's names for CPUs that run the AVX2/FMA code path
AVX2_FLAGS = ["-mavx2", "-mfma"]

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "ops": the loaded namespace, or None once a build failed


def kernels() -> Any | None:
    """``torch.ops.quantbot``, built the first time it is asked for; None where it cannot be built."""
    with _lock:
        if "ops" not in _state:
            _state["ops"] = _build()
        return _state["ops"]


def build_error() -> str | None:
    """Why the last build failed (None when it did not fail or was not tried)."""
    return _state.get("error")


def cpu_capability() -> tuple[str, bool]:
    """Torch's name for this CPU's vector unit, and whether our kernel's AVX2/FMA path runs on it."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return capability, capability in AVX2_CAPABLE


@contextlib.contextmanager
def avx2_only() -> Iterator[None]:
    """The 8-bit-activation kernels on their AVX2 path even where the CPU has AVX512-VNNI, so that a test covers the
    path of AVX2-only CPUs on any x86-64 host (the head's VNNI-only kernel refuses meanwhile)."""
    ops = kernels()
    assert ops is not None, "our kernels did not build"
    previous = ops.q8_avx2_only(True)
    try:
        yield
    finally:
        ops.q8_avx2_only(previous)


def _build() -> Any | None:
    import torch

    capability, avx2 = cpu_capability()
    name = f"quantbot_lowbit_{capability.lower()}"
    try:
        from torch.utils.cpp_extension import load

        start = time.perf_counter()
        log.info("building our CPU kernels %s (once; about 15 s)", name)
        vector_flags = AVX2_FLAGS if avx2 else []
        load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=BASE_FLAGS + vector_flags,
             extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        log.debug("CPU kernels ready in %.1f s", time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a failed build: torch's kernels still work
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        _state["error"] = f"{type(exc).__name__}: {first_line}".rstrip(": ")
        log.info("our CPU kernels could not be built (%s); using torch's, which are slower", _state["error"])
        return None
    _register_fakes()
    return torch.ops.quantbot


def _register_fakes() -> None:
    """The ops' output shapes, so torch.compile can trace through them."""
    import torch

    @torch.library.register_fake("quantbot::int4_linear")
    def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
          group_size: int) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))

    @torch.library.register_fake("quantbot::int8_linear")
    def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))

    @torch.library.register_fake("quantbot::int4_linear_q8")
    def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
          group_size: int) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], qweight.shape[0] * qweight.shape[2] // 4))

    @torch.library.register_fake("quantbot::decode_attention")
    def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
          scale: float) -> torch.Tensor:
        batch, heads, _, dim = query.shape
        return query.new_empty((batch, 1, heads, dim))

    @torch.library.register_fake("quantbot::int8_linear_q8")
    def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], qweight.shape[0] * qweight.shape[2] // 4))
