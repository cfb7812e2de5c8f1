"""GPU first run (issue 16), CPU-tested with stand-in objects: what a review against TensorRT's source found.

TensorRT, onnxruntime-gpu and CUDA cannot be installed here: each fake below behaves as the real
call is documented to (RuntimeError from the Python bindings, None from create_timing_cache, …),
and each test fails if the code goes back to trusting the happy path.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from importlib import metadata
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import REPO
from test_trt_logic import H100, TINY, MemoryDevice, make_engine, make_manifest

from llmpack.export import trt_build, trt_report
from llmpack.runtime import manifest as names
from llmpack.runtime.artifact import Probes
from llmpack.runtime.backends import cuda_device, ort_cuda, ort_install
from llmpack.runtime.backends.device_kv import Binding, KvGeometry, plan_step, step_bindings
from llmpack.runtime.backends.trt import TrtBackend, distribution_problem, output_shape_problem, tensorrt_call
from llmpack.runtime.errors import ArtifactError, BackendError, BuildError
from llmpack.runtime.manifest import read_manifest

sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402

# --- item 6: the timing cache ---------------------------------------------------------------------


class FakeBuilderConfig:
    """create_timing_cache as TensorRT's: a cache object, None, or RuntimeError for bytes it cannot read."""

    def __init__(self, reads, accepts=(True,)):
        self.reads, self.accepts, self.installed = reads, list(accepts), []

    def create_timing_cache(self, data):
        outcome = self.reads(data)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def set_timing_cache(self, cache, ignore_mismatch):
        assert ignore_mismatch is False
        self.installed.append(cache)
        return self.accepts.pop(0) if self.accepts else True


@pytest.mark.parametrize("corrupt", [None, RuntimeError("Parameter check failed: blob\ncorrupt")])
def test_an_unreadable_timing_cache_falls_back_to_a_fresh_one(corrupt, caplog):
    config = FakeBuilderConfig(lambda data: ("cache", data) if data == b"" else corrupt)
    trt_build.use_timing_cache(config, b"from another machine")
    assert config.installed == [("cache", b"")]
    assert "timing every tactic afresh" in caplog.text


def test_a_foreign_timing_cache_is_replaced_and_a_readable_one_kept():
    config = FakeBuilderConfig(lambda data: ("cache", data), accepts=(False, True))
    trt_build.use_timing_cache(config, b"old")
    assert config.installed == [("cache", b"old"), ("cache", b"")]  # refused (mismatch), then a fresh one
    kept = FakeBuilderConfig(lambda data: ("cache", data))
    trt_build.use_timing_cache(kept, b"old")
    assert kept.installed == [("cache", b"old")]


def test_no_timing_cache_at_all_is_one_build_error():
    with pytest.raises(BuildError, match=r"^TensorRT could not create an empty timing cache \(see its log above\)"):
        trt_build.use_timing_cache(FakeBuilderConfig(lambda data: None), b"x")


# --- item 7: TensorRT's RuntimeErrors become one-line errors -----------------------------------------


def _raise(message):
    def call(*args):
        raise RuntimeError(message)
    return call


def test_tensorrt_call_turns_false_and_runtime_error_into_one_line():
    assert tensorrt_call(BackendError, "x", "fix", lambda: True) is True
    assert tensorrt_call(BackendError, "x", "fix", lambda: None) is None  # set_shape returns nothing on success
    with pytest.raises(BackendError, match=r"^TensorRT refused shape \(1, 9\) for input_ids; rebuild$"):
        tensorrt_call(BackendError, "shape (1, 9) for input_ids", "rebuild", lambda *a: False, "input_ids")
    with pytest.raises(ArtifactError) as caught:
        tensorrt_call(ArtifactError, "profile 1", "rebuild", _raise("Error Code 3: API Usage Error\n (profile)"))
    assert caught.value.message == "TensorRT refused profile 1 (Error Code 3: API Usage Error (profile)); rebuild"


def test_builder_profiles_refused_by_set_shape_are_a_build_error():
    profile = SimpleNamespace(set_shape=_raise("min > opt"))
    builder = SimpleNamespace(create_optimization_profile=lambda: profile)
    profiles = trt_build.optimization_profiles(TINY, 64, 2)
    with pytest.raises(BuildError, match=r"^TensorRT refused the prefill profile's shapes .* \(min > opt\); report"):
        trt_build.add_profiles(builder, SimpleNamespace(add_optimization_profile=lambda p: 0), TINY, profiles)
    profile.set_shape = lambda *a: None
    with pytest.raises(BuildError, match="refused the prefill optimization profile"):
        trt_build.add_profiles(builder, SimpleNamespace(add_optimization_profile=lambda p: -1), TINY, profiles)


class FakeContext:
    """An IExecutionContext: records calls; set_input_shape/set_optimization_profile_async may raise."""

    def __init__(self, events=None, shape_error=None, shapes=None):
        self.events, self.shape_error, self.shapes, self.asked = events, shape_error, shapes or {}, 0

    def set_optimization_profile_async(self, index, stream):
        if self.shape_error:
            raise RuntimeError(self.shape_error)
        return True

    def set_device_memory(self, pointer, size):
        pass

    def set_input_shape(self, name, shape):
        if self.shape_error:
            raise RuntimeError(self.shape_error)
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        return True

    def infer_shapes(self):
        return []

    def get_tensor_shape(self, name):
        self.asked += 1
        return self.shapes[name]

    def execute_async_v3(self, stream):
        return True

    def __del__(self):
        if self.events is not None:
            self.events.append("context released")


def trt_without_tensorrt(context, events=None) -> TrtBackend:
    """A TrtBackend past its __init__ (which needs TensorRT): what _execute and close use."""
    backend = TrtBackend.__new__(TrtBackend)
    backend.manifest = make_manifest(TINY, dtype="fp32", context=16, engine=make_engine(
        profiles=trt_build.optimization_profiles(TINY, 16, 2)))
    backend._contexts, backend._shapes_checked = [context, context], set()
    backend.device = SimpleNamespace(stream_handle=7, synchronize=lambda: events.append("synchronize"),
                                     close=lambda: events.append("device closed"))
    return backend


def one_step(batch=1, width=3, seq=1, present_width=None):
    g = KvGeometry.of(make_manifest(TINY, dtype="fp32", context=16), slots=2)
    lengths = [width] * batch + [0] * (2 - batch)
    step = plan_step(g, None, lengths, tuple(range(batch)), [[5] * seq] * batch)
    io = {n: 256 for n in (names.INPUT_IDS, names.ATTENTION_MASK, names.POSITION_IDS, names.LOGITS)}
    bindings = step_bindings(make_manifest(TINY, dtype="fp32", context=16), g, step, io, (1024, 2048))
    return step, bindings


def test_a_shape_tensorrt_refuses_is_one_backend_error():
    backend = trt_without_tensorrt(FakeContext(shape_error="IExecutionContext::setInputShape: Error Code 3:\n"
                                                           "API Usage Error (dims out of range)"))
    step, bindings = one_step()
    with pytest.raises(BackendError) as caught:
        backend._execute(step, bindings)
    assert "\n" not in caught.value.message
    assert caught.value.message.startswith("TensorRT refused shape (1, 1) for input_ids (IExecutionContext")
    assert caught.value.message.endswith("the decode profile does not take it; rebuild the engine")


def test_a_refused_optimization_profile_is_one_artifact_error():
    backend = TrtBackend.__new__(TrtBackend)
    backend._trt = SimpleNamespace(ExecutionContextAllocationStrategy=SimpleNamespace(USER_MANAGED=1))
    backend.engine = SimpleNamespace(device_memory_size_v2=512, num_optimization_profiles=2,
                                     create_execution_context=lambda s: FakeContext(shape_error="bad profile"))
    with pytest.raises(ArtifactError, match=r"^TensorRT refused optimization profile 0 \(bad profile\); rebuild"):
        backend._create_contexts(MemoryDevice())


# --- item 9: engine output shapes against the bound buffers ---------------------------------------------


def test_output_shapes_are_checked_against_the_buffers_on_the_first_step_of_each_profile():
    step, bindings = one_step()
    right = {b.name: b.shape for b in bindings}
    context = FakeContext(shapes=dict(right))
    backend = trt_without_tensorrt(context)
    backend._execute(step, bindings)
    outputs = sum(not b.is_input for b in bindings)
    assert context.asked == outputs
    backend._execute(step, bindings)
    assert context.asked == outputs  # once per profile: later steps pay nothing
    wrong = FakeContext(shapes={**right, names.present_key_name(1): (1, 2, 5, 8)})
    with pytest.raises(BackendError, match=r"do not fit the KV buffers \(present.1.key is \(1, 2, 5, 8\), its buffer "
                                           r"\(1, 2, 4, 8\)\); rebuild the engine"):
        trt_without_tensorrt(wrong)._execute(step, bindings)


def test_output_shape_problem_names_each_mismatch():
    bindings = [Binding("a", True, 0, (1, 2), "int64"), Binding("b", False, 0, (1, 4), "float32")]
    assert output_shape_problem(bindings, lambda n: (1, 4)) is None
    assert output_shape_problem(bindings, lambda n: (2, 4)) == "b is (2, 4), its buffer (1, 4)"


# --- item 8: teardown order ----------------------------------------------------------------------


def test_trt_close_releases_contexts_engine_and_runtime_before_the_device():
    events = []

    class Held:
        def __init__(self, what):
            self.what = what

        def __del__(self):
            events.append(f"{self.what} released")

    backend = trt_without_tensorrt(None, events)
    backend._contexts = [FakeContext(events), FakeContext(events)]
    backend.engine, backend._runtime = Held("engine"), Held("runtime")
    backend.close()
    assert events == ["synchronize", "context released", "context released", "engine released",
                      "runtime released", "device closed"]


def test_ort_cuda_close_releases_the_session_before_the_device():
    events = []
    backend = ort_cuda.OrtCudaBackend.__new__(ort_cuda.OrtCudaBackend)

    class Session:
        def __del__(self):
            events.append("session released")

    backend.session = Session()
    backend.device = SimpleNamespace(synchronize=lambda: events.append("synchronize"),
                                     close=lambda: events.append("device closed"))
    backend.close()
    assert events == ["synchronize", "session released", "device closed"]


# --- item 10 and breaker 1: cuDNN, preload, which onnxruntime, which TensorRT ------------------------


def test_the_cuda_session_preloads_cuda_and_cudnn_before_creating_the_session(tmp_path):
    calls = []
    fake = SimpleNamespace(get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
                           preload_dlls=lambda: calls.append("preload"),
                           SessionOptions=lambda: SimpleNamespace(),
                           GraphOptimizationLevel=SimpleNamespace(ORT_ENABLE_ALL=99))

    class Session:
        def __init__(self, path, options, providers):
            calls.append("session")

        def get_providers(self):
            return ["CUDAExecutionProvider"]

    fake.InferenceSession = Session
    ort_cuda.create_cuda_session(tmp_path / "model.onnx", 5, ort=fake)
    assert calls == ["preload", "session"]
    del fake.preload_dlls  # an older onnxruntime-gpu: no preload, still a session
    ort_install.preload_cuda_libraries(fake)


def fake_versions(*installed):
    def version(name):
        if name not in installed:
            raise metadata.PackageNotFoundError(name)
        return "1"
    return version


def test_both_onnxruntime_builds_installed_is_refused_in_one_line():
    assert ort_install.installed_builds(fake_versions("onnxruntime", "numpy")) == ("onnxruntime",)
    both = ort_install.installed_builds(fake_versions("onnxruntime", "onnxruntime-gpu"))
    with pytest.raises(ArtifactError, match=r"^both onnxruntime and onnxruntime-gpu are installed .*; pip uninstall "
                                            r"-y onnxruntime onnxruntime-gpu, then pip install 'llmpack\[gpu\]'"):
        ort_install.import_onnxruntime(lambda: both)
    assert "pip install 'llmpack[cpu]'" in ort_install.install_problem(())
    assert ort_install.install_problem(("onnxruntime-gpu",)) is None


def test_the_tensorrt_wheel_and_cuda_runtime_are_recorded_and_old_manifests_load(tmp_path, monkeypatch):
    assert cuda_device.tensorrt_distribution(fake_versions("tensorrt", "tensorrt-cu13")) == "tensorrt-cu13"
    assert cuda_device.tensorrt_distribution(fake_versions("tensorrt-cu12-bindings")) == "tensorrt-cu12"
    assert cuda_device.tensorrt_distribution(fake_versions()) == ""
    monkeypatch.setattr(cuda_device, "cudart", lambda: SimpleNamespace(cudaRuntimeGetVersion=lambda: (0, 13010)))
    assert cuda_device.cuda_runtime_version() == "13.1"
    manifest = make_manifest(engine=make_engine(tensorrt_distribution="tensorrt-cu13", cuda_runtime="13.0"))
    (tmp_path / names.MANIFEST_FILE).write_text(manifest.to_json())
    assert read_manifest(tmp_path) == manifest
    old = json.loads(manifest.to_json())
    del old["engine"]["tensorrt_distribution"], old["engine"]["cuda_runtime"]  # written before these fields
    (tmp_path / names.MANIFEST_FILE).write_text(json.dumps(old))
    assert read_manifest(tmp_path).engine == dataclasses.replace(manifest.engine, tensorrt_distribution="",
                                                                 cuda_runtime="")


def test_an_engine_from_the_other_cuda_wheel_says_rebuild():
    manifest = make_manifest(engine=make_engine(tensorrt_distribution="tensorrt-cu12"))
    problem = distribution_problem(manifest, "art", "tensorrt-cu13")
    assert problem.startswith("its TensorRT engine was built with tensorrt-cu12 and this machine has tensorrt-cu13")
    assert "rebuild it on this machine: `llm-export build" in problem
    assert distribution_problem(manifest, "art", "tensorrt-cu12") is None
    assert distribution_problem(make_manifest(engine=make_engine()), "art", "tensorrt-cu13") is None  # unrecorded
    key = trt_build.engine_key(manifest, "10.13.3.9", H100, manifest.engine.profiles, trt_build.EngineBuildOptions())
    assert key != trt_build.engine_key(manifest, "10.13.3.9", H100, manifest.engine.profiles,
                                       trt_build.EngineBuildOptions(), "tensorrt-cu13")


# --- item 11 and breakers 3-4: gpu_check ------------------------------------------------------------


def probes(tensorrt=None, gpu=H100, providers=("CPUExecutionProvider",)) -> Probes:
    return Probes(lambda: tensorrt, lambda: gpu, lambda: providers)


def test_gpu_check_gates_each_backend_on_its_own():
    cuda_only = gpu_check.backend_problems(probes(providers=("CUDAExecutionProvider",)))
    assert cuda_only == {"cuda": None, "tensorrt": "TensorRT is not installed (pip install 'llmpack[gpu]')"}
    trt_only = gpu_check.backend_problems(probes("10.13.3.9"))
    assert trt_only["tensorrt"] is None and "onnxruntime has no CUDAExecutionProvider" in trt_only["cuda"]
    no_gpu = gpu_check.backend_problems(probes("10.13.3.9", gpu="no NVIDIA GPU driver was found (no nvidia-smi)"))
    assert set(no_gpu.values()) == {"no NVIDIA GPU driver was found (no nvidia-smi)"}


def test_gpu_check_without_any_gpu_backend_exits_2_in_one_line(capsys):
    assert gpu_check.main([], probes(gpu="no NVIDIA GPU driver was found (no nvidia-smi)")) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "gpu-check: no GPU backend can run here; cuda: no NVIDIA GPU driver was found (no nvidia-smi); "
        "tensorrt: no NVIDIA GPU driver was found (no nvidia-smi)"]


def test_gpu_check_takes_the_model_paths_and_gates_on_stories260k_only():
    models = gpu_check.models_to_check("/data/stories260k", True, ["/ckpt/llama"])
    assert models == {"stories260k": ("/data/stories260k", True), "demo": ("demo", False),
                      "llama": ("/ckpt/llama", True)}
    assert "demo" not in gpu_check.models_to_check("stories260k", False, [])


def test_gpu_check_warms_up_before_timing():
    calls = []

    class Backend:
        def prefill(self, slot, ids):
            calls.append("prefill")
            return np.zeros(4)

        def decode(self, slots, ids):
            calls.append("decode")
            return np.zeros((1, 4))

        def reset(self, slot):
            calls.append("reset")

    result = gpu_check.timings(Backend(), [1, 2], steps=5, warmup=2)
    assert calls.count("prefill") == 3 and calls.count("decode") == 2 * 4 + 5
    assert calls[: 6] == ["prefill", "decode", "decode", "decode", "decode", "reset"]
    assert set(result) == {"ttft_ms", "decode_tok_s"}


class FakeTrt:
    """The corner of TensorRT's Python API the build report uses."""

    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    Logger = SimpleNamespace(WARNING=2)
    ProfilingVerbosity = SimpleNamespace(DETAILED="detailed")
    LayerInformationFormat = SimpleNamespace(JSON="json")

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            inspector = SimpleNamespace(get_engine_information=lambda fmt: json.dumps({"Layers": [plan, fmt]}))
            return SimpleNamespace(create_engine_inspector=lambda: inspector)


def test_the_build_report_writes_the_verbose_log_and_the_layer_json(tmp_path, caplog):
    logger = trt_report.build_logger(FakeTrt, tmp_path / "report")
    logger.log(FakeTrt.ILogger.Severity.VERBOSE, "tactic 7 chosen")
    logger.log(FakeTrt.ILogger.Severity.WARNING, "weights\nout of range")
    trt_report.close_logger(logger)
    assert (tmp_path / "report" / trt_report.BUILD_LOG).read_text().splitlines() == [
        "[4] tactic 7 chosen", "[2] weights", "out of range"]
    assert "TensorRT: weights out of range" in caplog.text and "tactic 7" not in caplog.text
    config = SimpleNamespace()
    trt_report.detailed_profiling(FakeTrt, config, tmp_path / "report")
    assert config.profiling_verbosity == "detailed"
    path = trt_report.write_layer_report(FakeTrt, logger, "plan", tmp_path / "report")
    assert json.loads(path.read_text()) == {"Layers": ["plan", "json"]}
    assert trt_report.write_layer_report(FakeTrt, logger, "plan", None) is None


def test_inspect_names_the_tensorrt_wheel_and_cuda_runtime():
    from llmpack.cli.inspect_view import describe

    shown = describe(make_manifest(engine=make_engine(tensorrt_distribution="tensorrt-cu13", cuda_runtime="13.0")))
    assert "built with tensorrt-cu13, CUDA runtime 13.0" in shown
    assert "built with" not in describe(make_manifest(engine=make_engine()))
