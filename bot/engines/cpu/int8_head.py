"""The output head of a quantized model on the CPU as 8-bit codes with a scale per 32 inputs.

The head (vocabulary x hidden) is the largest single matmul of a small model's decode step and stays 16-bit in
GPTQ/AWQ checkpoints: on the embedded model it reads 56 MB per token. In the layout of GGUF's Q8_0, which is
where the embedded model's head comes from, it reads 32 MB through our kernel (:mod:`bot.engines.cpu.native`):
with AVX512-VNNI the 8-bit-activation one (:class:`Q8Int8Linear`), else the fp32 one (:class:`Int8Linear`).
The unquantized build keeps its head as it is: it is the reference the quantized builds are measured against.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from bot.engines.cpu.int4 import Q8_TILE, by_tile, outputs_agree, q8_runs_here, rounded_like

log = logging.getLogger(__name__)

# --- tuning constants ---
BLOCK = 32  # inputs per scale, as in Q8_0


class Int8Linear(nn.Module):
    """y = x @ W^T through ``quantbot::int8_linear``: W = code * scale, one scale per 32 inputs."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.out_features, self.in_features = self.shape()

    def shape(self) -> tuple[int, int]:
        """(out, in) features, from the codes."""
        return self.qweight.shape[0], self.qweight.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantbot.int8_linear(x, self.qweight, self.scales)


class Q8Int8Linear(Int8Linear):
    """The same W through ``quantbot::int8_linear_q8`` (AVX512-VNNI): each row of x quantized to int8 per 32 inputs,
    int32 dot products; codes + 128 in tiles of 16 outputs, scales ``[N / 16, K / 32, 16]``. On a 2-core Zen 4 the
    49152 x 576 head measured 0.85 ms a row (2.1 for our fp32 kernel) and 2.1 ms for 8 rows (5.5; bf16 6.4)."""

    EIGHT_BIT_ACTIVATIONS = True  # what it multiplies is x rounded to int8 (see int4.rounded_like)

    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0] * Q8_TILE, self.qweight.shape[1] * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantbot.int8_linear_q8(x, self.qweight, self.scales)


class HeadByWidth(nn.Module):
    """One row (a single chat's step) on `one`, several rows (a batch) on `many`: where the race found our 8-bit
    kernel faster at one width and the 16-bit matmul at the other (AMX runs bf16 matmuls of 8 rows in hardware)."""

    def __init__(self, one: nn.Module, many: nn.Module) -> None:
        super().__init__()
        self.one, self.many = one, many

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.one(x) if x.numel() == x.shape[-1] else self.many(x)


def quantize_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes int8 [N, K] and float32 scales [N, K/32]: W ~ code * scale, Q8_0's rounding."""
    n, k = weight.shape
    blocks = weight.float().reshape(n, k // BLOCK, BLOCK)
    scales = blocks.abs().amax(-1) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(blocks / scales[..., None]).clamp(-127, 127).to(torch.int8)
    return codes.reshape(n, k), scales.contiguous()


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For :class:`Int8Linear`: the codes in the kernel's lane order (per 32 inputs, lane l holds input 8p+l in
    byte p), and the scales."""
    codes, scales = quantize_blocks(weight)
    n, k = codes.shape
    lanes = codes.reshape(n, k // BLOCK, 4, 8).transpose(2, 3)  # [row, block, lane l, byte p]
    return lanes.contiguous().reshape(n, k), scales


def quantize_tiles(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For :class:`Q8Int8Linear`: codes + 128 as uint8 [N/16, K/4, 64] (byte 4l+j of chunk c: output 16t+l, input
    4c+j), and the scales by tile."""
    codes, scales = quantize_blocks(weight)
    n, k = codes.shape
    shifted = (codes.to(torch.int16) + 128).to(torch.uint8).reshape(n // Q8_TILE, Q8_TILE, k // 4, 4)
    return shifted.permute(0, 2, 1, 3).contiguous().reshape(n // Q8_TILE, k // 4, 64), by_tile(scales)


def _eight_bit(head: nn.Linear) -> nn.Module | None:
    """`head` as 8 bits on our fastest kernel for this CPU that agrees with it (checked like every int4 layer)."""
    x = torch.randn(2, head.in_features, dtype=head.weight.dtype)
    makers = [(Q8Int8Linear, quantize_tiles)] if q8_runs_here() and head.out_features % Q8_TILE == 0 else []
    for cls, quantize in [*makers, (Int8Linear, quantize_rows)]:
        try:
            twin = cls(*quantize(head.weight))
            if outputs_agree(twin(x), head(rounded_like(twin, x))):
                return twin
            log.warning("the 8-bit output head (%s) disagrees with the 16-bit one", cls.__name__)
        except RuntimeError as exc:  # a CPU the kernel refuses
            log.debug("no %s head: %s", cls.__name__, exc)
    return None


def quantize_output_head(model: nn.Module, rows: tuple[int, ...] | None = (1,)) -> bool:
    """Swap `model`'s 16-bit output head for our 8-bit one (:func:`_eight_bit`) where our kernel builds and is faster
    for the batch sizes `rows` than the 16-bit matmul (not so with AMX, which runs bf16 matmuls in hardware), or for
    :class:`HeadByWidth` where each wins at one width and the 16-bit weight is tied to the input embedding; True
    if swapped. `rows` None swaps without racing."""
    from bot.engines.cpu.int4 import race
    from bot.engines.cpu.native import kernels

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (kernels() is None or not isinstance(head, nn.Linear) or head.bias is not None
            or head.in_features % BLOCK or head.weight.device.type != "cpu"):
        return False
    with torch.inference_mode():
        int8 = _eight_bit(head)
    if int8 is None:
        return False
    if rows is not None:  # None: no race (tests of its arithmetic)
        result = race(int8, head, rows, head.weight.dtype)
        model.quantbot_head_race = result  # type: ignore[assignment]
        seconds = result["seconds"]
        ours_at = {m: seconds["ours"][m] < seconds["torch"][m] for m in rows}
        if len(set(ours_at.values())) > 1 and _tied(model, head):
            # Each width on its winner; free where the 16-bit weight stays anyway, as the input embedding.
            one, many = (int8, head) if ours_at[min(rows)] else (head, int8)
            model.set_output_embeddings(HeadByWidth(one, many))
            result["by_width"] = True
            return True
        if not result["ours_faster"]:
            log.debug("the 16-bit head is faster here: %s", result)
            return False
    model.set_output_embeddings(int8)
    return True


def _tied(model: nn.Module, head: nn.Linear) -> bool:
    """Whether the head shares its weight with the input embedding (SmolLM2 and many small models do)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight is not None and weight.data_ptr() == head.weight.data_ptr()
