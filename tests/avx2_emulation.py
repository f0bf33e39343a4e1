"""`pytest -p tests.avx2_emulation`: the process behaves like an AVX2-only x86-64 CPU (no AVX-512, VNNI or bf16
arithmetic) on a newer one, so the AVX2 paths and their costs show on any host. Session 16's AVX2 host ran CI 4x
slower than a Zen 4, and no test had shown why. Torch's and inductor's vector code, oneDNN's matmuls, the batched
attention's bf16 choice and our 8-bit-activation kernels all take their AVX2 paths (docs/performance.md, Session 18).
Close to the real host: 8 chats 2.8-3.4x one chat here against 2.6-2.8x there, the switch test 531 s against 600 s.
"""

from __future__ import annotations

import os
import sys

import pytest

if "torch" in sys.modules:
    raise RuntimeError("load this plugin before torch is imported: pytest -p tests.avx2_emulation")
os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2"

import torch  # noqa: E402 - after the variables it reads

for probe in ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_vnni_supported", "_is_amx_tile_supported",
              "_is_amx_fp16_supported"):
    setattr(torch.cpu, probe, lambda: False)


def pytest_configure(config: pytest.Config) -> None:
    """After conftest has pointed the kernel builds at the models directory."""
    from bot.engines.cpu import native

    ops = native.kernels()
    if ops is not None:
        ops.q8_avx2_only(True)
