"""Our checkpoints as the tutorial's reader loads them: stock Transformers, no quantbot code in the loop.

The tutorial's flow is `from_pretrained(path, torch_dtype="auto", device_map="auto")`, the tokenizer's chat
template, a `TextStreamer` and `model.generate(input_ids=..., max_length=200, streamer=...)` with nothing else:
whatever the build's generation_config.json says decides how it decodes. Every correct build must then answer the
question and end its turn by itself (greedy defaults, <|im_end|> as the end of a turn).
"""

from __future__ import annotations

import pytest
import torch

from bot.models.prepare import build_path, prepare
from tests.models_fixture import shared_models_dir

SHARED_BUILDS = shared_models_dir()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hf", "gptq", "awq"])
def test_the_tutorials_stock_flow_answers_and_ends_its_turn(kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    prepare(SHARED_BUILDS, [kind])
    path = build_path(SHARED_BUILDS, kind)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype="auto", device_map="auto")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                              return_dict=True)["input_ids"].to(model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    capsys.readouterr()
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, max_length=200, streamer=streamer)
    new = output[0, input_ids.shape[1]:].tolist()
    answer = tokenizer.decode(new, skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert new[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>"), answer  # the turn ended, not max_length
    assert capsys.readouterr().out.strip() == answer.strip()  # and it streamed what it answered
    # the defaults written into the build: greedy, ending at the template's end of turn
    assert model.generation_config.do_sample is False
