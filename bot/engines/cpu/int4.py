"""Leaner CPU decoding of GPTQ/AWQ layers: fewer, cheaper int4 matmuls than GPTQModel's own CPU layers.

GPTQModel's CPU layers (``TorchAtenLinear``, ``TorchAtenAwqLinear``) repack their weights for
``aten._weight_int4pack_mm_for_cpu`` on first use and then, on every call, check their mode and gather the
input columns by ``g_idx`` even when that gather is the identity (no act-order). Decoding one token on a
small model makes about two hundred such calls, so the per-call extras are a visible share of the time.

:func:`streamline` repacks every such layer up front, swaps in :class:`PackedInt4Linear` (one kernel call,
a gather only where ``g_idx`` really permutes), and lets siblings that read the same input (q/k/v, gate/up)
run as one wider matmul. Where our own kernels build (:mod:`bot.engines.cpu.native`), the packed layers then race
:class:`Q8Int4Linear` at load where the CPU has AVX512-VNNI or AVX2 (8-bit activations, integer dot products),
:class:`NativeInt4Linear` elsewhere (fp32).
Each swap is checked against the original layer's output on a random input; a layer that does not match, or a
GPTQModel version whose internals differ, is left as it was.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# --- tuning constants ---
LAYER_CLASSES = ("TorchAtenLinear", "TorchAtenAwqLinear")  # GPTQModel's CPU int4 layers we know the insides of
# Siblings reading one input, computed as one matmul (the first one named runs first in the model). On our kernel
# fusing gate/up saves ~5% of the decode time; on torch's it measured no faster.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
CHECK_TOLERANCE = 2e-2  # relative max error allowed against the original layer (bf16 outputs)
NATIVE_BLOCK = 64  # inputs per packed block of our kernel (groups: 32 or multiples of 64)
Q8_TILE, Q8_BLOCK = 16, 32  # outputs per tile of the 8-bit-activation kernel; inputs per activation scale
TIMING_ROUNDS, TIMING_CALLS = 3, 8  # the kernel race at load: best of 3 rounds of 8 calls per batch size
# ... or fewer, once a candidate has taken this long: without bf16 hardware an unpacked weight's bf16 matmul took
# 57 ms a call at 16 rows and 1.7 s at 512, and 25 calls of each probe made an (emulated) AVX2 host's every load 86 s
# longer
TIMING_BUDGET_S = 0.25
# Prompt sizes (rows) at which unpacking a weight to bf16 for one matmul races torch's int4 kernel at load; measured
# here the unpacking wins from 24-32 rows (245 rows: 0.9 against 5.6 ms on a 576 x 3072 layer).
# The 8-bit-activation kernel keeps pace with the unpacking far longer (measured 1.4 against 1.7 ms at 128 rows, 6.6
# against 5.2 at 512; since the kernel's VNNI work it wins at every size on a Zen 4, 4.7 against 8.0 ms at 512),
# hence the larger sizes.
DENSE_PROBE_ROWS = (16, 32, 64, 128, 256, 512)
DENSE_MARGIN = 0.85  # ... where it is clearly faster: near the crossover a 35-token prompt measured 10% slower
# The probes stop where the unpacking is this many times further behind than an int4 time growing in proportion to
# the rows could make up by the last size: the int4 time grew up to 1.45x faster than that (2.9x from 256 to 512
# rows), and without bf16 hardware the unpacking was 115-190x behind at every size
DENSE_HOPELESS = 4.0


class PackedInt4Linear(nn.Module):
    """y = x @ W^T for a 4-bit weight packed for ``aten._weight_int4pack_mm_for_cpu`` (bf16 activations)."""

    def __init__(self, qweight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, in_features: int,
                 out_features: int, perm: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.group_size, self.in_features, self.out_features = group_size, in_features, out_features
        self.dense_from: int | None = None  # rows from which a call unpacks the weight instead (see dense_weight)

    def dense_weight(self) -> torch.Tensor:
        """The bf16 weight, [in, out]: made afresh for each long prompt (never kept, so memory stays 4-bit).
        torch's int4 kernel unpacks the weight again for every four input rows, so for a prompt of hundreds of
        tokens unpacking once and one bf16 matmul is several times faster (see :func:`choose_dense_rows`)."""
        from bot.engines.cpu.native import kernels

        ops = kernels()
        assert ops is not None
        return ops.int4pack_weight(self.qweight, self.scales_and_zeros, self.group_size, torch_int4_block())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1] + (self.out_features,)
        flat = x.reshape(-1, self.in_features)
        if self.perm is not None:
            flat = flat.index_select(1, self.perm)
        if not torch.compiler.is_compiling() and self.dense_from is not None and flat.shape[0] >= self.dense_from:
            out = (flat.to(torch.bfloat16) @ self.dense_weight()).to(x.dtype)  # a prompt: one bf16 matmul
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(torch.bfloat16), self.qweight, self.group_size,
                                                             self.scales_and_zeros).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(shape)


class NativeInt4Linear(nn.Module):
    """y = x @ W^T through ``quantbot::int4_linear``: W = code * scale + offset per group, codes nibble-packed in
    the layout of ``bot/engines/native/lowbit_linear.cpp``."""

    GROUP_TERM = "offsets"  # the name of the per-group term added to code * scale

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int,
                 perm: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer(self.GROUP_TERM, offsets, persistent=False)
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.group_size = group_size
        self.in_features, self.out_features = self.shape()

    def shape(self) -> tuple[int, int]:
        """(in, out) features, from the packed weight."""
        return self.qweight.shape[1] * 2, self.qweight.shape[0]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantbot.int4_linear(x, self.qweight, self.scales, self.offsets, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        out = self.matmul(x)
        return out + self.bias if self.bias is not None else out


class Q8Int4Linear(NativeInt4Linear):
    """The same W through ``quantbot::int4_linear_q8`` (AVX512-VNNI, or AVX2): each row of x is quantized to int8
    with a scale per 32 inputs, as llama.cpp does, and multiplied in integers denser than in fp32; codes in
    tiles of 16 outputs. Its per-group terms are torch's own, bf16 scales and zeros ``[N / 16, groups, 16]`` with
    W = (code - 8) * scale + zero, so both kernels hold the same W to the bit in as many bytes (an offset rounded to
    bf16 moved outputs by up to 3% of their peak on the real builds) (``native/q8_linear.cpp``). 8 rows measured
    ~2x faster than torch's int4 kernel on a 2-core Zen 4, and one row a little faster; on an AVX2-only EPYC (quiet,
    120 layers), 8 rows ~1.9x torch's and ~1.7x our fp32 kernel, one row ~1.5x the fp32 one."""

    GROUP_TERM = "zeros"
    EIGHT_BIT_ACTIVATIONS = True  # what it multiplies is x rounded to int8 (see rounded_like)
    dense_from: int | None = None  # rows from which a call unpacks the weight instead, as PackedInt4Linear does

    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[1] * 8, self.qweight.shape[0] * Q8_TILE

    def dense_weight(self) -> torch.Tensor:
        """The bf16 weight, [in, out], made afresh for a long prompt (hundreds of rows: one bf16 matmul wins)."""
        return torch.ops.quantbot.int4_q8_weight(self.qweight, self.scales, self.zeros, self.group_size)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if (not torch.compiler.is_compiling() and self.dense_from is not None
                and x.numel() >= self.dense_from * self.in_features):
            return (x.to(torch.bfloat16) @ self.dense_weight()).to(x.dtype)
        return torch.ops.quantbot.int4_linear_q8(x, self.qweight, self.scales, self.zeros, self.group_size)


OUR_INT4_LAYERS = (NativeInt4Linear, Q8Int4Linear)


@functools.cache
def torch_int4_block() -> int:
    """How many outputs torch's CPU int4 packing puts in one block (64 with AVX-512, 32 with AVX2), read from the
    packing of a probe weight whose codes count up every 16 outputs: byte 0 holds output 0 and output block / 2."""
    codes = (torch.arange(128, dtype=torch.int32) // 16).unsqueeze(1).expand(128, 64).contiguous()
    first = int(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1).flatten()[0])
    return 32 * (first >> 4)


def q8_runs_here() -> bool:
    """Whether this CPU has AVX512-VNNI, which the 8-bit-activation head needs (its codes overflow AVX2's)."""
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(probe and probe())


def q8_int4_runs_here() -> bool:
    """Whether the 8-bit-activation int4 kernel runs here: AVX512-VNNI, or AVX2 (VPMADDUBSW, as llama.cpp)."""
    from bot.engines.cpu.native import cpu_capability

    return q8_runs_here() or cpu_capability()[1]


def tile_pack(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 of shape [N, K] as uint8 [N/16, K/8, 64]: byte 4l+j of chunk c holds output 16t+l's input 8c+j
    in its low nibble and input 8c+4+j in its high one."""
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n // Q8_TILE, Q8_TILE, k // 8, 2, 4)  # [tile, lane l, chunk, half, j]
    pairs = c[:, :, :, 0, :] | (c[:, :, :, 1, :] << 4)
    return pairs.permute(0, 2, 1, 3).contiguous().reshape(n // Q8_TILE, k // 8, 64)


def by_tile(values: torch.Tensor) -> torch.Tensor:
    """Per-output values [N, G] as [N/16, G, 16], so a tile's 16 outputs read one contiguous run per group."""
    n, g = values.shape
    return values.reshape(n // Q8_TILE, Q8_TILE, g).transpose(1, 2).contiguous()


def nibble_pack(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 of shape [N, K] as uint8 [N, K/2]: per 64 inputs, 32-bit lane l holds input 8p+l in nibble p."""
    n, k = codes.shape
    blocks = codes.to(torch.int32).reshape(n, k // NATIVE_BLOCK, 8, 8)  # [row, block, nibble p, lane l]
    lanes = blocks[:, :, 0, :].clone()
    for p in range(1, 8):
        lanes |= blocks[:, :, p, :] << (4 * p)
    return lanes.contiguous().view(torch.uint8).reshape(n, k // 2)


def _codes(packed: PackedInt4Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The very weights torch's kernel uses, read back through it: codes uint8 [N, K], scales and offsets
    float32 [N, groups] with W = code * scale + offset."""
    groups = packed.in_features // packed.group_size
    # torch's kernel computes W = (code - 8) * scale + zero: with scale 1 and zero 8, times the identity, it
    # hands back the codes themselves in whatever order it packed them.
    unit = torch.tensor([1.0, 8.0], dtype=torch.bfloat16).expand(groups, packed.out_features, 2).contiguous()
    eye = torch.eye(packed.in_features, dtype=torch.bfloat16)
    codes = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed.qweight, packed.group_size, unit)
    scales = packed.scales_and_zeros[..., 0].float()
    offsets = packed.scales_and_zeros[..., 1].float() - 8 * scales
    return codes.t().round().to(torch.uint8), scales.t().contiguous(), offsets.t().contiguous()


def _native(packed: PackedInt4Linear) -> NativeInt4Linear:
    """The twin of `packed` on our fp32 kernel."""
    if (packed.group_size != 32 and packed.group_size % NATIVE_BLOCK) or packed.in_features % NATIVE_BLOCK:
        raise ValueError(f"our kernel takes groups of 32 or a multiple of {NATIVE_BLOCK} inputs, "
                         f"not {packed.group_size} of {packed.in_features}")
    codes, scales, offsets = _codes(packed)
    return NativeInt4Linear(nibble_pack(codes), scales, offsets, packed.group_size, packed.perm, packed.bias)


def _q8(packed: PackedInt4Linear) -> Q8Int4Linear:
    """The twin of `packed` on our 8-bit-activation kernel."""
    if packed.group_size % Q8_BLOCK or packed.out_features % Q8_TILE:
        raise ValueError(f"the q8 kernel takes groups of a multiple of {Q8_BLOCK} inputs and a multiple of "
                         f"{Q8_TILE} outputs, not {packed.group_size} and {packed.out_features}")
    codes, _, _ = _codes(packed)
    scales, zeros = (packed.scales_and_zeros[..., i].t().contiguous() for i in (0, 1))  # [N, groups] bf16 each
    return Q8Int4Linear(tile_pack(codes), by_tile(scales), by_tile(zeros), packed.group_size, packed.perm,
                        packed.bias)


def call_seconds(layer: nn.Module, rows: int, dtype: torch.dtype) -> float:
    """How long one call of `layer` takes for `rows` input rows here (best of a few rounds, within a time budget)."""
    import time

    x = torch.randn(rows, int(layer.in_features), dtype=dtype)
    best = float("inf")
    with torch.inference_mode():
        layer(x)
        deadline = time.perf_counter() + TIMING_BUDGET_S
        for _ in range(TIMING_ROUNDS):
            start = time.perf_counter()
            for calls in range(1, TIMING_CALLS + 1):
                layer(x)
                if time.perf_counter() > deadline:  # a slow candidate: one call says enough
                    break
            best = min(best, (time.perf_counter() - start) / calls)
            if time.perf_counter() > deadline:
                break
    return best


def race(ours: nn.Module, theirs: nn.Module, rows: tuple[int, ...], dtype: torch.dtype) -> dict[str, Any]:
    """Time our layer against torch's for each batch size in `rows`; ours wins when it is faster over them all.

    Which is faster depends on the CPU: on AVX2 ours runs one-token matmuls 1.3-1.5x faster, on a CPU with
    AVX-512/AMX torch's kernel wins (measured 14 against 25 ms a decode step on a 2-core Xeon)."""
    times = {"ours": {m: call_seconds(ours, m, dtype) for m in rows},
             "torch": {m: call_seconds(theirs, m, dtype) for m in rows}}
    return {"ours_faster": sum(times["ours"].values()) < sum(times["torch"].values()), "seconds": times}


def _on_native_kernel(packed: PackedInt4Linear, dtype: torch.dtype, native: bool = True) -> nn.Module:
    """`packed` moved to our kernel where it builds and agrees with torch's (and `native` allows it): the
    8-bit-activation one where the CPU has VNNI or AVX2, the fp32 one otherwise; `packed` itself if neither serves."""
    from bot.engines.cpu.native import kernels

    if not native or kernels() is None:
        return packed
    for twin_of in (_q8, _native) if q8_int4_runs_here() else (_native,):
        try:
            twin = twin_of(packed)
            if _matches(twin, packed, dtype):
                return twin
            log.warning("our int4 kernel (%s) disagrees with torch's on a layer", type(twin).__name__)
        except Exception as exc:  # noqa: BLE001 - an unusual layout: torch's kernel still works
            log.debug("not moving a layer to %s: %s", twin_of.__name__, exc)
    return packed


class SharedInputHead(nn.Module):
    """Stands in for the first of several projections of one input: computes all of them in one call and
    keeps the others' slices for the :class:`SharedInputTail` modules that replaced them."""

    def __init__(self, fused: nn.Module, sizes: list[int]) -> None:
        super().__init__()
        self.fused, self.sizes = fused, sizes
        self.in_features, self.out_features = fused.in_features, sizes[0]
        self.pending: list[Any] = []  # [input, slice 1, slice 2, ...] until the tails have taken theirs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(torch.split(self.fused(x), self.sizes, dim=-1))
        self.pending = [x, *parts[1:]]
        return parts[0]

    def take(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Slice `index` of the fused output for input `x` (recomputed when called with another input)."""
        if not self.pending or self.pending[0] is not x or self.pending[index] is None:
            return torch.split(self.fused(x), self.sizes, dim=-1)[index]
        part = self.pending[index]
        self.pending[index] = None
        if all(p is None for p in self.pending[1:]):
            self.pending = []  # nothing of this step stays referenced (a long prompt's activations are large)
        return part


class SharedInputTail(nn.Module):
    """Stands in for a later projection of the same input: returns its slice of the head's fused result."""

    def __init__(self, head: SharedInputHead, index: int) -> None:
        super().__init__()
        self.head = [head]  # in a list: not a registered submodule (the head is already its parent's child)
        self.index = index
        self.in_features, self.out_features = head.in_features, head.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head[0].take(self.index, x)


def _packed(layer: nn.Module) -> PackedInt4Linear:
    """The repacked twin of one GPTQModel CPU layer."""
    if getattr(layer, "linear_mode", None) is None:
        layer.transform("cpu")  # what the layer does itself on its first call
        layer.linear_mode = "inference"
    perm = getattr(layer, "ret_idx", None)
    if perm is not None:
        if torch.equal(perm.cpu(), torch.arange(perm.numel(), dtype=perm.dtype)):
            perm = None
        else:
            perm = perm.to(torch.long)
    bias = layer.bias if isinstance(getattr(layer, "bias", None), torch.Tensor) else None
    if getattr(layer, "adapter", None):
        raise ValueError("layer has an adapter")
    return PackedInt4Linear(layer.qweight, layer.scales_and_zeros, int(layer.group_size), int(layer.in_features),
                            int(layer.out_features), perm, bias)


def _fuse(parts: list[PackedInt4Linear]) -> PackedInt4Linear:
    """One matmul for several weights over the same input (int4 packs are row-major in the output dim)."""
    first = parts[0]
    if any(p.group_size != first.group_size or p.in_features != first.in_features or p.bias is not None
           or (p.perm is None) != (first.perm is None) or (p.perm is not None and not torch.equal(p.perm, first.perm))
           for p in parts):
        raise ValueError("projections differ in layout")
    return PackedInt4Linear(torch.cat([p.qweight for p in parts], 0),
                            torch.cat([p.scales_and_zeros for p in parts], 1).contiguous(), first.group_size,
                            first.in_features, sum(p.out_features for p in parts), first.perm)


def _matches(new: nn.Module, old: nn.Module, dtype: torch.dtype) -> bool:
    """Whether `new` computes what `old` does on a random input: on the same activations (the 8-bit-activation
    kernels' rounded ones, for them), so the check is of the weights' layout, within bf16's rounding."""
    x = torch.randn(3, int(old.in_features), dtype=dtype)
    with torch.inference_mode():
        return outputs_agree(new(x), old(rounded_like(new, x)))


def rounded_like(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`x` as `layer` multiplies it: rounded to int8 per 32 inputs (times max |x| / 127) for the kernels on 8-bit
    activations, as it is otherwise. On real weights with outlier columns that rounding alone moves a random
    input's outputs by up to ~3% of their peak, past a check meant to catch a wrong layout (2%)."""
    if not getattr(layer, "EIGHT_BIT_ACTIVATIONS", False):
        return x
    blocks = x.float().reshape(*x.shape[:-1], -1, Q8_BLOCK)
    peak = blocks.abs().amax(-1, keepdim=True)
    codes = torch.round(blocks * torch.where(peak > 0, 127 / peak, torch.zeros_like(peak)))  # as the kernel rounds
    return (codes * (peak / 127)).reshape(x.shape).to(x.dtype)


def streamline(model: nn.Module, native: bool = True, rows: tuple[int, ...] | None = (1,)) -> int:
    """Swap every GPTQModel CPU int4 layer of `model` for the lean equivalent; returns how many were swapped.
    `native` False keeps torch's int4 kernel even where ours builds (QUANTBOT_CPU_KERNELS=off). Otherwise the
    first fused layer races both kernels at the batch sizes `rows` and the faster one serves every layer; the
    race is kept in ``model.quantbot_int4_race`` (the kernel report names the winner). `rows` None: ours wherever
    it builds, no race (tests of its arithmetic)."""
    dtype = getattr(model, "dtype", torch.bfloat16)
    decided: list[bool] = []  # [ours faster], once raced

    def place(packed: PackedInt4Linear) -> nn.Module:
        if not native:
            return packed
        if rows is None:
            return _on_native_kernel(packed, dtype)
        if not decided:
            candidate = _on_native_kernel(packed, dtype)
            if candidate is packed:
                return packed  # our kernel does not serve this layer: race on the next one
            result = race(candidate, packed, rows, dtype)
            model.quantbot_int4_race = result  # type: ignore[assignment]
            decided.append(bool(result["ours_faster"]))
            log.debug("int4 kernel race: %s", result)
            return candidate if decided[0] else packed
        return _on_native_kernel(packed, dtype) if decided[0] else packed

    swapped = 0
    parents = [m for m in model.modules() if any(type(c).__name__ in LAYER_CLASSES for c in m.children())]
    for parent in parents:
        children = dict(parent.named_children())
        done: set[str] = set()
        for group in FUSED_GROUPS:
            if not all(type(children.get(n)).__name__ in LAYER_CLASSES for n in group):
                continue
            try:
                packed = [_packed(children[n]) for n in group]
                head = SharedInputHead(_fuse(packed), [p.out_features for p in packed])
                tails = [SharedInputTail(head, i) for i in range(1, len(group))]
                x = torch.randn(3, head.in_features, dtype=dtype)
                with torch.inference_mode():  # the head runs first, as in the model; the tails take its slices
                    if not all(outputs_agree(new(x), children[n](x)) for new, n in zip([head, *tails], group)):
                        continue
                head.fused = place(head.fused)
            except Exception as exc:  # noqa: BLE001 - unknown internals: keep GPTQModel's own layers
                log.debug("not fusing %s: %s", group, exc)
                continue
            setattr(parent, group[0], head)
            for name, tail in zip(group[1:], tails):
                setattr(parent, name, tail)
            done.update(group)
            swapped += len(group)
        for name, child in children.items():
            if name in done or type(child).__name__ not in LAYER_CLASSES:
                continue
            try:
                lean = _packed(child)
                if not _matches(lean, child, dtype):
                    continue
                lean = place(lean)
            except Exception as exc:  # noqa: BLE001
                log.debug("not repacking %s: %s", name, exc)
                continue
            setattr(parent, name, lean)
            swapped += 1
    return swapped


def choose_dense_rows(model: nn.Module, dtype: torch.dtype) -> int | None:
    """From how many input rows (prompt tokens x prompts) the model's int4 layers on torch's kernel (or on our q8 one)
    unpack their weight to bf16 for one matmul: the fewest of :data:`DENSE_PROBE_ROWS` at which that clearly beats
    their int4 kernel on the model's widest layer, timed here at load (the larger sizes skipped where the unpacking
    is hopelessly behind); every layer then follows it. None: never, or
    our kernels did not build, or the unpacked weight disagrees with the int4 kernel. Prompts only: a compiled decode
    step never takes it. Kept in ``model.quantbot_dense_prompts``."""
    from bot.engines.cpu.native import kernels

    layers = [m for m in model.modules() if isinstance(m, (PackedInt4Linear, Q8Int4Linear))]
    if not layers or kernels() is None:
        return None
    widest = max(layers, key=lambda m: m.in_features * m.out_features)
    x = torch.randn(DENSE_PROBE_ROWS[0], widest.in_features, dtype=dtype)
    try:
        with torch.inference_mode():
            agree = outputs_agree((rounded_like(widest, x).to(torch.bfloat16) @ widest.dense_weight()).to(dtype),
                                  widest(x))
    except Exception as exc:  # noqa: BLE001 - a layout our unpacking does not know: prompts stay on int4
        log.debug("not unpacking int4 weights for prompts: %s", exc)
        return None
    if not agree:
        log.warning("unpacked int4 weights disagree with torch's kernel; prompts stay on the int4 kernel")
        return None
    seconds: dict[str, dict[int, float]] = {"int4": {}, "dense": {}}
    chosen = None
    for rows in DENSE_PROBE_ROWS:
        seconds["int4"][rows] = call_seconds(widest, rows, dtype)
        widest.dense_from = rows
        seconds["dense"][rows] = call_seconds(widest, rows, dtype)
        widest.dense_from = None
        if seconds["dense"][rows] < DENSE_MARGIN * seconds["int4"][rows]:
            chosen = rows
            break
        if seconds["dense"][rows] > DENSE_HOPELESS * DENSE_MARGIN * seconds["int4"][rows] * DENSE_PROBE_ROWS[-1] / rows:
            break  # hopeless (DENSE_HOPELESS): the larger sizes would only cost the load seconds
    for layer in layers:
        layer.dense_from = chosen
    model.quantbot_dense_prompts = {"from_rows": chosen, "seconds": seconds}  # type: ignore[assignment]
    log.debug("int4 prompts unpacked from %s rows: %s", chosen, seconds)
    return chosen


def outputs_agree(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether a swapped-in layer's output is within CHECK_TOLERANCE of the original's (relative to its peak)."""
    got, want = got.float(), want.float()
    return bool(((want - got).abs().max() <= CHECK_TOLERANCE * want.abs().max().clamp_min(1e-6)).item())
