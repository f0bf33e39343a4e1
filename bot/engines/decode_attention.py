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


def decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Same contract as Transformers' ``sdpa_attention_forward``: returns (batch, q_len, heads, head_dim)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if query.shape[2] != 1 or dropout or any(kwargs.get(k) is not None for k in UNSUPPORTED):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make :data:`NAME` a valid ``attn_implementation`` (masks as for SDPA); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
