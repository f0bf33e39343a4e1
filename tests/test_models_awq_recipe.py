"""The AWQ build's recipe: AWQ scales, then GPTQ rounding over every calibration sample (bot.models.awq_recipe)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from bot.errors import BotError
from bot.models import awq_recipe

GROUP = 32


def _layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear (48 out x 128 in) and correlated inputs with a few loud channels, like a transformer's."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(48, 128, generator=gen) * 0.05
    inputs = torch.randn(400, 16, generator=gen) @ torch.randn(16, 128, generator=gen)
    inputs[:, :4] *= 8
    return weight, inputs


def _nearest(weight: torch.Tensor) -> torch.Tensor:
    groups = weight.reshape(-1, GROUP)
    lo, hi = groups.amin(1, keepdim=True), groups.amax(1, keepdim=True)
    scale = (hi - lo) / 15
    zero = torch.round(-lo / scale)
    return ((torch.clamp(torch.round(groups / scale) + zero, 0, 15) - zero) * scale).reshape(weight.shape)


def test_gptq_rounding_lands_on_the_awq_grid_and_beats_round_to_nearest() -> None:
    weight, inputs = _layer()
    q, scales, zeros = awq_recipe.gptq_round(weight, inputs, bits=4, group_size=GROUP, sym=False)
    assert scales.shape == zeros.shape == (48, 128 // GROUP)
    # what an AWQ GEMM checkpoint can hold: per group, scale * (integer code in 0..15 - integer zero point)
    assert torch.equal(zeros, zeros.round()) and zeros.min() >= 0 and zeros.max() <= 15
    codes = q / scales.repeat_interleave(GROUP, 1) + zeros.repeat_interleave(GROUP, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.min() > -0.01 and codes.max() < 15.01
    error = (inputs @ (q - weight).T).norm()
    assert error < 0.8 * (inputs @ (_nearest(weight) - weight).T).norm()


class _Processor:
    """Stands in for GPTQModel 7.6's AWQProcessor: only the parts the recipe touches."""

    def __init__(self) -> None:
        self.apply_clip = True
        self.tasks: dict[str, Any] = {}
        self.qcfg = SimpleNamespace(bits=4, group_size=GROUP, sym=False)

    def _layer_input_features(self, state: Any) -> dict[str, torch.Tensor]:
        return {name: self.tasks[name]["inputs"][-1] for name in state.modules}  # GPTQModel: the last sample only

    def resolve_quant_source_module(self, module: Any) -> Any:
        return module

    def apply_quant(self, named_linears: dict[str, Any], scales_list: list[Any]) -> None:
        for module in named_linears.values():
            module.weight.data = self.pseudo_quantize_tensor(module.weight.data)[0]

    def pseudo_quantize_tensor(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _nearest(weight), torch.ones(1), torch.zeros(1)


def test_recipe_rounds_with_every_sample_divided_by_the_awq_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    from gptqmodel.looper import awq_processor

    monkeypatch.setattr(awq_processor, "AWQProcessor", _Processor)
    weight, inputs = _layer(1)
    scale = torch.linspace(0.5, 2.0, 128)
    samples = [inputs[:150, None], inputs[150:, None]]  # two samples of different lengths
    fc, other = torch.nn.Linear(128, 48, bias=False), torch.nn.Linear(128, 48, bias=False)
    fc.weight.data, other.weight.data = weight.clone(), weight.clone()
    with awq_recipe.awq_then_gptq() as stats:
        processor = _Processor()
        assert processor.apply_clip is False
        processor.tasks = {"mlp.fc": {"inputs": samples}}
        processor._layer_input_features(SimpleNamespace(modules={"mlp.fc": fc}))
        processor.apply_quant({"mlp.fc": fc, "mlp.other": other},
                              [("model.layers.0.prev", ["model.layers.0.mlp.fc"], scale, 0.0)])
    expected = awq_recipe.gptq_round(weight, inputs / scale, bits=4, group_size=GROUP, sym=False)[0]
    assert torch.allclose(fc.weight.data, expected)
    # only the last sample, or inputs not divided by the scale, give other weights
    assert not torch.allclose(expected, awq_recipe.gptq_round(weight, inputs[150:] / scale, 4, GROUP, False)[0])
    assert not torch.allclose(expected, awq_recipe.gptq_round(weight, inputs, 4, GROUP, False)[0])
    assert torch.equal(other.weight.data, _nearest(weight))  # no captured inputs: AWQ's own rounding
    assert (stats.gptq_rounded, stats.nearest_rounded) == (1, 1)
    assert _Processor().apply_clip is True  # the patch ends with the build


def test_recipe_fails_loudly_when_gptqmodel_renames_what_it_patches(monkeypatch: pytest.MonkeyPatch) -> None:
    from gptqmodel.looper import awq_processor

    class Renamed(_Processor):
        apply_quant = None  # type: ignore[assignment]

    monkeypatch.setattr(awq_processor, "AWQProcessor", Renamed)
    with pytest.raises(BotError, match="apply_quant"), awq_recipe.awq_then_gptq():
        pass


def test_a_build_that_rounds_nothing_with_gptq_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    """If GPTQModel stops capturing inputs where the recipe reads them, every linear would silently fall back to
    round-to-nearest (the 1.13x recipe): the build must stop instead."""
    from gptqmodel.looper import awq_processor

    monkeypatch.setattr(awq_processor, "AWQProcessor", _Processor)
    fc = torch.nn.Linear(128, 48, bias=False)
    with pytest.raises(BotError, match="none was rounded by GPTQ"), awq_recipe.awq_then_gptq():
        _Processor().apply_quant({"mlp.fc": fc}, [])
