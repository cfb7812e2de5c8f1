"""Backends wing: which ONNX Runtime build is installed — the CPU one, the GPU one, neither or (broken) both.

`onnxruntime` and `onnxruntime-gpu` are two distributions of one `onnxruntime/` package: installed
together, the second overwrites the first's files and the CUDA provider can disappear (onnxruntime
issues #26996, #7748). pip cannot forbid that (pyproject's `cpu` and `gpu` extras explain why), so
the backends ask here first and say, in one line, what to uninstall.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib import metadata

from llmpack.runtime.backends.cuda_device import GPU_EXTRA
from llmpack.runtime.errors import ArtifactError

log = logging.getLogger("llmpack.runtime")

BUILDS = ("onnxruntime", "onnxruntime-gpu")
CPU_EXTRA = "pip install 'llmpack[cpu]'"


def installed_builds(version: Callable[[str], str] = metadata.version) -> tuple[str, ...]:
    """The ONNX Runtime distributions installed here, by name."""
    found = []
    for name in BUILDS:
        try:
            version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return tuple(found)


def install_problem(builds: tuple[str, ...]) -> str | None:
    """Why this ONNX Runtime install cannot be trusted (a sentence ending with the fix), or None."""
    if not builds:
        return f"ONNX Runtime is not installed; {CPU_EXTRA} (or {GPU_EXTRA} on an NVIDIA GPU machine)"
    if len(builds) > 1:
        return ("both onnxruntime and onnxruntime-gpu are installed and overwrite each other's files; "
                f"pip uninstall -y onnxruntime onnxruntime-gpu, then {GPU_EXTRA} (or {CPU_EXTRA})")
    return None


def import_onnxruntime(builds: Callable[[], tuple[str, ...]] = installed_builds):
    """The onnxruntime module, or an ArtifactError that says which build to install."""
    problem = install_problem(builds())
    if problem and "not installed" not in problem:
        raise ArtifactError(problem)
    try:
        import onnxruntime
    except ImportError as exc:  # installed by other means than pip, or not at all
        raise ArtifactError(install_problem(()) or str(exc)) from exc
    return onnxruntime


def preload_cuda_libraries(ort) -> None:
    """Load CUDA and cuDNN from the pip wheels (the gpu extra's nvidia-* packages) before a CUDA session.

    onnxruntime-gpu dlopens them lazily from the system paths; without this call a machine whose CUDA
    libraries came from pip only fails the session with a missing libcudnn. Older builds lack it.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        log.info("this onnxruntime has no preload_dlls(); CUDA and cuDNN come from the system library paths")
        return
    preload()
