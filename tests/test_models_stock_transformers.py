"""Our checkpoints as the tutorial's reader loads them: stock Transformers, no quantbot code in the loop.

The tutorial's flow is `from_pretrained(path, torch_dtype="auto", device_map="auto")`, the tokenizer's chat
template, a `TextStreamer` and `model.generate(input_ids=..., max_length=200, streamer=...)` with nothing else:
whatever the build's generation_config.json says decides how it decodes. GPTQModel's save wrote "do_sample": true
there, so that flow sampled at temperature 1 and rambled. Every correct build now decodes greedily (the same
answer twice) and stops at the template's end of turn. Which words a 135M model picks is not guaranteed: on five
phrasings of the capital-of-France question the unquantized reference answers "Paris" on three, the GPTQ build on
two, the AWQ build on one, each greedily; so the answer is checked for staying on the subject, not for a word.
"""

from __future__ import annotations

import pytest
import torch

from bot.models.prepare import build_path, prepare
from tests.models_fixture import on_the_subject, shared_models_dir

SHARED_BUILDS = shared_models_dir()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hf", "gptq", "awq"])
def test_the_tutorials_stock_flow_decodes_greedily_and_streams(kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    prepare(SHARED_BUILDS, [kind])
    path = build_path(SHARED_BUILDS, kind)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype="auto", device_map="auto")
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                              return_dict=True)["input_ids"].to(model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    capsys.readouterr()
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, max_length=200, streamer=streamer)
        again = model.generate(input_ids=input_ids, max_length=200)
    new = output[0, input_ids.shape[1]:].tolist()
    answer = tokenizer.decode(new, skip_special_tokens=True)
    # the defaults the build carries: greedy, ending at the template's end of turn
    assert model.generation_config.do_sample is False and model.generation_config.eos_token_id == end_of_turn
    assert torch.equal(output, again), "the stock flow must not sample"
    assert on_the_subject(answer), answer
    assert new[-1] == end_of_turn or output.shape[1] == 200, answer  # it stops at its end of turn or at max_length
    assert capsys.readouterr().out.strip() == answer.strip()  # and it streamed what it answered
