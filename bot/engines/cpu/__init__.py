"""What a quantized model runs on in the CPU, behind two calls for the engine.

- :func:`prepare_model`: int4 layers repacked onto the faster of our kernel and torch's (:mod:`.int4`, raced at
  load), long prompts through an unpacked bf16 weight where that is faster, the 16-bit output head as 8-bit where
  that is faster (:mod:`.int8_head`); our kernels in :mod:`.native`.
- :func:`use_decode_attention` / :func:`undo_decode_attention`: the plain one-query attention a compiled decode
  step fuses (:mod:`.decode_attention`), and back to SDPA when compiling failed.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def prepare_model(model: Any, native: bool = True, max_batch: int = 1) -> None:
    """Repack a quantized model's int4 layers and head for CPU decoding; unquantized models are left as they are.
    Kernels race at one row and at `max_batch` rows: single chats and full batches both count."""
    from bot.engines.cpu.int4 import choose_dense_rows, streamline
    from bot.engines.cpu.int8_head import quantize_output_head

    rows = (1, max_batch) if max_batch > 1 else (1,)
    swapped = streamline(model, native=native, rows=rows)
    head = swapped > 0 and native and quantize_output_head(model, rows)
    dense = choose_dense_rows(model, model.dtype) if native else None
    log.debug("%d int4 layers repacked for the CPU; 8-bit output head: %s; prompts unpacked from %s rows",
              swapped, head, dense)


def use_decode_attention(model: Any) -> None:
    """Give an SDPA model the one-query attention that inductor fuses (prompts still go to SDPA)."""
    from bot.engines.cpu import decode_attention

    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(decode_attention.register())


def undo_decode_attention(model: Any) -> None:
    """Back to SDPA (decoding eagerly after a failed compile: the plain math only pays off compiled)."""
    from bot.engines.cpu.decode_attention import NAME

    if model.config._attn_implementation == NAME:
        model.set_attn_implementation("sdpa")
