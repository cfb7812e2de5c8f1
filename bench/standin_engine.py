"""Benchmarks / hardware check: a stand-in for a TensorRT engine, to run the device-KV path where TensorRT is not.

`StandinEngine` interprets exactly the ONNX ops the standard graph emits (export/graph.py) on torch
tensors, and takes its inputs and outputs the way TensorRT's set_tensor_address / execute_async_v3
do: raw addresses (device memory on a GPU, host memory on the CPU), shapes from the bindings, work
queued on the backend's own stream. `StandinBackend` is the real DeviceKvBackend around it, on the
real CudaDevice on a GPU or on `HostDevice` (host memory, same interface) on the CPU; each step also
checks what a TensorRT engine would demand: a profile that covers it (profile_for), 256-byte aligned
addresses, and outputs exactly the shape of the buffers bound for them. torch lives here, in bench/,
never in the serving path. Any op outside the list is refused by name: the graph changed, extend it.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch

from llmpack.export.trt_build import optimization_profiles
from llmpack.runtime.backends.cuda_device import ALIGN
from llmpack.runtime.backends.device_kv import Binding, DeviceKvBackend, Step, fit_slots
from llmpack.runtime.backends.trt import output_shape_problem, profile_for
from llmpack.runtime.errors import BackendError
from llmpack.runtime.manifest import BuildManifest

ONNX_TO_TORCH = {1: torch.float32, 7: torch.int64, 9: torch.bool, 10: torch.float16}  # TensorProto codes
TYPESTR = {"float32": "<f4", "float16": "<f2", "int64": "<i8"}


# --- memory at an address ----------------------------------------------------------------------


class _CudaArray:
    """__cuda_array_interface__ over a raw device pointer, so torch aliases it without a copy."""

    def __init__(self, address: int, shape: tuple[int, ...], dtype: str):
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": TYPESTR[dtype],
                                         "data": (address, False), "version": 3, "strides": None}


def tensor_at(address: int, shape: tuple[int, ...], dtype: str, device: str) -> torch.Tensor:
    """The memory at `address` as a torch tensor (no copy): what TensorRT does with a bound address."""
    count = int(np.prod(shape))
    if count == 0:  # an empty past (the first chunk of a prompt): nothing to alias
        return torch.empty(shape, dtype=getattr(torch, dtype), device=device)
    if device == "cuda":
        return torch.as_tensor(_CudaArray(address, shape, dtype), device="cuda")
    raw = (ctypes.c_byte * (count * np.dtype(dtype).itemsize)).from_address(address)
    return torch.frombuffer(raw, dtype=getattr(torch, dtype), count=count).view(shape)


class HostDevice:
    """CudaDevice's interface on host memory: pointers are real addresses, copies are memmoves.

    `events` records synchronize/close so the teardown order can be checked.
    """

    stream_handle = 0

    def __init__(self, free_bytes: int = 1 << 30):
        self._buffers: list[np.ndarray] = []
        self.free_bytes, self.events = free_bytes, []

    def free_memory(self) -> int:
        return self.free_bytes

    def alloc(self, nbytes: int) -> int:
        buffer = np.zeros(max(nbytes, ALIGN) + ALIGN, np.uint8)
        self._buffers.append(buffer)
        address = buffer.ctypes.data
        return address + (-address) % ALIGN  # cudaMalloc's alignment

    def copy_2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int) -> None:
        for row in range(height):
            ctypes.memmove(dst + row * dst_pitch, src + row * src_pitch, width)

    def upload(self, dst: int, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        ctypes.memmove(dst, array.ctypes.data, array.nbytes)

    def download(self, out: np.ndarray, src: int) -> None:
        ctypes.memmove(out.ctypes.data, src, out.nbytes)

    def synchronize(self) -> None:
        self.events.append("synchronize")

    def close(self) -> None:
        self.events.append("close")
        self._buffers.clear()


# --- the interpreter -----------------------------------------------------------------------------


def _ints(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _reshape(x, shape):
    dims = [x.shape[i] if d == 0 else d for i, d in enumerate(_ints(shape))]  # 0 copies the input's dim
    return x.reshape(dims)


def _slice(x, starts, ends, axes=None, steps=None):
    index = [slice(None)] * x.dim()
    axes = _ints(axes) if axes is not None else list(range(len(_ints(starts))))
    steps = _ints(steps) if steps is not None else [1] * len(axes)
    for axis, start, end, step in zip(axes, _ints(starts), _ints(ends), steps):
        index[axis] = slice(start, end, step)
    return x[tuple(index)]


def _unsqueeze(x, axes):
    rank = x.dim() + len(_ints(axes))
    for axis in sorted(a % rank for a in _ints(axes)):
        x = x.unsqueeze(axis)
    return x


OPS = {
    "Add": lambda n, a, b: a + b, "Sub": lambda n, a, b: a - b, "Mul": lambda n, a, b: a * b,
    "Neg": lambda n, x: -x, "Sqrt": lambda n, x: torch.sqrt(x), "Reciprocal": lambda n, x: torch.reciprocal(x),
    "Cos": lambda n, x: torch.cos(x), "Sin": lambda n, x: torch.sin(x), "Sigmoid": lambda n, x: torch.sigmoid(x),
    "And": lambda n, a, b: a & b, "LessOrEqual": lambda n, a, b: a <= b,
    "Where": lambda n, c, a, b: torch.where(c, a, b),
    "MatMul": lambda n, a, b: torch.matmul(a, b),
    "Gather": lambda n, data, idx: torch.index_select(data, n.get("axis", 0), idx.reshape(-1)).reshape(
        *data.shape[: n.get("axis", 0)], *idx.shape, *data.shape[n.get("axis", 0) + 1:]),
    "Cast": lambda n, x: x.to(ONNX_TO_TORCH[n["to"]]),
    "Unsqueeze": lambda n, x, axes: _unsqueeze(x, axes),
    "Squeeze": lambda n, x, axes: x.reshape([d for i, d in enumerate(x.shape) if i not in
                                             {a % x.dim() for a in _ints(axes)}]),
    "Concat": lambda n, *xs: torch.cat(xs, dim=n["axis"]),
    "Shape": lambda n, x: torch.tensor(x.shape[n.get("start", 0): n.get("end", x.dim())], dtype=torch.int64,
                                       device=x.device),
    "Range": lambda n, start, limit, delta: torch.arange(int(start), int(limit), int(delta), dtype=start.dtype,
                                                         device=start.device),
    "ReduceMean": lambda n, x, axes: x.mean(dim=tuple(_ints(axes)), keepdim=bool(n.get("keepdims", 1))),
    "Reshape": lambda n, x, shape: _reshape(x, shape),
    "Transpose": lambda n, x: x.permute(*n["perm"]),
    "Slice": lambda n, x, *rest: _slice(x, *rest),
    "Softmax": lambda n, x: torch.softmax(x, dim=n.get("axis", -1)),
    "Tile": lambda n, x, repeats: x.repeat(*_ints(repeats)),
    "Gemm": lambda n, a, b: torch.matmul(a.t() if n.get("transA") else a, b.t() if n.get("transB") else b),
}


class StandinEngine:
    """The artifact's model.onnx, run op by op on torch tensors at the addresses it is bound to."""

    def __init__(self, model_path: Path, device: str):
        import onnx
        from onnx import helper, numpy_helper

        model = onnx.load(str(model_path))  # with model.onnx.data beside it
        self.device = device
        self.weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()).to(device)
                        for t in model.graph.initializer}
        unknown = sorted({node.op_type for node in model.graph.node} - set(OPS))
        if unknown:
            raise BackendError(f"the stand-in engine does not implement {', '.join(unknown)}; "
                               "extend bench/standin_engine.OPS")
        self.nodes = [(node.op_type, list(node.input), list(node.output),
                       {a.name: helper.get_attribute_value(a) for a in node.attribute}) for node in model.graph.node]
        self.outputs = [o.name for o in model.graph.output]
        if device == "cuda":
            torch.cuda.synchronize()  # the weights were copied on torch's stream; steps run on the backend's

    def run(self, bindings: list[Binding], stream_handle: int) -> None:
        """execute_async_v3: read the inputs at their addresses, write every output into its bound buffer."""
        if self.device != "cuda":
            return self._run(bindings)
        with torch.cuda.stream(torch.cuda.ExternalStream(stream_handle)):
            self._run(bindings)

    def _run(self, bindings: list[Binding]) -> None:
        values = dict(self.weights)
        values.update({b.name: tensor_at(b.address, b.shape, b.dtype, self.device) for b in bindings if b.is_input})
        for op, inputs, outputs, attrs in self.nodes:
            values[outputs[0]] = OPS[op](attrs, *(values[name] for name in inputs if name))
        bound = {b.name: b for b in bindings if not b.is_input}
        problem = output_shape_problem(list(bound.values()), lambda name: tuple(values[name].shape)) or \
            "; ".join(f"{n} is {values[n].dtype}, its buffer {b.dtype}" for n, b in bound.items()
                      if values[n].dtype != getattr(torch, b.dtype))
        if problem:  # TensorRT would have written past the buffer
            raise BackendError(f"the stand-in engine's outputs do not fit their buffers: {problem}")
        for name in self.outputs:
            b = bound[name]
            tensor_at(b.address, b.shape, b.dtype, self.device).copy_(values[name])


class StandinBackend(DeviceKvBackend):
    """DeviceKvBackend on the stand-in engine, with the TensorRT backend's profiles and checks on every step."""

    name = "standin"

    def __init__(self, artifact: Path, manifest: BuildManifest, device, engine_device: str, max_batch: int,
                 reserve_bytes: int = 0):
        self.engine = StandinEngine(Path(artifact) / "model.onnx", engine_device)
        self.profiles = optimization_profiles(manifest.config, manifest.max_context, max_batch)
        self.max_step_tokens = max(p.seq[2] for p in self.profiles)
        self.profile_steps = [0] * len(self.profiles)  # steps run on each profile
        super().__init__(manifest, device, fit_slots(manifest, device.free_memory(), max_batch, reserve_bytes))

    def _execute(self, step: Step, bindings: list[Binding]) -> None:
        index = profile_for(self.profiles, len(step.batch.slots), step.seq, step.batch.width)
        self.profile_steps[index] += 1
        misaligned = [b.name for b in bindings if b.address % ALIGN]
        if misaligned:
            raise BackendError(f"addresses not {ALIGN}-byte aligned: {', '.join(misaligned[:3])}")
        mask = next(b for b in bindings if b.name == "attention_mask")
        if mask.shape[1] != step.batch.width + step.seq:  # the profiles keep mask = past + seq at every point
            raise BackendError(f"attention mask of {mask.shape[1]} for {step.batch.width} cached + {step.seq} new")
        self.engine.run(bindings, self.device.stream_handle)

    def _release(self) -> None:
        if self.engine is not None and self.engine.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # blocks cached for this backend's stream, which close() destroys next
        self.engine = None
        getattr(self.device, "events", []).append("release engine")  # HostDevice keeps the teardown order
