"""Attention for compiled one-token decode steps: the plain matmul-softmax-matmul, which torch.compile fuses.

For a single query, SDPA's CPU flash kernel spends about 110 us per layer on set-up: a tenth of the
decode time of a 30-layer model on two cores. Written out, the same math compiles into a few small
fused loops. Prompts (many queries at once) still go to SDPA, which never builds the full score matrix.
Used only where the engine compiles its decode step on CPU; GPUs keep the model's own attention.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "quantbot_decode"  # the name registered with Transformers' attention and mask interfaces
UNSUPPORTED = ("softcap", "s_aux", "position_bias")  # variants the plain math does not cover: left to SDPA
_native: list[bool] = []  # [our decode_attention op runs here], decided once at register()
_bf16_matmuls: list[bool] = []  # [the CPU multiplies bf16 in hardware (AVX512-BF16, AMX)], decided at register()


def decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Same contract as Transformers' ``sdpa_attention_forward``: returns (batch, q_len, heads, head_dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    per_head_mask = attention_mask is not None and attention_mask.shape[1] != 1
    if query.shape[2] != 1 or dropout or per_head_mask or any(kwargs.get(k) is not None for k in UNSUPPORTED):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # Grouped-query attention without repeat_kv: the query heads that share a key/value head each meet it once,
    # instead of copying the cache once per query head (3x the cache, every step, on SmolLM2).
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    mask = None if attention_mask is None else attention_mask[..., : key.shape[-2]]  # [batch, 1, 1, length]
    if _native and _native[0] and _fits_native(query, key, value, mask):
        # Our op (native/decode_attention.cpp): one call a layer, each cached key and value read once for the
        # query heads that share it; two bf16 matmuls of a few rows cost ~75 us each in set-up alone.
        out = torch.ops.quantbot.decode_attention(query, key, value, mask, scale)
        return out, None
    if batch == 1 or not (_bf16_matmuls and _bf16_matmuls[0]):
        # One chat: both products as broadcast multiply-and-sum in fp32, which inductor turns into one loop over
        # the cache each: a one-row step took 12-14 ms instead of 16-18 with two bf16 matmuls of 3 rows. At 8 rows
        # the loops cost what the matmuls do (a batch-8 step ~32 ms either way), so batches keep the matmuls, but
        # only where the CPU has bf16 arithmetic: on AVX2 a layer's two bf16 matmuls for 8 rows of 200 tokens took
        # 1.6 ms (48 ms of an 80 ms step), the same in fp32 0.34 ms.
        grouped = query.view(batch, kv_heads, groups, 1, dim).float()
        scores = (grouped * key[:, :, None].float()).sum(-1) * scale  # [batch, kv_heads, groups, length]
        probs = torch.softmax(_masked(scores, mask), dim=-1)
        out = (probs[..., None] * value[:, :, None].float()).sum(-2).to(value.dtype)
    else:
        grouped = query.view(batch, kv_heads, groups, dim)
        scores = torch.matmul(grouped, key.transpose(2, 3)) * scale
        probs = torch.softmax(_masked(scores, mask), dim=-1, dtype=torch.float32).to(value.dtype)
        out = torch.matmul(probs, value)  # [batch, kv_heads, groups, dim]
    return out.view(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def _fits_native(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """What our op takes: one dtype (bf16 or fp32), a contiguous cache, no mask or a bool one, heads of 16k up to
    256 wide, at most 8 query heads a key/value head (native/decode_attention.cpp); other models keep the math."""
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[-1]
    return (query.dtype == key.dtype == value.dtype and key.dtype in (torch.bfloat16, torch.float32)
            and key.is_contiguous() and value.is_contiguous() and dim % 16 == 0 and dim <= 256
            and kv_heads > 0 and heads % kv_heads == 0 and heads // kv_heads <= 8
            and (mask is None or mask.dtype == torch.bool))


def use_native(enabled: bool | None = None) -> bool:
    """Whether decode steps take our attention op: where it builds and the CPU has AVX-512 (`enabled` None), or
    as told (tests compare both)."""
    from bot.engines.cpu.native import kernels

    probe = getattr(torch.cpu, "_is_avx512_supported", None)
    enabled = kernels() is not None and (bool(probe and probe()) if enabled is None else enabled)
    _native[:] = [enabled]
    return enabled


def use_bf16_matmuls(enabled: bool | None = None) -> bool:
    """Whether batched steps without our op keep bf16 matmuls: where the CPU has AVX512-BF16 or AMX (`enabled`
    None), or as told (tests compare both); elsewhere fp32 loops, as for one row."""
    if enabled is None:
        enabled = any(bool(getattr(torch.cpu, probe, lambda: False)())
                      for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    _bf16_matmuls[:] = [enabled]
    return enabled


def _masked(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scores with the masked columns out (a bool mask, the same for every head) or the float mask added."""
    if mask is None:
        return scores
    return scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask


def register() -> str:
    """Make :data:`NAME` a valid ``attn_implementation`` (masks as for SDPA); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    if not _native:
        use_native()
    if not _bf16_matmuls:
        use_bf16_matmuls()
    return NAME
