"""Generation: greedy == transformers generate, streamed == non-streamed, limits, seeds, flat memory."""

from __future__ import annotations

import numpy as np
import pytest

from llmpack.runtime.engine import Engine, EngineOptions
from llmpack.runtime.errors import InputTooLong
from llmpack.runtime.generate import FINISH_LENGTH, FINISH_STOP
from llmpack.runtime.sampling import SamplingParams
from llmpack.runtime.serve.protocol import ENGINE_LIMITS, parse_request

GREEDY = SamplingParams(temperature=0)
STORY_PROMPTS = ["Once upon a time", "Tom and Lily went to the park. They saw", "The little dog said: \"Olé!\" and"]


@pytest.fixture(scope="module")
def stories_engine(stories_artifact):
    return Engine.load(stories_artifact, EngineOptions(**ENGINE_LIMITS))


@pytest.fixture(scope="module")
def demo_engine(demo_artifact):
    return Engine.load(demo_artifact, EngineOptions(**ENGINE_LIMITS))  # as llm-serve runs it


@pytest.fixture(scope="module")
def reference_model(stories_dir):
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(stories_dir), dtype=torch.float32).eval()


def _hf_greedy(model, ids: list[int], max_new: int, stop_ids) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False, eos_token_id=list(stop_ids), pad_token_id=0)
    tokens = out[0, len(ids):].tolist()
    return tokens[: next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))]


@pytest.mark.parametrize("prompt", STORY_PROMPTS)
def test_stories_greedy_equals_transformers_generate(stories_engine, reference_model, prompt):
    request = parse_request({"prompt": prompt, "raw": True, "temperature": 0, "max_tokens": 300})
    ids = stories_engine.request_ids(request)
    ours = list(stories_engine.generate_ids(ids, 300, GREEDY))
    reference = _hf_greedy(reference_model, ids, 300, stories_engine.stop_ids)
    assert ours == reference
    completion = stories_engine.complete(request)
    assert completion.text == stories_engine.tokenizer.decode(reference)
    assert completion.usage.completion_tokens == len(reference)
    assert completion.finish_reason == (FINISH_STOP if len(reference) < 300 else FINISH_LENGTH)


def test_stories_story_ends_on_bos_stop_id(stories_engine):
    completion = stories_engine.complete(parse_request({"prompt": "One day", "raw": True, "temperature": 0}))
    assert completion.finish_reason == FINISH_STOP and 0 < completion.usage.completion_tokens < 256


@pytest.mark.parametrize("engine_name", ["stories_engine", "demo_engine"])
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 7, "top_k": 40, "top_p": 0.95}])
def test_streamed_equals_non_streamed(request, engine_name, sampling):
    engine = request.getfixturevalue(engine_name)
    body = {"prompt": "Ben had a red café ☕ and", "raw": True, "max_tokens": 120, **sampling}
    pieces = list(engine.stream_request(parse_request({**body, "stream": True})))
    whole = engine.complete(parse_request(body)).text
    assert "".join(pieces) == whole and len(pieces) > 1
    assert all(piece for piece in pieces)


def test_same_seed_same_text_other_seed_other_text(stories_engine):
    body = {"prompt": "Once upon a time", "raw": True, "temperature": 1.2, "max_tokens": 60}
    first = stories_engine.complete(parse_request({**body, "seed": 11})).text
    assert first == stories_engine.complete(parse_request({**body, "seed": 11})).text
    assert first != stories_engine.complete(parse_request({**body, "seed": 12})).text


def test_prompt_over_input_limit_is_refused_with_counts(demo_engine):
    long_prompt = "漢字" * 500  # byte fallback: three tokens per character
    request = parse_request({"prompt": long_prompt, "raw": True})
    with pytest.raises(InputTooLong, match=r"prompt is \d+ tokens, the limit is 2500"):
        demo_engine.request_ids(request)


def test_small_context_artifact_limits_input(stories_engine):
    request = parse_request({"prompt": "the " * 600, "raw": True})
    with pytest.raises(InputTooLong, match="the limit is 511"):
        stories_engine.request_ids(request)


def test_generation_stops_at_the_context_limit(demo_engine):
    ids = [1] + [5] * 2399
    stream = demo_engine.generate_ids(ids, 5000, GREEDY, stop_ids=())
    generated = list(stream)
    assert len(generated) == 3072 - 2400 and stream.finish_reason == FINISH_LENGTH


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


def _rss_growth(engine, start: int, end: int) -> int:
    params, samples = SamplingParams(temperature=0.8, seed=3), {}
    for count, _ in enumerate(engine.generate_ids([1, 5, 6], end, params, stop_ids=()), start=1):
        if count in (start, end):
            samples[count] = _rss_bytes()
    return samples[end] - samples[start]


def test_decode_keeps_memory_flat_over_3000_tokens(demo_artifact):
    """A cold run may only grow by about the KV cache; after it, 3000 decode steps must not grow RSS.

    With ONNX Runtime's memory-pattern planner on, the cold run grew 22 MiB (the KV cache is 1.5 MiB).
    """
    engine = Engine.load(demo_artifact)
    cold = _rss_growth(engine, 500, 3000)
    warm = _rss_growth(engine, 100, 3000)
    assert cold < 12 * 2**20, f"RSS grew {cold / 2**20:.1f} MiB over 2500 cold decode steps"
    assert warm < 2 * 2**20, f"RSS grew {warm / 2**20:.1f} MiB over 2900 decode steps after warm-up"


def test_backend_reset_after_generation(demo_engine):
    list(demo_engine.generate_ids([1, 5, 6], 5, GREEDY, stop_ids=()))
    assert all(demo_engine.backend.cached_tokens(slot) == 0 for slot in range(demo_engine.backend.max_batch))


def test_system_prompt_default_override_and_off(demo_artifact):
    request = parse_request({"prompt": "hi"})
    default = Engine.load(demo_artifact).request_ids(request)
    custom = Engine.load(demo_artifact, EngineOptions(system_prompt="Be brief.")).request_ids(request)
    off = Engine.load(demo_artifact, EngineOptions(system_prompt="")).request_ids(request)
    assert len(default) > len(custom) > len(off)
    assert np.array_equal(off[-3:], default[-3:])


def test_artifact_too_big_for_memory_is_refused_before_loading(demo_artifact, monkeypatch):
    from llmpack.runtime.backends import ort_cpu as ort_backend
    from llmpack.runtime.errors import ArtifactError

    monkeypatch.setattr(ort_backend, "available_memory", lambda: 1000)
    with pytest.raises(ArtifactError, match=r"needs about .* GiB, 0.0 GiB are available"):
        Engine.load(demo_artifact)


def test_the_engine_enforces_the_limits_it_is_given_and_by_default_what_the_backend_holds(demo_artifact):
    request = parse_request({"prompt": "漢字" * 1000, "raw": True})  # byte fallback: ~6000 tokens in 2000 characters
    bare = Engine.load(demo_artifact)  # no API in front: the backend's context, one token left for the answer
    assert (bare.context_limit, bare.input_limit) == (3072, 3071)
    with pytest.raises(InputTooLong, match="the limit is 3071"):
        bare.request_ids(request)
    tight = Engine.load(demo_artifact, EngineOptions(context_limit=64, input_limit=16))
    with pytest.raises(InputTooLong, match="the limit is 16"):
        tight.request_ids(request)
    tokens = list(tight.generate_ids([1] + [5] * 15, 500, GREEDY, stop_ids=()))
    assert len(tokens) == 64 - 16  # the answer stops where the given context ends, not the backend's
