"""The stand-in engine on the device KV path (bench/gpu_standin.py), on the CPU: what `make gpu-standin` runs on a GPU.

The real DeviceKvBackend on host memory drives an interpreter of the standard graph's ONNX ops that
reads and writes the raw addresses it is bound to, step by step against the ONNX Runtime CPU backend
on the same artifact. The last tests break the path on purpose and expect the check to say so.
"""

from __future__ import annotations

import sys

import pytest
from conftest import REPO

from llmpack.runtime.backends import device_kv
from llmpack.runtime.errors import BackendError

sys.path.insert(0, str(REPO / "bench"))
import gpu_standin  # noqa: E402
import standin_engine  # noqa: E402


@pytest.fixture(scope="module")
def shipped_stories(tmp_path_factory):
    """fp32 and fp16 standard-graph artifacts of the stories260k copy shipped in export/models."""
    return gpu_standin.build_artifacts("stories260k", tmp_path_factory.mktemp("standin"))


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_random_schedules_match_onnx_runtime_step_by_step(shipped_stories, dtype):
    for seed in (0, 1):
        tally = gpu_standin.compare_schedule(shipped_stories[dtype], "cpu", seed, operations=70)
        assert tally.failures == [], tally.failures[:3]
        assert tally.steps > 40 and all(tally.profile_steps), tally.profile_steps  # both profiles ran
        if dtype == "fp32":
            assert tally.argmax_differ == 0 and max(tally.max_rel.values()) < 1e-4


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_greedy_stories260k_is_token_identical_to_the_cpu_path(stories_dir, tmp_path, dtype):
    artifacts = gpu_standin.build_artifacts(str(stories_dir), tmp_path)  # ../shared's copy; skips when absent
    got, want = gpu_standin.compare_greedy(artifacts[dtype], "cpu", steps=48)
    assert got == want and len(set(got)) > 10  # a story, not one token repeated


def test_one_command_writes_a_results_file(shipped_stories, tmp_path):
    results = tmp_path / "standin.md"
    code = gpu_standin.main(["--device", "cpu", "--seeds", "1", "--operations", "25", "--greedy-steps", "8",
                             "--artifacts", str(tmp_path / "a"), "--results", str(results)])
    text = results.read_text()
    assert code == 0, text
    assert "- machine:" in text and "- versions:" in text and "- command:" in text
    assert text.count("| ok") == 4 and text.rstrip().splitlines()[-1].startswith("PASS")


def test_a_lost_repack_copy_is_caught(shipped_stories, monkeypatch):
    real = standin_engine.HostDevice.copy_2d
    calls = []

    def drop_every_third(self, *args):
        calls.append(args)
        if len(calls) % 3:
            real(self, *args)

    monkeypatch.setattr(standin_engine.HostDevice, "copy_2d", drop_every_third)
    tally = gpu_standin.compare_schedule(shipped_stories["fp32"], "cpu", 0, operations=70)
    assert calls and tally.failures


def test_a_wrong_mask_is_caught(shipped_stories, monkeypatch):
    real = device_kv.plan_step

    def unpadded(*args):
        step = real(*args)
        step.attention_mask[:] = 1  # left padding visible to attention
        return step

    monkeypatch.setattr(device_kv, "plan_step", unpadded)
    tally = gpu_standin.compare_schedule(shipped_stories["fp32"], "cpu", 1, operations=70)
    assert tally.failures


def test_outputs_that_do_not_fit_their_buffers_are_refused(shipped_stories, monkeypatch):
    real = device_kv.step_bindings

    def short_present(*args):
        return [b if b.name != "present.0.key" else device_kv.Binding(b.name, False, b.address,
                                                                       (*b.shape[:2], b.shape[2] - 1, b.shape[3]),
                                                                       b.dtype) for b in real(*args)]

    monkeypatch.setattr(device_kv, "step_bindings", short_present)
    with pytest.raises(BackendError, match=r"outputs do not fit their buffers: present.0.key is \(1, \d+, \d+, \d+\), "
                                           r"its buffer \(1, \d+, \d+, \d+\)"):
        gpu_standin.compare_schedule(shipped_stories["fp32"], "cpu", 0, operations=5)


def test_close_releases_the_engine_before_freeing_memory(shipped_stories):
    _, standin, _ = gpu_standin.open_pair(shipped_stories["fp32"], "cpu")
    standin.prefill(0, [1, 2, 3])
    standin.close()
    assert standin.device.events == ["synchronize", "release engine", "close"]
