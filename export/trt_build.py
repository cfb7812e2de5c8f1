"""Export stage 5 (GPU): `llm-export build --engine trt` — the artifact's ONNX graph → a TensorRT engine.

Runs after stage 3 has put the ONNX artifact in place, on the GPU the engine is for (plans are not
portable). Decisions, each for a reason:
- Two optimization profiles rather than one: prefill (batch 1, seq 1…512: the runtime reads prompts in
  chunks of at most MAX_PREFILL_CHUNK, tuned at its 128-token chunk) and decode (batch 1…B,
  seq 1), so each is tuned at its own opt shape; the backend prefills one slot per call, so prefill
  needs no batch. Both let past run 0…context-1 (a chunked prompt continues after a cached part). At
  each of min/opt/max the attention mask is exactly past+seq: TensorRT checks the graph's shape
  constraints at those points.
- A strongly typed network instead of the FP16 builder flag: the fp16 graph already carries fp32
  casts around the RMSNorm statistics, the attention bias and the softmax (export/graph.py), and strong
  typing makes TensorRT keep exactly those types, as ONNX Runtime does; builder precision flags are
  not allowed on strongly typed networks, and weak typing is deprecated since TensorRT 10.12.
- The timing cache lives beside the engine (engine.timing.cache) and is carried over when the ONNX
  artifact is rebuilt, so rebuilding an unchanged graph in CI skips the tactic timing; one TensorRT cannot
  read (corrupt, foreign) is replaced by a fresh one, never a failed build.
TensorRT and cuda-python are imported inside functions: this module imports on any machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from llmpack.export.build import BuildResult, build, build_lock
from llmpack.export.options import BuildOptions, EngineBuildOptions, resolve_graph
from llmpack.export.progress import tensorrt_progress_monitor
from llmpack.export.trt_report import build_logger, close_logger, detailed_profiling, write_layer_report
from llmpack.runtime import __version__
from llmpack.runtime import manifest as names
from llmpack.runtime.backends.cuda_device import (
    GPU_EXTRA,
    GpuInfo,
    cuda_runtime_version,
    probe_gpu,
    tensorrt_distribution,
    tensorrt_version,
)
from llmpack.runtime.backends.trt import tensorrt_call
from llmpack.runtime.errors import BuildError
from llmpack.runtime.manifest import BuildManifest, EngineInfo, EngineProfile, ModelConfig, digest_file, read_manifest

log = logging.getLogger("llmpack.export")

PREFILL_OPT_SEQ = names.DEFAULT_PREFILL_CHUNK  # the runtime's prompt chunk: TensorRT picks its prefill kernels for it
Range = tuple[int, int, int]  # min, opt, max


@dataclass(frozen=True)
class EngineResult:
    path: Path
    engine: EngineInfo
    reused: bool

    def summary(self) -> str:
        e = self.engine
        state = "up to date (reused)" if self.reused else "built"
        return (f"{self.path / names.ENGINE_FILE}: {state}, TensorRT {e.tensorrt_version}, {e.gpu_name} "
                f"(compute capability {e.compute_capability}), max batch {e.max_batch}")


# --- pure: prerequisites, profiles, keys, messages ---------------------------------------------


def graph_problem(graph_flavour: str, quantized: bool) -> str | None:
    """TensorRT's ONNX parser takes plain ONNX ops only: not ONNX Runtime's contrib ops."""
    if graph_flavour != names.STANDARD_GRAPH:
        return (f"TensorRT cannot parse the {graph_flavour!r} graph (ONNX Runtime contrib ops); "
                "build the standard graph for --engine trt")
    if quantized:
        return ("TensorRT cannot parse the --quant graph (MatMulNBits, an ONNX Runtime contrib op); "
                "build it without --quant")
    return None


def missing_prerequisites(tensorrt: str | None, gpu: GpuInfo | str) -> str | None:
    """One line naming what is missing for an engine build, and how to get it."""
    missing = ([f"TensorRT is not installed ({GPU_EXTRA})"] if tensorrt is None else []) + \
        ([gpu] if isinstance(gpu, str) else [])
    if not missing:
        return None
    return "--engine trt needs TensorRT and an NVIDIA GPU, on the machine the engine is for: " + "; ".join(missing)


def optimization_profiles(config: ModelConfig, max_context: int, max_batch: int) -> tuple[EngineProfile, EngineProfile]:
    last = max_context - 1  # the most tokens cached before a step that still adds one
    prefill_max = min(names.MAX_PREFILL_CHUNK, max_context)  # the runtime never sends a longer chunk
    prefill = EngineProfile("prefill", (1, 1, 1), (1, min(PREFILL_OPT_SEQ, prefill_max), prefill_max), (0, 0, last))
    decode = EngineProfile("decode", (1, max_batch, max_batch), (1, 1, 1), (0, max_context // 2, last))
    return prefill, decode


def profile_shapes(config: ModelConfig, profile: EngineProfile) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape of every graph input; the mask spans past+seq at each point."""
    points = range(3)
    batch, seq, past = profile.batch, profile.seq, profile.past
    tokens = tuple((batch[i], seq[i]) for i in points)
    shapes = {
        names.INPUT_IDS: tokens,
        names.POSITION_IDS: tokens,
        names.ATTENTION_MASK: tuple((batch[i], past[i] + seq[i]) for i in points),
    }
    kv = tuple((batch[i], config.num_kv_heads, past[i], config.head_dim) for i in points)
    for layer in range(config.num_layers):
        shapes[names.past_key_name(layer)] = kv
        shapes[names.past_value_name(layer)] = kv
    return shapes


def engine_key(manifest: BuildManifest, tensorrt: str, gpu: GpuInfo, profiles, options: EngineBuildOptions,
               distribution: str = "") -> str:
    """Everything that determines the engine: a match with the manifest's means nothing to rebuild."""
    material = {
        "llmpack": __version__,
        "graph": sorted((d.path, d.sha256) for d in manifest.files),
        "tensorrt": tensorrt,
        "tensorrt_distribution": distribution,  # cu12 and cu13 wheels share the version string
        "gpu": [gpu.name, gpu.compute_capability],
        "profiles": [dataclasses.asdict(p) for p in profiles],
        "max_batch": options.max_batch,
        "workspace_gb": options.workspace_gb,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def parser_error_message(onnx_path: Path, errors: list[str]) -> str:
    if not errors:
        return f"TensorRT's ONNX parser rejected {onnx_path} without saying why; rebuild the artifact"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    first = " ".join(errors[0].split())  # TensorRT's messages span lines: keep the error one line
    return f"TensorRT's ONNX parser rejected {onnx_path}: {first}{more}; report it with the artifact's manifest"


def previous_timing_cache(out: Path) -> bytes | None:
    """Read before stage 3 may replace the folder: the old artifact's tactic timings stay useful."""
    path = out / names.TIMING_CACHE_FILE
    return path.read_bytes() if path.is_file() else None


def timing_cache_to_load(artifact: Path, previous: bytes | None) -> bytes:
    """The artifact's own cache first (an engine rebuild in place), else the replaced artifact's, else none."""
    beside = artifact / names.TIMING_CACHE_FILE
    return beside.read_bytes() if beside.is_file() else previous or b""


def engine_is_current(artifact: Path, engine: EngineInfo | None, key: str) -> bool:
    if engine is None or engine.build_key != key:
        return False
    digest = engine.files[0]
    path = artifact / digest.path
    return path.is_file() and path.stat().st_size == digest.size and digest_file(artifact, digest.path) == digest


# --- the build (needs TensorRT and a GPU) --------------------------------------------------------


def require_prerequisites() -> tuple[str, GpuInfo]:
    tensorrt, gpu = tensorrt_version(), probe_gpu()
    problem = missing_prerequisites(tensorrt, gpu)
    if problem:
        raise BuildError(problem)
    return tensorrt, gpu


def _write_atomically(path: Path, data) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)


def _parse(trt, builder, logger, onnx_path: Path):
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    # From the file, not from bytes: the parser then finds model.onnx.data beside it.
    if not parser.parse_from_file(str(onnx_path)):
        raise BuildError(parser_error_message(onnx_path, [str(parser.get_error(i)) for i in range(parser.num_errors)]))
    return network, parser  # the parser owns the weights: keep it alive until the engine is built


def _new_timing_cache(builder_config, data: bytes):
    """create_timing_cache on a corrupt or foreign cache can return None or raise (Polygraphy guards this exact
    call): then a fresh, empty one, and every tactic is timed again."""
    try:
        cache, why = builder_config.create_timing_cache(data), "corrupt, or from another TensorRT"
    except (RuntimeError, TypeError) as exc:
        cache, why = None, " ".join(str(exc).split())
    if cache is None and data:
        log.warning("TensorRT could not read the timing cache (%s); timing every tactic afresh", why)
        return _new_timing_cache(builder_config, b"")
    if cache is None:
        raise BuildError("TensorRT could not create an empty timing cache (see its log above); "
                         "check the TensorRT install and the GPU")
    return cache


def use_timing_cache(builder_config, data: bytes) -> None:
    """Load `data` as the build's timing cache, or a fresh one when TensorRT cannot use it."""
    try:
        accepted = builder_config.set_timing_cache(_new_timing_cache(builder_config, data), ignore_mismatch=False)
    except RuntimeError:
        accepted = False
    if not accepted:
        log.warning("the timing cache was made by another TensorRT or GPU; timing every tactic afresh")
        builder_config.set_timing_cache(_new_timing_cache(builder_config, b""), ignore_mismatch=False)


def add_profiles(builder, builder_config, config: ModelConfig, profiles) -> None:
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile_shapes(config, profile).items():
            tensorrt_call(BuildError, f"the {profile.name} profile's shapes {low}…{high} for {name}",
                          "report it with the artifact's manifest", trt_profile.set_shape, name, low, opt, high)
        if builder_config.add_optimization_profile(trt_profile) < 0:
            raise BuildError(f"TensorRT refused the {profile.name} optimization profile (see its log above); "
                             "report it with the artifact's manifest")


def _builder_config(trt, builder, config: ModelConfig, profiles, options: EngineBuildOptions, cache: bytes):
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * 2**30))
    add_profiles(builder, builder_config, config, profiles)
    use_timing_cache(builder_config, cache)
    detailed_profiling(trt, builder_config, _report_dir(options))
    return builder_config


def _report_dir(options: EngineBuildOptions) -> Path | None:
    return Path(options.report_dir) if options.report_dir else None


def _run_tensorrt(onnx_path: Path, config: ModelConfig, profiles, options: EngineBuildOptions, cache: bytes):
    import tensorrt as trt

    logger = build_logger(trt, _report_dir(options))
    try:
        builder = trt.Builder(logger)
        network, _parser = _parse(trt, builder, logger, onnx_path)
        builder_config = _builder_config(trt, builder, config, profiles, options, cache)
        monitor = tensorrt_progress_monitor(trt, sys.stderr.isatty())  # alive until the build returns
        builder_config.progress_monitor = monitor
        log.info("building the TensorRT engine (minutes for a 7B model; the timing cache makes a rebuild quick)")
        plan = builder.build_serialized_network(network, builder_config)
        if plan is None:
            raise BuildError("TensorRT could not build the engine (its log above says why); "
                             "a larger --workspace-gb or a smaller --max-batch may help")
        write_layer_report(trt, logger, plan, _report_dir(options))
        return plan, builder_config.get_timing_cache().serialize()
    finally:
        close_logger(logger)


def build_engine(artifact: Path, options: EngineBuildOptions, tensorrt: str, gpu: GpuInfo,
                 previous_cache: bytes | None = None) -> EngineResult:
    """Add model.plan and the manifest's engine section to a built artifact; skipped when current."""
    manifest = read_manifest(artifact)
    problem = graph_problem(manifest.graph_flavour, manifest.quant is not None)
    if problem:
        raise BuildError(problem)
    profiles = optimization_profiles(manifest.config, manifest.max_context, options.max_batch)
    distribution = tensorrt_distribution()
    key = engine_key(manifest, tensorrt, gpu, profiles, options, distribution)
    if not options.force and engine_is_current(artifact, manifest.engine, key):
        return EngineResult(artifact, manifest.engine, reused=True)
    with build_lock(artifact):
        plan, cache = _run_tensorrt(artifact / names.MODEL_FILE, manifest.config, profiles, options,
                                    timing_cache_to_load(artifact, previous_cache))
        _write_atomically(artifact / names.ENGINE_FILE, plan)
        _write_atomically(artifact / names.TIMING_CACHE_FILE, cache)
        engine = EngineInfo(tensorrt_version=tensorrt, gpu_name=gpu.name, compute_capability=gpu.compute_capability,
                            max_batch=options.max_batch, profiles=profiles,
                            files=(digest_file(artifact, names.ENGINE_FILE),), build_key=key,
                            workspace_bytes=int(options.workspace_gb * 2**30),
                            tensorrt_distribution=distribution, cuda_runtime=cuda_runtime_version())
        updated = dataclasses.replace(manifest, engine=engine)
        _write_atomically(artifact / names.MANIFEST_FILE, updated.to_json().encode())
    return EngineResult(artifact, engine, reused=False)


def build_with_engine(options: BuildOptions, engine_options: EngineBuildOptions) -> tuple[BuildResult, EngineResult]:
    """Stage 3 then the engine; refuses before the (long) ONNX export when TensorRT or the GPU is missing."""
    options = resolve_graph(options, for_tensorrt=True)
    problem = graph_problem(options.graph, options.quant != "none")
    if problem:
        raise BuildError(problem)
    tensorrt, gpu = require_prerequisites()
    out = Path(options.out).expanduser().resolve()
    previous = previous_timing_cache(out)
    result = build(options)
    return result, build_engine(result.path, engine_options, tensorrt, gpu, previous)
