"""`python -m bot models eval`: perplexity of each build on held-out text, as a ratio to the unquantized build.

The reference ("hf") is the SmolLM2 Q4_1 GGUF de-quantized to float32, so the GGUF build should score
almost exactly 1.0 (same weights, different runtime) and GPTQ/AWQ show what re-quantizing costs.
Every build is scored on the same token ids (the hf tokenizer's), in non-overlapping windows, and on the CPU
through the same kernels the engine decodes with (so the 8-bit output head is part of the score).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.errors import BotError
from bot.models.prepare import BUILD_DIRS, build_path
from bot.models.recipes import SOURCE_FILE, data_text

if TYPE_CHECKING:
    from bot.config import Settings

# --- tuning constants ---
WINDOW = 512  # tokens per scored window
HELDOUT_FILE = "heldout.txt"
RESULTS_FILE = "eval.json"  # written into MODELS_DIR


@dataclass(frozen=True)
class EvalResult:
    build: str
    perplexity: float
    ratio: float  # perplexity / reference perplexity
    tokens: int


def heldout_ids(models_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    ref = build_path(models_dir, "hf")
    if not (ref / "tokenizer.json").is_file():
        raise BotError(f"the unquantized reference build is missing at {ref}; "
                       "run `python -m bot models prepare --only hf`")
    tokenizer = AutoTokenizer.from_pretrained(ref)
    return list(tokenizer(data_text(HELDOUT_FILE), add_special_tokens=False)["input_ids"])


def _windows(ids: list[int]) -> list[list[int]]:
    return [ids[i:i + WINDOW] for i in range(0, len(ids), WINDOW) if len(ids[i:i + WINDOW]) > 1]


def transformers_nll(path: Path, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of `ids` (each window's first token unscored) and the scored count."""
    import torch
    from transformers import AutoModelForCausalLM

    device_map = "auto" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, dtype="auto").eval()
    if model.device.type == "cpu":  # measure what the engine runs: our CPU kernels, the 8-bit head
        from bot.engines import cpu

        cpu.prepare_model(model)
    total, count = 0.0, 0
    with torch.inference_mode():
        for window in _windows(ids):
            x = torch.tensor([window], device=model.device)
            logits = model(input_ids=x).logits[0, :-1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            total -= logprobs.gather(1, x[0, 1:, None]).sum().item()
            count += len(window) - 1
    del model
    return total, count


def gguf_nll(path: Path, ids: list[int]) -> tuple[float, int]:
    import llama_cpp
    import numpy as np

    llama = llama_cpp.Llama(model_path=str(path), n_ctx=WINDOW, n_batch=WINDOW, logits_all=True,
                            n_gpu_layers=-1 if llama_cpp.llama_supports_gpu_offload() else 0, verbose=False)
    total, count = 0.0, 0
    try:
        for window in _windows(ids):
            llama.reset()
            llama.eval(window)
            logits = np.asarray(llama.scores[: len(window) - 1], dtype=np.float64)
            logits -= logits.max(axis=1, keepdims=True)
            logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            total -= float(logprobs[np.arange(len(window) - 1), window[1:]].sum())
            count += len(window) - 1
    finally:
        llama.close()
    return total, count


def evaluate(models_dir: Path, builds: list[str] | None = None) -> list[EvalResult]:
    """Perplexity of every present build (the hf reference first) on the held-out text."""
    models_dir = Path(models_dir).expanduser()
    ids = heldout_ids(models_dir)
    scores: dict[str, tuple[float, int]] = {}
    for build in builds or list(BUILD_DIRS):
        path = build_path(models_dir, build)
        if build == "gguf":
            if (path / SOURCE_FILE).is_file():
                scores[build] = gguf_nll(path / SOURCE_FILE, ids)
        elif (path / "config.json").is_file():
            scores[build] = transformers_nll(path, ids)
    if "hf" not in scores:
        raise BotError("the unquantized reference build is missing; run `python -m bot models prepare --only hf`")
    ref_ppl = math.exp(scores["hf"][0] / scores["hf"][1])
    results = []
    for build, (nll, n) in scores.items():
        ppl = math.exp(nll / n)
        results.append(EvalResult(build, ppl, ppl / ref_ppl, n))
    return results


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    results = evaluate(settings.models_dir)
    print(f"{'build':6} {'perplexity':>10} {'ratio':>7} {'tokens':>7}")
    for r in results:
        print(f"{r.build:6} {r.perplexity:10.3f} {r.ratio:7.3f} {r.tokens:7d}")
    out = Path(settings.models_dir).expanduser() / RESULTS_FILE
    payload: dict[str, Any] = {"heldout": HELDOUT_FILE, "window": WINDOW, "reference": "hf",
                               "results": [asdict(r) for r in results]}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwritten to {out}")
    return 0
