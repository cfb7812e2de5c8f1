"""Export stage 2 helper: a minimal ONNX graph writer that streams weights to external data.

Every large initializer goes straight to `model.onnx.data` as it is produced, so the protobuf stays
small (no 2 GB limit) and peak memory is one tensor, not the model.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INLINE_LIMIT = 1024  # bytes: smaller constants stay inside the protobuf
ALIGNMENT = 64  # keep external tensors aligned for mmap-friendly loading

NP_TO_ONNX = {
    np.dtype("float32"): TensorProto.FLOAT,
    np.dtype("float16"): TensorProto.FLOAT16,
    np.dtype("int64"): TensorProto.INT64,
    np.dtype("int32"): TensorProto.INT32,  # GroupQueryAttention's sequence lengths
    np.dtype("uint8"): TensorProto.UINT8,  # MatMulNBits' packed weight codes
    np.dtype("bool"): TensorProto.BOOL,
}


class GraphWriter:
    """Collects nodes and initializers; `add` returns the output name so graphs read like code."""

    def __init__(self, data_path: Path):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._data_path = Path(data_path)
        self._data = open(self._data_path, "wb")
        self._offset = 0
        self._ids = itertools.count()
        self._constants: dict[tuple, str] = {}

    def close(self) -> None:
        if not self._data.closed:
            self._data.close()

    def add(self, op: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        out = name or f"{op.lower()}_{next(self._ids)}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"n_{out}", **attrs))
        return out

    def add_multi(self, op: str, inputs: list[str], n_out: int, **attrs) -> list[str]:
        index = next(self._ids)
        outs = [f"{op.lower()}_{index}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=f"n_{op}_{index}", **attrs))
        return outs

    def constant(self, value, dtype) -> str:
        """A small constant initializer, deduplicated by value."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = f"const_{len(self._constants)}"
            self.initializers.append(numpy_helper.from_array(array, name))
            self._constants[key] = name
        return self._constants[key]

    def weight(self, name: str, array: np.ndarray) -> str:
        """A weight initializer; its bytes go to the external data file right away."""
        array = np.ascontiguousarray(array)
        if array.nbytes <= INLINE_LIMIT:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        pad = (-self._offset) % ALIGNMENT
        if pad:
            self._data.write(b"\0" * pad)
            self._offset += pad
        self._data.write(array.tobytes())
        tensor = TensorProto(name=name, data_type=NP_TO_ONNX[array.dtype], dims=array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", self._data_path.name),
            ("offset", str(self._offset)),
            ("length", str(array.nbytes)),
        ):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self._offset += array.nbytes
        self.initializers.append(tensor)
        return name

    def finish(self, inputs, outputs, opset: int, path: Path, doc: str) -> onnx.ModelProto:
        self.close()
        graph = helper.make_graph(self.nodes, "llmpack_llama_decoder", inputs, outputs, self.initializers)
        # ONNX Runtime's contrib ops (MatMulNBits, GroupQueryAttention…) live in their own domain, version 1.
        domains = sorted({node.domain for node in self.nodes if node.domain})
        opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="llmpack")
        model.ir_version = 10
        model.doc_string = doc
        onnx.save_model(model, str(path))
        return model


def value_info(name: str, dtype: str, shape: tuple) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, NP_TO_ONNX[np.dtype(dtype)], list(shape))
