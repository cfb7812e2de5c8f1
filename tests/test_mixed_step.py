"""Mixed steps (`ort-fused` artifacts): a decode batch and a joining prompt's chunk in one pass over the
weights give exactly what a decode step and a separate prefill give, and the scheduler uses them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from llmpack.runtime import manifest as names
from llmpack.runtime.artifact import open_artifact, open_backend
from llmpack.runtime.backends import fused_interface as fused
from llmpack.runtime.batch_scheduler import MIXED_STEP_SHARE, PrefillPacer
from llmpack.runtime.engine import Engine, EngineOptions
from llmpack.runtime.errors import BackendError
from llmpack.runtime.serve.protocol import parse_request

PROMPTS = [[1, 5, 9, 13, 17, 21, 25], [1, 40, 41], [1, 7, 8, 9, 10], [1, 3]]
JOINER = [1] + list(range(50, 61))  # 12 tokens


def _backend(path, max_batch=4, mixed_steps=True):
    return open_backend(open_artifact(path), "cpu", threads=1, max_batch=max_batch, mixed_steps=mixed_steps)


def test_mixed_graph_shares_the_weights_file_and_declares_the_chunk_inputs(fused_tiny):
    artifact = open_artifact(fused_tiny)
    assert fused.MIXED_MODEL_FILE in {f.path for f in artifact.manifest.files}  # hashed like the others
    model = onnx.load(str(fused_tiny / fused.MIXED_MODEL_FILE), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {names.WEIGHTS_FILE}  # no second copy of the weights on disk
    inputs = {i.name for i in model.graph.input}
    assert {fused.CHUNK_IDS, fused.CHUNK_SEQLENS_K, fused.chunk_name(names.past_key_name(0))} <= inputs
    assert sum(n.op_type == "GroupQueryAttention" for n in model.graph.node) == 2 * artifact.manifest.config.num_layers


@pytest.mark.parametrize("which", ["fused_tiny", "fused_stories"])
@pytest.mark.parametrize("chunk_slot", [3, 1], ids=["chunk-after-decode-rows", "chunk-among-decode-rows"])
def test_mixed_step_equals_decode_then_prefill(request, which, chunk_slot):
    path = request.getfixturevalue(which)
    decoding = [s for s in range(4) if s != chunk_slot]
    mixed, separate = _backend(path), _backend(path, mixed_steps=False)
    assert mixed.can_mix and not separate.can_mix
    # two sessions taking turns: neither may leave its threads spinning on the cores the other needs
    for session in (mixed.session, mixed.mixed_session):
        assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    for backend in (mixed, separate):
        for slot in decoding:
            backend.prefill(slot, PROMPTS[slot])
        backend.prefill(chunk_slot, JOINER[:4])  # a prompt already partly read
    for step, chunk in enumerate((JOINER[4:8], JOINER[8:])):  # the same shape twice: a cached binding
        tokens = [30 + step + s for s in decoding]
        got_rows, got_chunk = mixed.decode_and_prefill(decoding, tokens, chunk_slot, chunk)
        want_rows = separate.decode(decoding, tokens)
        want_chunk = separate.prefill(chunk_slot, chunk)
        np.testing.assert_allclose(got_rows, want_rows, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got_chunk, want_chunk, rtol=1e-4, atol=1e-4)
    assert [mixed.cached_tokens(s) for s in range(4)] == [separate.cached_tokens(s) for s in range(4)]
    # Every cache row holds what separate steps wrote: the next batched step, joiner included, agrees.
    every = list(range(4))
    np.testing.assert_allclose(mixed.decode(every, [44] * 4), separate.decode(every, [44] * 4), rtol=1e-4, atol=1e-4)


def test_mixed_step_refuses_what_it_cannot_do(fused_tiny):
    backend = _backend(fused_tiny)
    backend.prefill(0, PROMPTS[0])
    with pytest.raises(BackendError, match="not decoding"):
        backend.decode_and_prefill([0], [5], 0, [1, 2])
    with pytest.raises(BackendError, match="not prefilled"):
        backend.decode_and_prefill([2], [5], 1, [1, 2])
    with pytest.raises(BackendError, match="exceeds the artifact's context"):
        backend.decode_and_prefill([0], [5], 1, [1] * 65)
    assert not _backend(fused_tiny, max_batch=1).can_mix  # nothing to mix with: no second session
    with pytest.raises(BackendError, match="no mixed-step graph"):
        _backend(fused_tiny, mixed_steps=False).decode_and_prefill([0], [5], 1, [1, 2])


def test_pacer_sizes_a_mixed_chunk_by_what_a_token_adds_to_the_decode_step():
    pacer = PrefillPacer(chunk=128, mixed=True)
    pacer.observe_prefill(128, 0.200)  # a separate prefill's cost says nothing about a mixed chunk
    assert pacer.seconds_per_token is None and pacer.budget(decoding=6) == 16
    pacer.observe_mixed(6, 16, 0.060)  # no decode step of 6 rows measured yet: nothing learnt
    assert pacer.seconds_per_token is None
    pacer.observe_decode(6, 0.040)
    # a step with a chunk costs the decode step + 1.2 ms per chunk token (no second pass over the weights)
    for _ in range(30):
        tokens = pacer.budget(decoding=6)
        pacer.observe_mixed(6, tokens, 0.040 + 0.0012 * tokens)
    assert abs(pacer.budget(decoding=6) - int(MIXED_STEP_SHARE * 0.040 / 0.0012)) <= 1
    pacer.observe_mixed(6, 8, 0.030)  # faster than a decode step (noise): the estimate stays positive
    assert 4 <= pacer.budget(decoding=6) <= 128


def test_concurrent_requests_on_a_mixing_engine_equal_served_alone(fused_stories):
    engine = Engine.load(fused_stories, EngineOptions(max_batch=4, prefill_chunk=8))
    backend = engine.backend
    calls = []
    original = backend.decode_and_prefill
    backend.decode_and_prefill = lambda *args: calls.append(len(args[3])) or original(*args)
    bodies = [{"prompt": f"Once upon a time, {who} went to the park and", "raw": True, "max_tokens": 24,
               "temperature": 0} for who in ("Tom", "Lily", "a big dog", "Sam and Mia", "the bird", "Sue")]
    alone = [engine.complete(parse_request(body)).text for body in bodies]
    calls.clear()
    # All queued at once (a stream is submitted when it is made): while the first decodes, the next
    # prompts are read, and the scheduler reads them inside its decode steps.
    streams = [engine.stream_request(parse_request(body)) for body in bodies]
    together = ["".join(stream) for stream in streams]
    assert together == alone
    assert calls, "no prompt was read inside a decode step"
    engine.close()


def test_without_memory_for_the_second_session_it_serves_without_mixing(fused_tiny, monkeypatch, caplog):
    from llmpack.runtime.backends import ort_cpu as ort_backend

    answers = iter([1 << 40, 1])  # room for the decode session, none left for the mixed one
    monkeypatch.setattr(ort_backend, "available_memory", lambda: next(answers))
    backend = _backend(fused_tiny)
    assert not backend.can_mix
    assert "serving without mixed steps" in caplog.text and "GiB are available" in caplog.text
    backend.prefill(0, PROMPTS[0])
    assert backend.decode([0], [5]).shape == (1, backend.vocab_size)
