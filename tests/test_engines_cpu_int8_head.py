"""The 8-bit output head: Q8_0-style codes through our kernel give the logits of the 16-bit head."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bot.engines.cpu import native
from bot.engines.cpu.int8_head import Int8Linear, quantize_output_head, quantize_rows


def q8_0_weight(rows: int, cols: int) -> torch.Tensor:
    """A weight as GGUF's Q8_0 stores it: per 32 inputs, integer codes (one of them +-127) times a scale."""
    codes = torch.randint(-127, 128, (rows, cols // 32, 32)).float()
    codes[..., 0] = 127.0
    scales = torch.rand(rows, cols // 32, 1) * 0.01 + 1e-4
    return (codes * scales).reshape(rows, cols)


@pytest.mark.parametrize("rows", [1, 3])
def test_a_q8_0_head_is_reproduced_exactly(rows: int) -> None:
    assert native.kernels() is not None, "our kernels should build wherever the setup ran"
    weight = q8_0_weight(300, 128)
    head = Int8Linear(*quantize_rows(weight))
    x = torch.randn(2, rows, 128)
    got = head(x)
    assert got.shape == (2, rows, 300) and got.dtype == torch.float32
    assert torch.allclose(got, x @ weight.t(), rtol=1e-4, atol=1e-4)
    assert head(x.bfloat16()).dtype == torch.bfloat16


class TinyLM(nn.Module):
    """Just what quantize_output_head looks at: an output head behind Transformers' accessors."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        self.lm_head.weight.data.copy_(weight)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, module: nn.Module) -> None:
        self.lm_head = module


def test_a_bf16_head_becomes_8_bit_with_the_same_predictions() -> None:
    weight = q8_0_weight(1000, 256).bfloat16()
    model = TinyLM(weight)
    x = torch.randn(16, 256, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model.lm_head(x).float()
        assert quantize_output_head(model, rows=None)
        assert isinstance(model.lm_head, Int8Linear)
        assert model.lm_head.qweight.numel() == weight.numel()  # one byte a weight instead of two
        got = model.lm_head(x).float()
    # The same predictions, but for near ties: the kernel sums in another order than bf16's matmul.
    flips = got.argmax(-1) != want.argmax(-1)
    margin = want.amax(-1) - want.gather(-1, got.argmax(-1, keepdim=True)).squeeze(-1)
    assert flips.sum() <= 1 and bool((margin[flips] <= 0.01 * want.abs().max()).all())
    assert (got - want).abs().max() < 0.01 * want.abs().max()


def test_without_our_kernels_the_head_stays_16_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(native._state, "ops", None)
    model = TinyLM(q8_0_weight(64, 64))
    assert not quantize_output_head(model, rows=None)
    assert isinstance(model.lm_head, nn.Linear)
