"""Runtime, `--graph ort-fused`: parity with PyTorch, batched decode == single-sequence decode, in-place cache."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from llmpack.export.verify import verify
from llmpack.runtime import manifest as names
from llmpack.runtime.artifact import open_artifact, open_backend
from llmpack.runtime.backends import ort_fused as ort_fused_backend
from llmpack.runtime.backends.ort_fused import OrtFusedBackend
from llmpack.runtime.errors import BackendError


def _backend(path, max_batch=4) -> OrtFusedBackend:
    backend = open_backend(open_artifact(path), "cpu", threads=1, max_batch=max_batch)
    assert isinstance(backend, OrtFusedBackend)
    return backend


@pytest.mark.parametrize("which", ["fused_stories", "fused_tiny"])
def test_fused_artifact_passes_fp32_verify(request, which):
    report = verify(request.getfixturevalue(which))
    assert report.ok, report.table()


def test_fused_graph_uses_the_fused_operators(fused_stories):
    model = onnx.load(str(fused_stories / names.MODEL_FILE), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"} <= ops
    assert "Concat" not in ops and "Softmax" not in ops  # no cache concatenation, attention is fused
    assert open_artifact(fused_stories).manifest.graph_flavour == "ort-fused"


def _alone(path, prompt: list[int], steps: int) -> list[np.ndarray]:
    backend = _backend(path, max_batch=1)
    logits = [backend.prefill(0, prompt)]
    for _ in range(steps):
        logits.append(backend.decode([0], [int(np.argmax(logits[-1]))])[0])
    return logits


def test_batched_decode_equals_single_sequence_decode(fused_tiny):
    prompts = {0: [1, 5, 9, 13, 17, 21, 25], 2: [1, 40, 41]}  # different lengths; slot 1 stays idle
    steps = 6
    expected = {slot: _alone(fused_tiny, prompt, steps) for slot, prompt in prompts.items()}
    backend = _backend(fused_tiny)
    last = {slot: backend.prefill(slot, prompt) for slot, prompt in prompts.items()}
    for step in range(steps):
        slots = list(prompts)
        for slot in slots:
            np.testing.assert_allclose(last[slot], expected[slot][step], rtol=1e-4, atol=1e-4)
        rows = backend.decode(slots, [int(np.argmax(last[s])) for s in slots])
        last = dict(zip(slots, rows))
    assert backend.cached_tokens(0) == 7 + steps and backend.cached_tokens(1) == 0


def test_chunked_prefill_and_cache_growth_match_one_pass(fused_tiny, monkeypatch):
    monkeypatch.setattr(ort_fused_backend, "MIN_CAPACITY", 4)  # force several in-place growths
    prompt = [1] + list(range(30, 60))
    whole = _backend(fused_tiny, 1).prefill(0, prompt)
    backend = _backend(fused_tiny, 2)
    backend.prefill(1, prompt[:5])
    backend.prefill(1, prompt[5:11])
    chunked = backend.prefill(1, prompt[11:])
    np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-4)
    assert backend.cache.capacity >= len(prompt) + 1 and backend.cache.rows == 2


def test_reset_slot_starts_over_and_limits_are_enforced(fused_tiny):
    backend = _backend(fused_tiny, 3)
    first = backend.prefill(0, [1, 2, 3])
    backend.decode([0], [4])
    backend.reset(0)
    np.testing.assert_allclose(backend.prefill(0, [1, 2, 3]), first, rtol=1e-5, atol=1e-5)
    with pytest.raises(BackendError, match="not prefilled"):
        backend.decode([1], [5])
    with pytest.raises(BackendError, match="exceeds the artifact's context"):
        backend.prefill(1, list(range(65)))
    backend.prefill(1, list(range(64)))  # exactly full: as an idle row its dummy goes to the spare position
    backend.prefill(2, [1, 2, 3])
    np.testing.assert_allclose(backend.decode([2], [4])[0], _alone(fused_tiny, [1, 2, 3, 4], 0)[0], rtol=1e-4, atol=1e-4)


def test_a_join_reuses_the_cache_and_a_growth_keeps_every_used_row(fused_tiny, monkeypatch):
    monkeypatch.setattr(ort_fused_backend, "MIN_CAPACITY", 8)
    backend = _backend(fused_tiny, 4)
    first = backend.prefill(0, [1, 5, 9])
    buffers = list(backend.cache.buffers)
    backend.prefill(3, [1, 7])  # a request joins in the last row: no reallocation, no copy
    assert all(a is b for a, b in zip(buffers, backend.cache.buffers))
    backend.prefill(1, [1] + list(range(30, 50)))  # past the capacity: one growth for all rows
    assert backend.cache.capacity >= 22 and backend.cache.rows == 4
    expected = _alone(fused_tiny, [1, 5, 9], 1)
    np.testing.assert_allclose(first, expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(backend.decode([0], [int(np.argmax(first))])[0], expected[1], rtol=1e-4, atol=1e-4)
    with pytest.raises(BackendError, match="max batch"):
        backend.cache.ensure(5, 4)
