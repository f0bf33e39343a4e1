"""The AWQ build's recipe on GPTQModel 7.6: AWQ's activation-aware scales, then GPTQ's rounding onto them.

GPTQModel's AWQ searches per-channel scales from the calibration activations, folds them into the
previous op, then rounds each group to nearest. On this model, whose weights are already 4-bit (Q4_1),
round-to-nearest costs ~1.12x held-out perplexity. Here each scaled linear is instead rounded by GPTQ
(error compensation from the layer's input Hessian, natural group order), the AWQ-then-GPTQ recipe of
llm-compressor. The checkpoint stays a plain AWQ GEMM one: per-group scales and integer zero points.

GPTQModel has no switch for this, so `awq_then_gptq()` patches its AWQProcessor for one build:
- its clip search is turned off (it shrinks group ranges and hurts weights that sit on a 4-bit grid);
- the Hessian uses every calibration sample: GPTQModel's AWQ keeps only the *last* sample's activations
  when sample lengths differ, which is enough for its scale search but not for GPTQ;
- the group's values come from GPTQ instead of `pseudo_quantize_tensor`'s round-to-nearest.
Measured (held-out ppl ratio to the unquantized model): 1.231 with GPTQModel's defaults, 1.126 without the
clip search, 1.087 with GPTQ rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from bot.errors import BotError

log = logging.getLogger(__name__)

GPTQ_DAMP = 0.05  # GPTQ's Hessian dampening (fraction of the mean diagonal), as in the GPTQ build
PATCHED = ("__init__", "_layer_input_features", "apply_quant", "pseudo_quantize_tensor")


@dataclass
class RecipeStats:
    """How many linears were rounded by GPTQ, and how many fell back to AWQ's round-to-nearest."""

    gptq_rounded: int = 0
    nearest_rounded: int = 0


def _stale(what: str) -> BotError:
    return BotError(f"this GPTQModel's AWQ has no {what}; the AWQ recipe (bot/models/awq_recipe.py) needs updating")


def _scale_of(name: str, scales_list: list[Any]) -> Any:
    """AWQ's per-input-channel scale for linear `name` ("self_attn.q_proj"), if its group was scaled."""
    for _prev, layer_names, scales, _loss in scales_list:
        if any(n == name or n.endswith("." + name) for n in layer_names):
            return scales
    return None


def gptq_round(weight: Any, inputs: Any, bits: int, group_size: int, sym: bool,
               damp: float = GPTQ_DAMP) -> tuple[Any, Any, Any]:
    """GPTQ-quantize `weight` (out x in) for the given inputs (tokens x in): dequantized weight, scales and
    integer zero points, both (out x groups), with groups in natural column order."""
    import torch
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    config = QuantizeConfig(bits=bits, group_size=group_size, sym=sym, desc_act=False, act_group_aware=False,
                            damp_percent=damp)
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight.detach().to("cpu", torch.float32, copy=True)
    task = GPTQ(linear, config)
    task.quantizer.configure(perchannel=True)
    task.fallback = None
    task.add_batch(inputs.to("cpu", torch.float32), None)
    q, scales, zeros, g_idx, *_ = task.quantize()
    if not torch.equal(g_idx.long(), torch.arange(weight.shape[1]) // group_size):
        raise _stale("natural-order GPTQ groups")
    return q, scales.float(), zeros.float()


@contextmanager
def awq_then_gptq() -> Iterator[RecipeStats]:
    """Patch GPTQModel's AWQProcessor for the duration of one build (see the module docstring); a build in which
    no linear was rounded by GPTQ raises a BotError."""
    import torch
    from gptqmodel.looper import awq_processor

    cls = awq_processor.AWQProcessor
    missing = [name for name in PATCHED if not callable(getattr(cls, name, None))]
    if missing:
        raise _stale(", ".join(missing))
    original = {name: getattr(cls, name) for name in PATCHED}
    stats = RecipeStats()

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original["__init__"](self, *args, **kwargs)
        if not hasattr(self, "apply_clip") or not hasattr(self, "tasks"):
            raise _stale("'apply_clip' or 'tasks'")
        self.apply_clip = False

    def layer_input_features(self: Any, state: Any) -> Any:
        # Every sample's captured inputs, read before GPTQModel collapses them to one replay tensor.
        self._quantbot_inputs = {}
        for name in state.modules:
            captured = (self.tasks.get(name) or {}).get("inputs") or []
            if captured:
                self._quantbot_inputs[name] = torch.cat([t.reshape(-1, t.shape[-1]).float() for t in captured])
        return original["_layer_input_features"](self, state)

    def apply_quant(self: Any, named_linears: dict[str, Any], scales_list: list[Any]) -> None:
        inputs_by_name = getattr(self, "_quantbot_inputs", {})
        for name, module in named_linears.items():
            inputs = inputs_by_name.pop(name, None)
            self._quantbot_rounded = None
            if inputs is not None:
                scale = _scale_of(name, scales_list)
                if scale is not None:  # apply_scale divided this linear's input by AWQ's scale
                    inputs = inputs / scale.reshape(1, -1).float().to(inputs.device)
                weight = self.resolve_quant_source_module(module).weight.data
                self._quantbot_rounded = gptq_round(weight, inputs, self.qcfg.bits, self.qcfg.group_size,
                                                    self.qcfg.sym)
            try:
                original["apply_quant"](self, {name: module}, scales_list)
            finally:
                self._quantbot_rounded = None

    def pseudo_quantize_tensor(self: Any, weight: Any) -> Any:
        rounded = getattr(self, "_quantbot_rounded", None)
        if rounded is None:
            stats.nearest_rounded += 1
            return original["pseudo_quantize_tensor"](self, weight)
        stats.gptq_rounded += 1
        return tuple(t.to(device=weight.device, dtype=weight.dtype) for t in rounded)

    patches = {"__init__": init, "_layer_input_features": layer_input_features, "apply_quant": apply_quant,
               "pseudo_quantize_tensor": pseudo_quantize_tensor}
    for name, patch in patches.items():
        setattr(cls, name, patch)
    try:
        yield stats
    finally:
        for name, method in original.items():
            setattr(cls, name, method)
    log.info("AWQ build: %d linears rounded by GPTQ, %d by round-to-nearest", stats.gptq_rounded,
             stats.nearest_rounded)
    if not stats.gptq_rounded:  # GPTQModel's internals moved: the build would be another, worse recipe
        raise _stale("captured inputs for any linear (none was rounded by GPTQ)")
