"""The 8-bit output head: Q8_0-style codes through our kernel give the logits of the 16-bit head."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bot.engines.cpu import native
from bot.engines.cpu.int4 import q8_runs_here
from bot.engines.cpu.int8_head import Int8Linear, Q8Int8Linear, quantize_output_head, quantize_rows, quantize_tiles
from tests.test_engines_cpu_int4 import q8_activations


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


@pytest.mark.skipif(not q8_runs_here(), reason="the 8-bit-activation kernel needs AVX512-VNNI")
@pytest.mark.parametrize("rows", [1, 8, 11])
def test_the_vnni_head_computes_the_q8_0_head_on_8_bit_activations(rows: int) -> None:
    """quantbot::int8_linear_q8 equals the Q8_0 weight times each row rounded to int8 per 32 inputs (as llama.cpp
    multiplies), and a row's logits do not depend on the other rows of the batch."""
    assert native.kernels() is not None
    torch.manual_seed(rows)
    weight = q8_0_weight(320, 128)
    head = Q8Int8Linear(*quantize_tiles(weight))
    assert (head.out_features, head.in_features) == (320, 128)
    x = torch.randn(rows, 128)
    got = head(x)
    want = q8_activations(x) @ weight.t()
    assert got.shape == (rows, 320) and torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert torch.equal(got[-1:], head(x[-1:]))
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


class TiedLM(TinyLM):
    """A model whose head shares its weight with the input embedding (as SmolLM2's does)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(weight)
        self.embed = nn.Embedding(weight.shape[0], weight.shape[1], dtype=weight.dtype)
        self.embed.weight = self.lm_head.weight

    def get_input_embeddings(self) -> nn.Module:
        return self.embed


def race_won_at(one_row: bool):  # type: ignore[no-untyped-def]
    """A stand-in for the kernel race: ours faster at one row only (or at batches only)."""
    def race(ours: nn.Module, theirs: nn.Module, rows: tuple[int, ...], dtype: torch.dtype) -> dict:
        fast, slow = 1.0, 2.0
        ours_s = {m: (fast if (m == 1) == one_row else slow) for m in rows}
        torch_s = {m: 1.5 for m in rows}
        return {"ours_faster": sum(ours_s.values()) < sum(torch_s.values()),
                "seconds": {"ours": ours_s, "torch": torch_s}}
    return race


@pytest.mark.parametrize("one_row", [True, False])
def test_a_tied_head_runs_each_width_on_the_kernel_that_won_it(monkeypatch: pytest.MonkeyPatch,
                                                               one_row: bool) -> None:
    """Our 8-bit kernel for one chat and the 16-bit matmul for batches (or the other way round), when the race
    splits so and the 16-bit weight stays anyway as the input embedding."""
    from bot.engines.cpu import int4
    from bot.engines.cpu.int8_head import HeadByWidth
    from bot.engines.kernel_report import LoadFacts, inspect_modules

    monkeypatch.setattr(int4, "race", race_won_at(one_row))
    weight = q8_0_weight(256, 128).bfloat16()
    model = TiedLM(weight)
    with torch.inference_mode():
        assert quantize_output_head(model, rows=(1, 8))
        head = model.lm_head
        assert isinstance(head, HeadByWidth)
        chosen = head.one if one_row else head.many
        assert isinstance(chosen, Int8Linear)  # (or its VNNI kind, Q8Int8Linear), made afresh here to compare
        eight_bit = type(chosen)(*(quantize_tiles if isinstance(chosen, Q8Int8Linear) else quantize_rows)(weight))
        sixteen_bit = nn.functional.linear
        one, batch = torch.randn(1, 1, 128).bfloat16(), torch.randn(4, 1, 128).bfloat16()
        if one_row:
            assert torch.equal(head(one), eight_bit(one)) and torch.equal(head(batch), sixteen_bit(batch, weight))
        else:
            assert torch.equal(head(one), sixteen_bit(one, weight)) and torch.equal(head(batch), eight_bit(batch))
    report = inspect_modules("tiny", "GPTQ 4-bit", model.modules(), LoadFacts(device="cpu", compiled=True))
    assert ("8-bit head for one chat" if one_row else "8-bit head for batches") in report.extras


def test_an_untied_head_takes_the_winner_over_both_widths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeping both heads would cost memory when the 16-bit weight is not needed elsewhere: one head for all."""
    from bot.engines.cpu import int4

    monkeypatch.setattr(int4, "race", race_won_at(one_row=True))  # ours 1.0 + 2.0 against torch's 1.5 + 1.5
    model = TinyLM(q8_0_weight(256, 128).bfloat16())
    assert not quantize_output_head(model, rows=(1, 8))  # a tie over both widths: the 16-bit head stays
    assert isinstance(model.lm_head, nn.Linear)
