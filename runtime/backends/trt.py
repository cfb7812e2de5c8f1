"""Generation stage 2 (GPU): the TensorRT backend — the artifact's model.plan on an NVIDIA GPU.

A plan only loads with the TensorRT version and on the GPU compute capability it was built for, so
the manifest's engine section is checked against this machine before TensorRT sees the bytes: a
mismatch is an ArtifactError that says to rebuild, never a crash inside TensorRT. One execution
context per optimization profile (prefill, decode); both share one scratch allocation because they
run one after the other on the one stream. The KV cache lives on the device (device_kv.py).
"""

from __future__ import annotations

import logging
import mmap
from pathlib import Path

import numpy as np

from llmpack.runtime.backends.cuda_device import (
    GPU_EXTRA,
    CudaDevice,
    GpuInfo,
    probe_gpu,
    tensorrt_distribution,
    tensorrt_version,
)
from llmpack.runtime.backends.device_kv import Binding, DeviceKvBackend, Step, fit_slots
from llmpack.runtime.errors import ArtifactError, BackendError
from llmpack.runtime.manifest import BuildManifest, EngineProfile, sha256_file

log = logging.getLogger("llmpack.runtime")

RESERVE_BYTES = 1 << 30  # left free after the KV cache: cuBLAS workspaces, the logits, fragmentation


def rebuild_command(manifest: BuildManifest, artifact: Path | str) -> str:
    engine = manifest.engine
    batch = f" --max-batch {engine.max_batch}" if engine else ""
    return (f"llm-export build --model {manifest.source.path} --out {artifact} --dtype {manifest.dtype} "
            f"--max-context {manifest.max_context} --engine trt{batch}")


def engine_problem(manifest: BuildManifest, artifact: Path | str, tensorrt: str | None,
                   gpu: GpuInfo | str) -> str | None:
    """Why this artifact's engine cannot run on this machine (a sentence that ends with the fix), or None."""
    engine = manifest.engine
    rebuild = f"engines are not portable, rebuild it on this machine: `{rebuild_command(manifest, artifact)}`"
    if engine is None:
        return f"{artifact} has no TensorRT engine; build one with `{rebuild_command(manifest, artifact)}`"
    if tensorrt is None:
        return f"TensorRT is not installed ({GPU_EXTRA})"
    if isinstance(gpu, str):
        return gpu
    if engine.tensorrt_version != tensorrt:
        return (f"its TensorRT engine was built with TensorRT {engine.tensorrt_version} and this machine has "
                f"TensorRT {tensorrt}; {rebuild}")
    if engine.compute_capability != gpu.compute_capability:
        return (f"its TensorRT engine was built for {engine.gpu_name} (compute capability "
                f"{engine.compute_capability}) and this GPU is {gpu.name} ({gpu.compute_capability}); {rebuild}")
    if engine.gpu_name != gpu.name:
        log.warning("engine built on %s, running on %s (same compute capability): it loads, but may be slower; "
                    "rebuild on this GPU for its best tactics", engine.gpu_name, gpu.name)
    return None


def distribution_problem(manifest: BuildManifest, artifact: Path | str, installed: str) -> str | None:
    """An engine from the cu12 wheel on a cu13 install (or back) has the same version string: the wheel differs."""
    built = manifest.engine.tensorrt_distribution if manifest.engine else ""
    if not built or not installed or built == installed:
        return None  # older manifests do not record it
    return (f"its TensorRT engine was built with {built} and this machine has {installed}; engines are not "
            f"portable, rebuild it on this machine: `{rebuild_command(manifest, artifact)}`")


def profile_for(profiles: tuple[EngineProfile, ...], batch: int, seq: int, past: int) -> int:
    """The optimization profile for a step: of those that cover it, the one tuned (opt) nearest its length."""
    covering = [i for i, p in enumerate(profiles) if p.covers(batch, seq, past)]
    if not covering:
        raise BackendError(f"no TensorRT optimization profile covers batch {batch}, {seq} new tokens after "
                           f"{past} cached; the engine's profiles are {[p.name for p in profiles]}")
    return min(covering, key=lambda i: abs(profiles[i].seq[1] - seq))


def io_problem(engine_io: dict[str, tuple[bool, str]], manifest: BuildManifest) -> str | None:
    """Compare the engine's tensors (name → (is_input, numpy dtype)) with the graph interface in the manifest."""
    expected = {t.name: (True, t.dtype) for t in manifest.inputs} | {t.name: (False, t.dtype) for t in manifest.outputs}
    missing = sorted(set(expected) - set(engine_io))
    if missing:
        return f"the engine lacks tensor(s) {', '.join(missing[:4])}"
    wrong = [f"{n} is {engine_io[n][1]}, expected {dtype}" for n, (_, dtype) in expected.items()
             if engine_io[n][1] != dtype]
    wrong += [f"{n} is an {'input' if engine_io[n][0] else 'output'}" for n, (mode, _) in expected.items()
              if engine_io[n][0] != mode]
    return "; ".join(wrong[:4]) or None


def tensorrt_call(error, what: str, fix: str, call, *args):
    """Run a TensorRT call that reports failure by returning False or, in its Python bindings, by raising
    RuntimeError (set_input_shape, set_optimization_profile_async, set_shape): either way one line, `error`."""
    try:
        ok, why = call(*args), ""
    except RuntimeError as exc:
        ok, why = False, " ".join(str(exc).split())
    if ok is False:  # None is success for the calls that return nothing (set_shape)
        raise error(f"TensorRT refused {what}{f' ({why})' if why else ''}; {fix}")
    return ok


def output_shape_problem(bindings: list[Binding], engine_shape) -> str | None:
    """Outputs whose shape TensorRT infers (engine_shape(name)) differ from the buffer device_kv bound: the
    engine would write past that buffer without a word, so the first step of each profile compares them."""
    wrong = [f"{b.name} is {tuple(engine_shape(b.name))}, its buffer {b.shape}"
             for b in bindings if not b.is_input and tuple(engine_shape(b.name)) != tuple(b.shape)]
    return "; ".join(wrong[:3]) or None


def check_engine_file(artifact: Path, manifest: BuildManifest) -> Path:
    digest = manifest.engine.files[0]
    path = artifact / digest.path
    if not path.is_file() or path.stat().st_size != digest.size or sha256_file(path) != digest.sha256:
        raise ArtifactError(f"{path} is missing or differs from the manifest; "
                            f"rebuild it: `{rebuild_command(manifest, artifact)}`")
    return path


class TrtBackend(DeviceKvBackend):
    """The Backend protocol on a TensorRT engine; see device_kv.DeviceKvBackend for the cache."""

    name = "tensorrt"

    def __init__(self, artifact: Path, manifest: BuildManifest, max_batch: int = 1):
        problem = engine_problem(manifest, artifact, tensorrt_version(), probe_gpu()) or \
            distribution_problem(manifest, artifact, tensorrt_distribution())
        if problem:  # before TensorRT reads a byte: a foreign plan must not crash it
            raise ArtifactError(f"cannot run the TensorRT engine of {artifact}: {problem}")
        plan = check_engine_file(Path(artifact), manifest)
        import tensorrt as trt

        device = CudaDevice()
        self._trt, self._logger = trt, trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)  # outlives the engine it deserialized (released last)
        self.engine = self._deserialize(plan, manifest, artifact)
        self._contexts = self._create_contexts(device)
        self._shapes_checked: set[int] = set()  # profiles whose output shapes were compared with the buffers
        self.max_step_tokens = max(p.seq[2] for p in manifest.engine.profiles)
        wanted = min(max_batch, manifest.engine.max_batch)
        if wanted < max_batch:
            log.warning("the engine was built for batches of up to %d; rebuild with --max-batch %d for more",
                        manifest.engine.max_batch, max_batch)
        super().__init__(manifest, device, fit_slots(manifest, device.free_memory(), wanted, RESERVE_BYTES))

    def _deserialize(self, plan: Path, manifest: BuildManifest, artifact: Path):
        trt = self._trt
        with open(plan, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            engine = self._runtime.deserialize_cuda_engine(data)  # mapped, not read: a 7B plan is 13 GiB
        if engine is None:
            raise ArtifactError(f"TensorRT could not load {plan} (see its log above); "
                                f"rebuild it: `{rebuild_command(manifest, artifact)}`")
        tensors = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            tensors[name] = (engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                             np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name)
        problem = io_problem(tensors, manifest)
        if problem:
            raise ArtifactError(f"{plan} does not match the artifact's graph ({problem}); "
                                f"rebuild it: `{rebuild_command(manifest, artifact)}`")
        return engine

    def _create_contexts(self, device: CudaDevice) -> list:
        strategy = self._trt.ExecutionContextAllocationStrategy.USER_MANAGED
        size = self.engine.device_memory_size_v2
        scratch = device.alloc(size)
        contexts = []
        for index in range(self.engine.num_optimization_profiles):
            context = self.engine.create_execution_context(strategy)
            if context is None:
                raise ArtifactError("TensorRT could not create an execution context (see its log above)")
            context.set_device_memory(scratch, size)
            tensorrt_call(ArtifactError, f"optimization profile {index}", "rebuild the engine on this machine",
                          context.set_optimization_profile_async, index, device.stream_handle)
            contexts.append(context)
        return contexts

    def _execute(self, step: Step, bindings: list[Binding]) -> None:
        profiles = self.manifest.engine.profiles
        index = profile_for(profiles, len(step.batch.slots), step.seq, step.batch.width)
        context = self._contexts[index]
        for binding in bindings:
            if binding.is_input:
                tensorrt_call(BackendError, f"shape {binding.shape} for {binding.name}",
                              f"the {profiles[index].name} profile does not take it; rebuild the engine",
                              context.set_input_shape, binding.name, binding.shape)
            tensorrt_call(BackendError, f"the address of {binding.name}", "see its log above",
                          context.set_tensor_address, binding.name, binding.address)
        if index not in self._shapes_checked:
            self._check_output_shapes(context, bindings)
            self._shapes_checked.add(index)
        tensorrt_call(BackendError, "to run the step", "see its log above",
                      context.execute_async_v3, self.device.stream_handle)

    def _check_output_shapes(self, context, bindings: list[Binding]) -> None:
        missing = tensorrt_call(BackendError, "to infer the output shapes", "see its log above",
                                context.infer_shapes)  # names of tensors it still lacks; empty when all are known
        problem = (f"inputs {', '.join(missing)} have no shape" if missing else
                   output_shape_problem(bindings, context.get_tensor_shape))
        if problem:
            raise BackendError(f"the TensorRT engine's outputs do not fit the KV buffers ({problem}); "
                               "rebuild the engine from this artifact")

    def _release(self) -> None:
        # Contexts before the engine before the runtime; all of them before the memory and stream they use.
        self._contexts = []
        self.engine = None
        self._runtime = None
