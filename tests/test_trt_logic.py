"""GPU routes, CPU-tested: engine profiles, KV buffer sizes and moves, manifest engine section, backend choice, errors.

Nothing here needs TensorRT, CUDA or a GPU. The device KV cache shared by the TensorRT and ONNX
Runtime CUDA backends runs on a fake device (numpy memory) under a fake engine that follows the
graph's contract (present = Concat(past, new); logits from the tokens the mask lets it see).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from llmpack.export import trt_build
from llmpack.export.graph import interface
from llmpack.export.trt_build import graph_problem
from llmpack.runtime import manifest as names
from llmpack.runtime.artifact import Artifact, Probes, open_artifact, open_backend, select_backend
from llmpack.runtime.backends import trt as trt_backend
from llmpack.runtime.backends.cuda_device import ALIGN, GpuInfo
from llmpack.runtime.backends.device_kv import DeviceKvBackend, KvGeometry, fit_slots, plan_step, slots_that_fit
from llmpack.runtime.backends.trt import engine_problem, io_problem, profile_for
from llmpack.runtime.errors import ArtifactError, BackendError, BuildError
from llmpack.runtime.manifest import (
    MANIFEST_VERSION,
    BuildManifest,
    EngineInfo,
    EngineProfile,
    FileDigest,
    ModelConfig,
    SourceInfo,
    digest_file,
    read_manifest,
)

GIB = 2**30
LLAMA_7B = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                       num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=4096, tie_word_embeddings=False)
H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0", 80 * GIB)


def make_manifest(config: ModelConfig = LLAMA_7B, *, dtype="fp16", context=3072, engine=None) -> BuildManifest:
    inputs, outputs = interface(config, "float16" if dtype == "fp16" else "float32")
    return BuildManifest(
        name="m", config=config, dtype=dtype, max_context=context, opset=18, bos_token_id=1, stop_token_ids=(2,),
        inputs=inputs, outputs=outputs, source=SourceInfo("/src/llama", ()),
        files=(FileDigest(names.MODEL_FILE, "a" * 64, 10),), build_key="k", llmpack_version="0.1.0",
        tool_versions={}, built_at="2026-01-01T00:00:00+00:00", engine=engine)


def make_engine(**changes) -> EngineInfo:
    profiles = trt_build.optimization_profiles(LLAMA_7B, 3072, 4)
    fields = dict(tensorrt_version="10.13.3.9", gpu_name=H100.name, compute_capability="9.0", max_batch=4,
                  profiles=profiles, files=(FileDigest(names.ENGINE_FILE, "b" * 64, 3),), build_key="e",
                  workspace_bytes=8 * GIB)
    return EngineInfo(**{**fields, **changes})


# --- engine profiles --------------------------------------------------------------------------


def test_profiles_cover_prefill_and_decode_for_llama_7b():
    prefill, decode = trt_build.optimization_profiles(LLAMA_7B, 3072, 4)
    assert prefill == EngineProfile("prefill", (1, 1, 1), (1, 128, 512), (0, 0, 3071))
    assert decode == EngineProfile("decode", (1, 4, 4), (1, 1, 1), (0, 1536, 3071))
    small, _ = trt_build.optimization_profiles(LLAMA_7B, 256, 1)  # a context below the chunk bound caps prefill
    assert small.seq == (1, 128, 256) and small.past == (0, 0, 255)


def test_profile_shapes_keep_the_mask_at_past_plus_seq_at_every_point():
    prefill, decode = trt_build.optimization_profiles(LLAMA_7B, 3072, 4)
    shapes = trt_build.profile_shapes(LLAMA_7B, decode)
    assert len(shapes) == 3 + 2 * 32
    assert shapes[names.INPUT_IDS] == ((1, 1), (4, 1), (4, 1)) == shapes[names.POSITION_IDS]
    assert shapes[names.ATTENTION_MASK] == ((1, 1), (4, 1537), (4, 3072))
    assert shapes[names.past_value_name(31)] == ((1, 32, 0, 128), (4, 32, 1536, 128), (4, 32, 3071, 128))
    prefill_shapes = trt_build.profile_shapes(LLAMA_7B, prefill)
    assert prefill_shapes[names.ATTENTION_MASK] == ((1, 1), (1, 128), (1, 3071 + 512))
    for lo, opt, hi in prefill_shapes.values():  # one batch range for every input, as TensorRT requires
        assert (lo[0], opt[0], hi[0]) == prefill.batch


def test_profile_for_picks_the_tuned_profile_and_refuses_what_none_covers():
    profiles = trt_build.optimization_profiles(LLAMA_7B, 3072, 4)
    assert profile_for(profiles, 1, 1, 0) == 1  # a one-token step runs on the decode profile
    assert profile_for(profiles, 1, 300, 0) == 0 and profile_for(profiles, 1, 128, 2000) == 0
    assert profile_for(profiles, 4, 1, 3071) == 1
    with pytest.raises(BackendError, match="no TensorRT optimization profile covers batch 2, 5 new tokens"):
        profile_for(profiles, 2, 5, 0)


# --- buffer sizes -----------------------------------------------------------------------------


def test_kv_buffer_sizes_for_llama_7b_fp16():
    g = KvGeometry.of(make_manifest(), slots=4)
    assert g.home_row_bytes == 32 * 3072 * 128 * 2 == 25_165_824  # one slot, one tensor, full context
    assert g.tensor_stride == 4 * 25_165_824 and g.tensor_stride % ALIGN == 0
    assert g.buffer_bytes == 64 * g.tensor_stride == 6 * GIB  # K and V of 32 layers
    assert g.total_bytes == 18 * GIB  # home + two work buffers
    assert KvGeometry.of(make_manifest(), slots=1).total_bytes == 4.5 * GIB
    assert KvGeometry.of(make_manifest(dtype="fp32"), slots=1).total_bytes == 9 * GIB


def test_slots_fit_free_memory_or_the_error_says_how_much_is_needed():
    assert slots_that_fit(40 * GIB, int(4.5 * GIB), wanted=4, reserve_bytes=GIB) == 4
    assert slots_that_fit(10 * GIB, int(4.5 * GIB), wanted=8, reserve_bytes=GIB) == 2
    assert fit_slots(make_manifest(), 15 * GIB, 8, GIB) == 3
    with pytest.raises(ArtifactError, match=r"has 5.0 GiB free .* needs 4.50 GiB \(\+1.0 GiB reserve\)"):
        fit_slots(make_manifest(), 5 * GIB, 1, GIB)


# --- the device KV cache on a fake device ------------------------------------------------------

TINY = ModelConfig(vocab_size=24, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64,
                   tie_word_embeddings=False)


class MemoryDevice:
    """Device memory as one numpy byte array; pointers are offsets into it. Counts what crosses."""

    stream_handle = 0

    def __init__(self, size: int = 1 << 20):
        self.memory, self.top, self.copies, self.uploads = np.zeros(size, np.uint8), ALIGN, 0, []

    def alloc(self, nbytes: int) -> int:
        pointer, self.top = self.top, self.top + -(-max(nbytes, ALIGN) // ALIGN) * ALIGN
        assert self.top <= self.memory.size
        return pointer

    def copy_2d(self, dst, dst_pitch, src, src_pitch, width, height):
        self.copies += 1
        rows = [self.memory[src + r * src_pitch: src + r * src_pitch + width].copy() for r in range(height)]
        for r, row in enumerate(rows):
            self.memory[dst + r * dst_pitch: dst + r * dst_pitch + width] = row

    def upload(self, dst, array):
        raw = np.ascontiguousarray(array).view(np.uint8).ravel()
        self.uploads.append(raw.size)
        self.memory[dst: dst + raw.size] = raw

    def download(self, out, src):
        out.view(np.uint8).ravel()[:] = self.memory[src: src + out.nbytes]

    def view(self, pointer, shape, dtype):
        count = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self.memory[pointer: pointer + count].view(dtype).reshape(shape)

    def synchronize(self):
        pass

    def close(self):
        pass


class FakeEngineBackend(DeviceKvBackend):
    """Runs the graph's contract: K/V of a token encode (token, position, layer, kind, head); logits are
    a histogram of the visible tokens weighted by position+1, so a wrong move, mask or position shows."""

    name = "fake"

    def _execute(self, step, bindings):
        dev, b = self.device, {x.name: x for x in bindings}
        ids, mask, pos = (dev.view(b[n].address, b[n].shape, np.int64)
                          for n in (names.INPUT_IDS, names.ATTENTION_MASK, names.POSITION_IDS))
        visible = mask.astype(bool)
        logits = np.zeros((len(ids), self.vocab_size), np.float32)
        for layer in range(self.geometry.layers):
            for kind, (past, present) in enumerate(((names.past_key_name(layer), names.present_key_name(layer)),
                                                    (names.past_value_name(layer), names.present_value_name(layer)))):
                g = self.geometry
                new = np.zeros((len(ids), g.kv_heads, ids.shape[1], g.head_dim), np.float32)
                new[..., 0], new[..., 1] = ids[:, None, :], pos[:, None, :]
                new[..., 2], new[..., 3] = layer, kind
                new[..., 4] = np.arange(self.geometry.kv_heads)[None, :, None]
                full = np.concatenate([dev.view(b[past].address, b[past].shape, np.float32), new], axis=2)
                dev.view(b[present].address, b[present].shape, np.float32)[...] = full
                seen = [full[row][:, visible[row]] for row in range(len(ids))]
                if any((s[..., 2] != layer).any() or (s[..., 3] != kind).any() for s in seen):
                    logits[:] = -1  # a cache landed in the wrong tensor or head
                elif layer == kind == 0:
                    for row, s in enumerate(seen):
                        logits[row] = np.bincount(s[0, :, 0].astype(int), weights=s[0, :, 1] + 1,
                                                  minlength=self.vocab_size)
        dev.view(b[names.LOGITS].address, b[names.LOGITS].shape, np.float32)[...] = logits


def expected_logits(history: list[int], vocab: int) -> np.ndarray:
    return np.bincount(history, weights=np.arange(len(history)) + 1, minlength=vocab).astype(np.float32)


def fake_backend(slots=3, context=16, chunk=None) -> FakeEngineBackend:
    backend = FakeEngineBackend(make_manifest(TINY, dtype="fp32", context=context), MemoryDevice(), slots)
    backend.max_step_tokens = chunk
    return backend


def test_random_prefill_decode_reset_match_each_sequence_alone():
    backend, rng = fake_backend(chunk=3), random.Random(7)
    histories: list[list[int]] = [[] for _ in range(3)]
    for _ in range(300):
        op, slot = rng.random(), rng.randrange(3)
        if op < 0.1:
            backend.reset(slot)
            histories[slot] = []
        elif op < 0.4 and len(histories[slot]) < 12:
            ids = [rng.randrange(1, 24) for _ in range(rng.randint(1, 4))]
            histories[slot] += ids
            np.testing.assert_array_equal(backend.prefill(slot, ids), expected_logits(histories[slot], 24))
        else:
            live = [s for s in range(3) if 0 < len(histories[s]) < 16]
            chosen = rng.sample(live, rng.randint(1, len(live))) if live else []
            if not chosen:
                continue
            ids = [rng.randrange(1, 24) for _ in chosen]
            logits = backend.decode(chosen, ids)
            for row, (s, token) in enumerate(zip(chosen, ids)):
                histories[s].append(token)
                np.testing.assert_array_equal(logits[row], expected_logits(histories[s], 24))
        assert [backend.cached_tokens(s) for s in range(3)] == [len(h) for h in histories]


def test_steady_decode_swaps_buffers_without_copies_and_sends_only_ids_and_positions():
    backend = fake_backend()
    backend.prefill(0, [3, 4, 5])
    backend.prefill(1, [6])
    backend.decode([0, 1], [7, 8])  # the batch forms: copies
    copies, uploads = backend.device.copies, len(backend.device.uploads)
    for token in range(5):
        backend.decode([0, 1], [token, token])  # padded rows: ids, positions and the mask go up
    assert backend.device.copies == copies and len(backend.device.uploads) == uploads + 5 * 3
    backend.reset(1)
    backend.decode([0], [9])  # slot 0 alone: repacked once, unpadded...
    copies, uploads = backend.device.copies, backend.device.uploads[:]
    logits = backend.decode([0], [10])  # ...then 8 + 8 bytes per step, the mask is the all-ones buffer
    assert backend.device.copies == copies and backend.device.uploads[len(uploads):] == [8, 8]
    np.testing.assert_array_equal(logits[0], expected_logits([3, 4, 5, 7, 0, 1, 2, 3, 4, 9, 10], 24))


def test_plan_step_left_pads_rows_and_positions_follow_each_sequence():
    g = KvGeometry.of(make_manifest(TINY, dtype="fp32", context=16), slots=3)
    step = plan_step(g, None, [2, 0, 5], (2, 0), [[9], [8]])
    assert step.batch.slots == (2, 0) and step.batch.width == 5 and step.after.width == 6
    np.testing.assert_array_equal(step.attention_mask, [[1] * 6, [0, 0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(step.position_ids, [[5], [2]])
    assert len(step.copies) == 2 and {c.src for c in step.copies} == {"home"}
    assert plan_step(g, step.after, [3, 0, 6], (2, 0), [[1], [1]]).copies == ()


def test_backend_errors_are_clear():
    backend = fake_backend(context=8)
    with pytest.raises(BackendError, match="not prefilled"):
        backend.decode([0], [1])
    with pytest.raises(BackendError, match="exceeds the artifact's context of 8"):
        backend.prefill(0, list(range(1, 10)))
    with pytest.raises(BackendError, match="slot 3 is out of range"):
        backend.prefill(3, [1])


# --- the manifest's engine section and the compatibility check --------------------------------


def test_engine_section_round_trips_and_old_manifests_load(tmp_path):
    manifest = make_manifest(engine=make_engine())
    (tmp_path / names.MANIFEST_FILE).write_text(manifest.to_json())
    assert read_manifest(tmp_path) == manifest and manifest.manifest_version == MANIFEST_VERSION
    old = json.loads(manifest.to_json())
    del old["engine"]  # written before this field existed
    (tmp_path / names.MANIFEST_FILE).write_text(json.dumps(old))
    assert read_manifest(tmp_path).engine is None
    broken = json.loads(manifest.to_json())
    del broken["engine"]["profiles"]
    (tmp_path / names.MANIFEST_FILE).write_text(json.dumps(broken))
    with pytest.raises(ArtifactError, match=f"does not match schema version {MANIFEST_VERSION}"):
        read_manifest(tmp_path)


def test_inspect_shows_the_engine_it_was_built_with():
    from llmpack.cli.inspect_view import describe

    shown = describe(make_manifest(engine=make_engine()))
    assert "engine        TensorRT 10.13.3.9 for NVIDIA H100 80GB HBM3 (compute 9.0), max batch 4" in shown
    assert "profile decode   batch 1…4 (opt 4), seq 1…1 (opt 1), past 0…3071 (opt 1536)" in shown
    assert "engine" not in describe(make_manifest())


def test_engine_from_another_tensorrt_or_gpu_says_rebuild(caplog):
    manifest = make_manifest(engine=make_engine())
    assert engine_problem(manifest, "art", "10.13.3.9", H100) is None
    version = engine_problem(manifest, "art", "10.16.1.11", H100)
    assert "built with TensorRT 10.13.3.9 and this machine has TensorRT 10.16.1.11" in version
    assert "rebuild it on this machine: `llm-export build --model /src/llama --out art --dtype fp16" in version
    assert "--engine trt --max-batch 4`" in version
    a100 = engine_problem(manifest, "art", "10.13.3.9", GpuInfo("NVIDIA A100-SXM4-80GB", "8.0", 80 * GIB))
    assert "built for NVIDIA H100 80GB HBM3 (compute capability 9.0) and this GPU is NVIDIA A100" in a100
    assert "rebuild" in a100
    assert engine_problem(manifest, "art", "10.13.3.9", GpuInfo("NVIDIA H200", "9.0", 141 * GIB)) is None
    assert "may be slower" in caplog.text  # same compute capability, other model: loads, with a warning
    assert engine_problem(manifest, "art", None, H100) == "TensorRT is not installed (pip install 'llmpack[gpu]')"
    assert engine_problem(make_manifest(), "art", "10.13.3.9", H100).startswith("art has no TensorRT engine")


def test_trt_backend_refuses_before_tensorrt_reads_the_plan(monkeypatch, tmp_path):
    manifest = make_manifest(engine=make_engine())
    monkeypatch.setattr(trt_backend, "probe_gpu", lambda: H100)
    monkeypatch.setattr(trt_backend, "tensorrt_version", lambda: "10.14.1.48")
    with pytest.raises(ArtifactError, match=r"built with TensorRT 10.13.3.9 and this machine has TensorRT 10.14.1.48"):
        trt_backend.TrtBackend(tmp_path, manifest)
    monkeypatch.setattr(trt_backend, "tensorrt_version", lambda: "10.13.3.9")
    (tmp_path / names.ENGINE_FILE).write_bytes(b"abc")  # right size, wrong bytes
    with pytest.raises(ArtifactError, match=r"model.plan is missing or differs from the manifest; rebuild it: `llm-"):
        trt_backend.TrtBackend(tmp_path, manifest)


def test_engine_tensors_are_checked_against_the_graph():
    manifest = make_manifest(TINY)
    tensors = {t.name: (True, t.dtype) for t in manifest.inputs} | {t.name: (False, t.dtype) for t in manifest.outputs}
    assert io_problem(tensors, manifest) is None
    assert io_problem({**tensors, names.LOGITS: (False, "float16")}, manifest) == "logits is float16, expected float32"
    del tensors[names.present_key_name(1)]
    assert io_problem(tensors, manifest) == "the engine lacks tensor(s) present.1.key"


# --- backend selection on simulated machines ----------------------------------------------------


def machine(tensorrt=None, gpu=None, providers=("CPUExecutionProvider",)) -> Probes:
    return Probes(lambda: tensorrt, lambda: gpu or "no NVIDIA GPU driver was found (no nvidia-smi)", lambda: providers)


CUDA_ORT = ("CUDAExecutionProvider", "CPUExecutionProvider")


def test_auto_picks_tensorrt_then_cuda_then_cpu():
    with_engine = Artifact(Path("/art/llama"), make_manifest(engine=make_engine()))
    plain = Artifact(Path("/art/llama"), make_manifest())
    assert select_backend("auto", with_engine, machine("10.13.3.9", H100, CUDA_ORT))[0] == "tensorrt"
    name, why = select_backend("auto", with_engine, machine("10.16.1.11", H100, CUDA_ORT))
    assert name == "cuda" and "not tensorrt: its TensorRT engine was built with TensorRT 10.13.3.9" in why
    assert select_backend("auto", plain, machine(None, H100, CUDA_ORT)) == (
        "cuda", "auto; not tensorrt: no TensorRT engine in the artifact")
    name, why = select_backend("auto", with_engine, machine())
    assert name == "cpu" and "not tensorrt: TensorRT is not installed" in why
    assert "not cuda: onnxruntime has no CUDAExecutionProvider" in why


def test_explicit_backends_that_cannot_run_say_what_is_missing():
    artifact = Artifact(Path("/art/llama"), make_manifest(engine=make_engine()))
    never = Probes(*(lambda: pytest.fail("cpu must not probe the machine"),) * 3)
    assert select_backend("cpu", artifact, never) == ("cpu", "requested")
    with pytest.raises(ArtifactError, match=r"--backend tensorrt cannot run llama: .*compute capability 9.0\) and "
                                            r"this GPU is NVIDIA L4 \(8.9\); engines are not portable, rebuild"):
        select_backend("tensorrt", artifact, machine("10.13.3.9", GpuInfo("NVIDIA L4", "8.9", 24 * GIB), CUDA_ORT))
    with pytest.raises(ArtifactError, match=r"--backend cuda cannot run llama: onnxruntime has no "
                                            r"CUDAExecutionProvider .* pip install 'llmpack\[gpu\]'"):
        select_backend("cuda", artifact, machine("10.13.3.9", H100))
    with pytest.raises(ArtifactError, match="no NVIDIA GPU driver was found"):
        select_backend("cuda", artifact, machine(providers=CUDA_ORT))
    with pytest.raises(ArtifactError, match="choose one of auto, cpu, cuda, tensorrt"):
        select_backend("rocm", artifact, machine())


def test_llm_serve_backend_tensorrt_without_an_engine_is_one_error_line(tmp_path, stories_dir):
    from llmpack.cli.serve_cli import main

    (tmp_path / names.MANIFEST_FILE).write_text(dataclasses.replace(make_manifest(TINY), files=()).to_json())
    shutil.copyfile(stories_dir / "tokenizer.model", tmp_path / names.TOKENIZER_FILE)
    result = CliRunner().invoke(main, ["tokenize", str(tmp_path), "--prompt", "hi", "--backend", "tensorrt"])
    assert result.exit_code == 3
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: --backend tensorrt cannot run {tmp_path.name}: {tmp_path} has no TensorRT engine; build one with")
    with pytest.raises(ArtifactError, match="has no TensorRT engine"):
        open_backend(open_artifact(tmp_path), "tensorrt")


# --- `llm-export build --engine trt` without TensorRT or a GPU ------------------------------------


@pytest.mark.parametrize("tensorrt, gpu, expected", [
    (None, "no NVIDIA GPU driver was found (no nvidia-smi)",
     "TensorRT is not installed (pip install 'llmpack[gpu]'); no NVIDIA GPU driver was found (no nvidia-smi)"),
    ("10.13.3.9", "no NVIDIA GPU is visible to CUDA (cudaErrorNoDevice); check the driver and CUDA_VISIBLE_DEVICES",
     "no NVIDIA GPU is visible to CUDA (cudaErrorNoDevice); check the driver and CUDA_VISIBLE_DEVICES"),
    (None, H100, "TensorRT is not installed (pip install 'llmpack[gpu]')"),
])
def test_engine_build_without_tensorrt_or_gpu_fails_fast_in_one_line(monkeypatch, tmp_path, tensorrt, gpu, expected):
    from llmpack.cli.export_cli import main

    monkeypatch.setattr(trt_build, "tensorrt_version", lambda: tensorrt)
    monkeypatch.setattr(trt_build, "probe_gpu", lambda: gpu)
    out = tmp_path / "llama"
    result = CliRunner().invoke(main, ["build", "--model", "demo", "--out", str(out), "--dtype", "fp16",
                                       "--engine", "trt", "--max-batch", "2"])
    assert result.exit_code == 3
    assert result.output.strip().splitlines() == [
        f"error: --engine trt needs TensorRT and an NVIDIA GPU, on the machine the engine is for: {expected}"]
    assert not out.exists()  # refused before the ONNX export, not after it


def test_engine_needs_the_standard_graph_and_cuda_refuses_the_fused_one():
    from llmpack.export.build import BuildOptions

    assert graph_problem("standard", False) is None
    assert "cannot parse the 'ort-fused' graph" in graph_problem("ort-fused", False)
    assert "build it without --quant" in graph_problem("standard", True)
    with pytest.raises(BuildError, match="TensorRT cannot parse the 'ort-fused' graph"):
        trt_build.build_with_engine(BuildOptions(model="demo", out=Path("/nonexistent/x"),
                                                 graph="ort-fused"), trt_build.EngineBuildOptions())
    fused = Artifact(Path("/art/f"), dataclasses.replace(make_manifest(), graph_flavour="ort-fused"))
    name, why = select_backend("auto", fused, machine("10.13.3.9", H100, CUDA_ORT))
    assert name == "cpu" and "the CUDA backend runs the standard graph, this artifact's is 'ort-fused'" in why


# --- timing cache, engine key, parser errors -----------------------------------------------------


def test_timing_cache_comes_from_the_artifact_else_the_replaced_one(tmp_path):
    assert trt_build.previous_timing_cache(tmp_path / "absent") is None
    assert trt_build.timing_cache_to_load(tmp_path, None) == b""
    assert trt_build.timing_cache_to_load(tmp_path, b"old") == b"old"
    (tmp_path / names.TIMING_CACHE_FILE).write_bytes(b"beside")
    assert trt_build.previous_timing_cache(tmp_path) == b"beside"
    assert trt_build.timing_cache_to_load(tmp_path, b"old") == b"beside"


def test_engine_is_current_only_for_the_same_key_and_plan(tmp_path):
    (tmp_path / names.ENGINE_FILE).write_bytes(b"plan")
    engine = make_engine(files=(digest_file(tmp_path, names.ENGINE_FILE),), build_key="key")
    assert trt_build.engine_is_current(tmp_path, engine, "key")
    assert not trt_build.engine_is_current(tmp_path, engine, "other")
    assert not trt_build.engine_is_current(tmp_path, None, "key")
    (tmp_path / names.ENGINE_FILE).write_bytes(b"PLAN")  # same size, other bytes
    assert not trt_build.engine_is_current(tmp_path, engine, "key")


def test_engine_key_changes_with_what_shapes_the_engine():
    manifest, options = make_manifest(), trt_build.EngineBuildOptions()
    profiles = trt_build.optimization_profiles(LLAMA_7B, 3072, 4)
    key = trt_build.engine_key(manifest, "10.13.3.9", H100, profiles, options)
    assert key == trt_build.engine_key(manifest, "10.13.3.9", H100, profiles, options)
    assert key != trt_build.engine_key(manifest, "10.16.1.11", H100, profiles, options)
    assert key != trt_build.engine_key(manifest, "10.13.3.9", GpuInfo("NVIDIA L4", "8.9", 0), profiles, options)
    assert key != trt_build.engine_key(manifest, "10.13.3.9", H100, profiles, dataclasses.replace(options, max_batch=8))


def test_parser_errors_become_one_line():
    message = trt_build.parser_error_message(names.MODEL_FILE, ["In node 7 (Concat):\n  UNSUPPORTED_NODE", "second"])
    assert message == ("TensorRT's ONNX parser rejected model.onnx: In node 7 (Concat): UNSUPPORTED_NODE "
                       "(and 1 more); report it with the artifact's manifest")
    assert "without saying why" in trt_build.parser_error_message(names.MODEL_FILE, [])
