"""Generation stage 2 (GPU): the CUDA device through cuda-python — probe, memory, one stream, copies.

cuda-python is imported inside functions: importing this module on a machine without CUDA is fine.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib import metadata

import numpy as np

from llmpack.runtime.errors import BackendError

ALIGN = 256  # cudaMalloc's alignment
GPU_EXTRA = "pip install 'llmpack[gpu]'"


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "major.minor"
    memory_bytes: int


def cudart():
    """cuda-python's runtime API (imported here, never at module load: CPU machines lack it)."""
    from cuda.bindings import runtime

    return runtime


def cuda_call(result):
    """cuda-python returns (error, *values): raise on an error, else the value(s)."""
    error, *values = result
    if _code(error) != 0:
        raise BackendError(f"CUDA call failed: {getattr(error, 'name', error)}")
    return values[0] if len(values) == 1 else tuple(values)


def _code(error) -> int:
    return int(getattr(error, "value", error))  # cuda-python's error enums, across its releases


def probe_gpu() -> GpuInfo | str:
    """The first CUDA device, or why there is none (a sentence for the user)."""
    try:
        rt = cudart()
    except ImportError:
        if shutil.which("nvidia-smi") is None:  # without cuda-python, the driver's tool tells if a GPU is likely
            return "no NVIDIA GPU driver was found (no nvidia-smi)"
        return f"cuda-python is not installed ({GPU_EXTRA})"
    error, count = rt.cudaGetDeviceCount()
    if _code(error) != 0 or count == 0:
        return (f"no NVIDIA GPU is visible to CUDA ({getattr(error, 'name', error)}); "
                "check the driver and CUDA_VISIBLE_DEVICES")
    props = cuda_call(rt.cudaGetDeviceProperties(0))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(name.rstrip("\0").strip(), f"{props.major}.{props.minor}", int(props.totalGlobalMem))


class CudaDevice:
    """Device memory and one CUDA stream through cuda-python; every copy and engine call goes on it."""

    def __init__(self):
        self.rt = cudart()
        cuda_call(self.rt.cudaSetDevice(0))
        self.stream = cuda_call(self.rt.cudaStreamCreate())
        self._allocations: list[int] = []

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def free_memory(self) -> int:
        return int(cuda_call(self.rt.cudaMemGetInfo())[0])

    def alloc(self, nbytes: int) -> int:
        pointer = int(cuda_call(self.rt.cudaMalloc(max(nbytes, ALIGN))))
        self._allocations.append(pointer)
        return pointer

    def copy_2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        cuda_call(self.rt.cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, height, kind, self.stream))

    def upload(self, dst: int, array: np.ndarray) -> None:
        # From pageable memory the call returns once the data is staged, so `array` may go right after.
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        cuda_call(self.rt.cudaMemcpyAsync(dst, array.ctypes.data, array.nbytes, kind, self.stream))

    def download(self, out: np.ndarray, src: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_call(self.rt.cudaMemcpyAsync(out.ctypes.data, src, out.nbytes, kind, self.stream))
        cuda_call(self.rt.cudaStreamSynchronize(self.stream))

    def synchronize(self) -> None:
        cuda_call(self.rt.cudaStreamSynchronize(self.stream))

    def close(self) -> None:
        self.synchronize()
        for pointer in self._allocations:
            cuda_call(self.rt.cudaFree(pointer))
        self._allocations.clear()
        cuda_call(self.rt.cudaStreamDestroy(self.stream))


def tensorrt_version() -> str | None:
    """TensorRT's version, or None when it cannot be imported here."""
    try:
        import tensorrt
    except (ImportError, OSError):  # OSError: the wheel is there, its CUDA libraries are not
        return None
    return tensorrt.__version__


def tensorrt_distribution(version=metadata.version) -> str:
    """The TensorRT wheel installed here ("tensorrt-cu13"), "" when pip knows none: its CUDA major is in the name."""
    for cuda in (13, 12, 11):
        for name in (f"tensorrt-cu{cuda}", f"tensorrt-cu{cuda}-bindings"):
            try:
                version(name)
            except metadata.PackageNotFoundError:
                continue
            return f"tensorrt-cu{cuda}"
    return ""


def cuda_runtime_version() -> str:
    """The CUDA runtime cuda-python talks to, "13.0"; "" without cuda-python."""
    try:
        number = int(cuda_call(cudart().cudaRuntimeGetVersion()))
    except (ImportError, BackendError):
        return ""
    return f"{number // 1000}.{number % 1000 // 10}"
