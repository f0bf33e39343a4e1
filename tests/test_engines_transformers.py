"""The Transformers engine on the real GPTQ and AWQ builds: answers, streaming, limits, cancel, errors."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bot.config import ModelProfile, Settings
from bot.engines import CancelToken, ChatMessage, EngineError, GenerationParams, StreamStats, create_engine
from bot.engines.transformers_engine import IncrementalDecoder, TransformersEngine
from bot.models.prepare import prepare
from tests.models_fixture import on_the_subject, shared_models_dir

SHARED_BUILDS = shared_models_dir()
GREEDY = GenerationParams(max_new_tokens=64, temperature=0.0, repetition_penalty=1.1)
FRANCE = [ChatMessage("system", "You are a helpful, concise assistant."),
          ChatMessage("user", "What is the capital of France?")]


def settings_for(models_dir: Path, **values: object) -> Settings:
    return Settings(models_dir=models_dir, _env_file=None, **values)  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=["smollm2-gptq", "smollm2-awq"])
def engine(request: pytest.FixtureRequest) -> Iterator[TransformersEngine]:
    prepare(SHARED_BUILDS, [request.param.split("-")[1]])
    settings = settings_for(SHARED_BUILDS, torch_compile="auto")  # what a CPU user gets: a compiled decode step
    eng = create_engine(settings.profiles[request.param], settings)
    assert isinstance(eng, TransformersEngine)
    eng.load()
    assert eng.compiled
    yield eng
    eng.unload()
    assert not eng.loaded


@pytest.mark.slow
def test_answers_a_simple_question(engine: TransformersEngine) -> None:
    stats = StreamStats()
    budget = GenerationParams(max_new_tokens=160, temperature=0.0, repetition_penalty=1.1)
    reply = "".join(engine.stream_chat(FRANCE, budget, CancelToken(), stats))
    assert on_the_subject(reply), reply
    # The repetition penalty spares the template's <|im_end|>, so the model can end its turn. Whether one given
    # greedy reply of a 135M model ends within the budget is a near-tie of rounding (builds made on different
    # machines, and the kernels of different CPUs, differ: one AWQ build on 8-bit activations talks on in French
    # about Paris for 160 tokens), so the guarantee is asked of four questions: most replies end by themselves.
    ended = [stats.finish_reason == "stop"]
    for question in ("Name three primary colors.", "What is 2 + 2?", "Who wrote Romeo and Juliet?"):
        other = StreamStats()
        "".join(engine.stream_chat([FRANCE[0], ChatMessage("user", question)], budget, CancelToken(), other))
        ended.append(other.finish_reason == "stop" and other.completion_tokens < budget.max_new_tokens)
    assert sum(ended) >= 3, ended


@pytest.mark.slow
def test_decodes_on_the_faster_cpu_kernels(engine: TransformersEngine) -> None:
    """On the CPU every 4-bit projection runs on the int4 kernel that won the race at load (ours or torch's, by
    CPU), and the output head on our int8 kernel where that won too (at one width, or at all)."""
    from bot.engines.cpu.int4 import NativeInt4Linear, PackedInt4Linear
    from bot.engines.cpu.int8_head import HeadByWidth, Int8Linear

    model = engine.model
    winner = NativeInt4Linear if model.quantbot_int4_race["ours_faster"] else PackedInt4Linear
    layers = [m for m in model.modules() if isinstance(m, (NativeInt4Linear, PackedInt4Linear))]
    assert len(layers) == 4 * model.config.num_hidden_layers  # q/k/v fused, o, gate/up fused, down
    assert all(isinstance(m, winner) for m in layers)
    race = getattr(model, "quantbot_head_race", {"ours_faster": False})
    want = HeadByWidth if race.get("by_width") else Int8Linear if race["ours_faster"] else torch.nn.Linear
    assert isinstance(model.get_output_embeddings(), want)  # (Int8Linear: also its VNNI kind, Q8Int8Linear)
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)  # the (tied) embedding is untouched


@pytest.mark.slow
def test_streamed_deltas_add_up_to_the_whole_reply(engine: TransformersEngine) -> None:
    stats = StreamStats()
    deltas = list(engine.stream_chat(FRANCE, GREEDY, CancelToken(), stats))
    assert len(deltas) > 1 and all(deltas)
    assert "".join(deltas) == engine.chat(FRANCE, GREEDY)
    assert stats.prompt_tokens == engine.count_tokens(FRANCE)
    assert 0 < stats.completion_tokens <= GREEDY.max_new_tokens
    # a reply cut by the token limit says so; one that ended by itself says "stop"
    assert stats.finish_reason == ("length" if stats.completion_tokens == GREEDY.max_new_tokens else "stop")
    assert stats.first_token_s is not None and stats.total_s >= stats.first_token_s


@pytest.mark.slow
def test_stops_at_max_new_tokens(engine: TransformersEngine) -> None:
    stats = StreamStats()
    story = [ChatMessage("user", "Tell me a long story about a dragon.")]
    text = "".join(engine.stream_chat(story, GenerationParams(max_new_tokens=5, temperature=0.0),
                                      CancelToken(), stats))
    assert stats.completion_tokens == 5 and stats.finish_reason == "length"
    assert text.strip()


@pytest.mark.slow
def test_cancel_stops_the_reply_early(engine: TransformersEngine) -> None:
    cancel, stats = CancelToken(), StreamStats()
    story = [ChatMessage("user", "Tell me a long story about a dragon.")]
    received = []
    for delta in engine.stream_chat(story, GenerationParams(max_new_tokens=200, temperature=0.0), cancel, stats):
        received.append(delta)
        if len(received) == 3:
            cancel.cancel()
    assert len(received) == 3
    assert stats.finish_reason == "cancelled" and stats.completion_tokens < 10
    # the engine is free for the next reply right away
    assert on_the_subject(engine.chat(FRANCE, GREEDY))


@pytest.mark.slow
def test_same_seed_gives_the_same_sampled_reply(engine: TransformersEngine) -> None:
    params = GenerationParams(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
    poem = [ChatMessage("user", "Write a poem about the sea.")]
    assert engine.chat(poem, params) == engine.chat(poem, params)


@pytest.mark.slow
def test_prompt_token_count_includes_the_chat_template(engine: TransformersEngine) -> None:
    short = engine.count_tokens([ChatMessage("user", "Hi")])
    longer = engine.count_tokens([ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello! How can I help?"),
                                  ChatMessage("user", "Tell me a joke.")])
    assert short >= 5  # <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n at least
    assert longer > short + 10
    assert engine.context_length >= 2048


@pytest.mark.slow
def test_conversation_longer_than_the_context_is_refused_politely() -> None:
    prepare(SHARED_BUILDS, ["gptq"])
    settings = settings_for(SHARED_BUILDS)
    profile = settings.profiles["smollm2-gptq"].model_copy(update={"context_length": 16})
    eng = create_engine(profile, settings)
    eng.load()
    try:
        with pytest.raises(EngineError, match="too long .*use /reset"):
            list(eng.stream_chat(FRANCE, GREEDY, CancelToken()))
    finally:
        eng.unload()


@pytest.mark.slow
def test_a_failing_compiler_falls_back_to_eager_decoding(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """No C++ compiler (a slim container), an op inductor cannot lower: the model still loads and answers, and its
    load line says how long the load took and where the time went (an eager warm-up, not a compile)."""
    import torch

    def broken_compile(fn: object, **kwargs: object) -> object:
        def compiled(*args: object, **kw: object) -> object:
            raise RuntimeError("InductorError: CppCompileError: C++ compile error")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    prepare(SHARED_BUILDS, ["gptq"])
    settings = settings_for(SHARED_BUILDS, torch_compile="on")
    eng = create_engine(settings.profiles["smollm2-gptq"], settings)
    with caplog.at_level("INFO", logger="bot.engines.transformers_engine"):
        eng.load()
    try:
        assert eng.loaded and not eng.compiled
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded smollm2-gptq"))
        total, phases = re.search(r" in ([\d.]+) s \((.*)\)$", line).groups()  # type: ignore[union-attr]
        seconds = dict((name, float(value)) for name, value in (p.rsplit(" ", 1) for p in phases.split(", ")))
        assert list(seconds) == ["weights", "kernels", "warm-up"], line
        assert abs(sum(seconds.values()) - float(total)) <= 0.2 and float(total) > 0, line
        assert eng.model.config._attn_implementation == "sdpa"  # the compile-only attention is undone too
        assert on_the_subject(eng.chat(FRANCE, GREEDY))
    finally:
        eng.unload()


def test_missing_model_files_explain_how_to_build_them(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    eng = create_engine(settings.profiles["smollm2-awq"], settings)
    with pytest.raises(EngineError, match="not found at .*python -m bot models prepare"):
        eng.load()
    assert not eng.loaded
    with pytest.raises(EngineError, match="not loaded"):
        list(eng.stream_chat(FRANCE, GREEDY, CancelToken()))


def test_corrupt_checkpoint_is_a_clear_load_error(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{ this is not json")
    profile = ModelProfile(name="broken", format="gptq", path="broken")
    eng = create_engine(profile, settings_for(tmp_path))
    with pytest.raises(EngineError, match="could not be loaded"):
        eng.load()


@pytest.mark.slow
def test_incremental_decoding_never_splits_characters() -> None:
    from transformers import AutoTokenizer

    build = prepare(SHARED_BUILDS, ["hf"])[0].path
    tokenizer = AutoTokenizer.from_pretrained(build)
    text = "Café déjà vu 🌊🐉 naïve 日本語のテキスト — done."
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    deltas.append(decoder.flush())
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def _double_plus_one(*, x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def test_a_decode_step_no_compiled_graph_fits_still_runs() -> None:
    """After the warm-up the step checks only the guards that tell its graphs apart; an input none of them fits
    (another dtype, another rank) compiles a new graph instead of failing the reply or running a wrong one."""
    from bot.engines.transformers_engine import checking_fewer_guards

    step = checking_fewer_guards(torch.compile(_double_plus_one, backend="eager", dynamic=True))
    assert step(x=torch.ones(3)).tolist() == [3.0, 3.0, 3.0]
    assert step(x=torch.ones(5)).tolist() == [3.0] * 5
    assert step(x=torch.ones(2, 2, dtype=torch.int64)).tolist() == [[3, 3], [3, 3]]
