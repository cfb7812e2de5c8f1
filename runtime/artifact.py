"""Generation stage 1: open an artifact folder — read the manifest, check its files, pick a backend."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llmpack.runtime import manifest as names
from llmpack.runtime.backends.cuda_device import GPU_EXTRA, GpuInfo, probe_gpu, tensorrt_version
from llmpack.runtime.backends.huge_pages import back_with_huge_pages, mapped_ranges
from llmpack.runtime.backends.interface import Backend
from llmpack.runtime.backends.ort_install import import_onnxruntime
from llmpack.runtime.backends.trt import engine_problem
from llmpack.runtime.errors import ArtifactError
from llmpack.runtime.manifest import BuildManifest, check_artifact_files, read_manifest

log = logging.getLogger("llmpack.runtime")

BACKENDS = ("auto", "cpu", "cuda", "tensorrt")
CUDA_PROVIDER = "CUDAExecutionProvider"


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: BuildManifest

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest.tokenizer_file

    @property
    def chat_template_path(self) -> Path:
        return self.path / names.CHAT_TEMPLATE_FILE


def open_artifact(path: Path | str, verify_checksums: bool = True) -> Artifact:
    """Load the manifest and refuse a damaged artifact; skipping the hashes is logged, never silent."""
    folder = Path(path).expanduser().resolve()
    manifest = read_manifest(folder)
    if not verify_checksums:
        log.warning("checksum verification of %s skipped on request (sizes are still checked)", folder)
    check_artifact_files(folder, manifest, verify_checksums=verify_checksums)
    return Artifact(folder, manifest)


def ort_providers() -> tuple[str, ...]:
    return tuple(import_onnxruntime().get_available_providers())


@dataclass(frozen=True)
class Probes:
    """How backend selection asks this machine what it has; tests pass fakes to simulate other machines."""

    tensorrt_version: Callable[[], str | None] = tensorrt_version
    gpu: Callable[[], GpuInfo | str] = probe_gpu  # the first GPU, or why there is none
    ort_providers: Callable[[], tuple[str, ...]] = ort_providers


def _cuda_problem(manifest: BuildManifest, probes: Probes) -> str | None:
    if manifest.graph_flavour != names.STANDARD_GRAPH:  # the device KV cache follows the standard graph's interface
        return f"the CUDA backend runs the standard graph, this artifact's is {manifest.graph_flavour!r}"
    if CUDA_PROVIDER not in probes.ort_providers():
        return (f"onnxruntime has no {CUDA_PROVIDER} (the CPU build is installed): "
                f"pip uninstall onnxruntime, then {GPU_EXTRA}")
    gpu = probes.gpu()
    return gpu if isinstance(gpu, str) else None


def select_backend(requested: str, artifact: Artifact, probes: Probes = Probes()) -> tuple[str, str]:
    """(backend, why): auto takes TensorRT when the artifact's engine can run here, else CUDA, else the CPU."""
    if requested not in BACKENDS:
        raise ArtifactError(f"backend {requested!r} is not available; choose one of {', '.join(BACKENDS)}")
    if requested == "cpu":
        return "cpu", "requested"
    probes = Probes(*(functools.cache(getattr(probes, f.name)) for f in dataclasses.fields(Probes)))  # ask once
    problems = {
        "tensorrt": lambda: engine_problem(artifact.manifest, artifact.path, probes.tensorrt_version(), probes.gpu()),
        "cuda": lambda: _cuda_problem(artifact.manifest, probes),
    }
    if requested != "auto":
        problem = problems[requested]()
        if problem:
            raise ArtifactError(f"--backend {requested} cannot run {artifact.path.name}: {problem}")
        return requested, "requested"
    if artifact.manifest.engine is None:  # the common CPU case: no need to look for TensorRT at all
        problems["tensorrt"] = lambda: "no TensorRT engine in the artifact"
    skipped = []
    for name, problem in problems.items():
        reason = problem()
        if reason is None:
            return name, "auto" + "".join(f"; not {s}" for s in skipped)
        skipped.append(f"{name}: {reason}")
    return "cpu", "auto" + "".join(f"; not {s}" for s in skipped)


def open_backend(artifact: Artifact, backend: str = "auto", threads: int | None = None, max_batch: int = 1,
                 probes: Probes = Probes(), mixed_steps: bool = True, huge_pages: bool = True) -> Backend:
    """The backend that will run this artifact; the decode loop sees only the Backend interface.

    `huge_pages`: CPU backends move their loaded weights onto 2 MiB pages (runtime/backends/huge_pages.py).
    """
    chosen, why = select_backend(backend, artifact, probes)
    before = mapped_ranges() if huge_pages and chosen == "cpu" else None
    if chosen == "tensorrt":
        from llmpack.runtime.backends.trt import TrtBackend

        instance = TrtBackend(artifact.path, artifact.manifest, max_batch=max_batch)
    elif chosen == "cuda":
        from llmpack.runtime.backends.ort_cuda import OrtCudaBackend

        instance = OrtCudaBackend(artifact.path, artifact.manifest, max_batch=max_batch)
    elif artifact.manifest.graph_flavour == names.FUSED_GRAPH:  # contrib ops + in-place KV cache
        from llmpack.runtime.backends.ort_fused import OrtFusedBackend

        instance = OrtFusedBackend(artifact.path, artifact.manifest, threads=threads, max_batch=max_batch,
                                   mixed_steps=mixed_steps)
    else:
        from llmpack.runtime.backends.ort_cpu import OrtBackend

        instance = OrtBackend(artifact.path, artifact.manifest, threads=threads, max_batch=max_batch)
    if before is not None:
        back_with_huge_pages(before)
    log.info("backend %s for %s (%s)", instance.name, artifact.path.name, why)
    return instance
