"""Export stage 2b, `ort-fused` artifacts: mixed.onnx, a decode step and a prompt chunk in ONE weight pass.

While others decode, a joining prompt used to cost its own pass over every weight (on 2 cores:
~25 ms + 1.2 ms per token, against a ~40 ms batch-8 decode step), so each chunk stalled the whole
batch for a full extra step. This graph feeds the decode batch's tokens and the chunk's tokens as
one row of B + S tokens through every MatMul and norm, and splits them only for attention: one
GroupQueryAttention over the decode rows, one over the chunk's row (the same cache buffer, bound
at that row). It is rewritten from model.onnx rather than built again, so its initializers point
at the same model.onnx.data: no second copy of the weights on disk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llmpack.export.fused_graph import LAST_HIDDEN, LAST_RESIDUAL
from llmpack.runtime import manifest as names
from llmpack.runtime.backends import fused_interface as fused

GQA = "GroupQueryAttention"


class MixedGraphRewriter:
    """Turns the fused decoder into the mixed-step decoder, node by node, keeping every weight."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.graph = model, model.graph
        self.nodes: list[onnx.NodeProto] = []
        self._constants: dict[str, TensorProto] = {}

    def constant(self, name: str, values) -> str:
        """A small int64 constant, written once however many layers use it."""
        full = f"mixed.{name}"
        self._constants.setdefault(full, numpy_helper.from_array(np.asarray(values, dtype=np.int64), full))
        return full

    def node(self, op: str, inputs: list[str], outputs: list[str], **attrs) -> None:
        domain = "com.microsoft" if op == GQA else ""
        self.nodes.append(helper.make_node(op, inputs, outputs, name=f"mixed.{outputs[0]}", domain=domain, **attrs))

    def prologue(self) -> None:
        """Every token in one row: decode ids [B, 1] then the chunk's [1, S]; and the split sizes [B, S]."""
        self.node("Reshape", [names.INPUT_IDS, self.constant("row", [1, -1])], ["mixed.decode_row"])
        self.node("Concat", ["mixed.decode_row", fused.CHUNK_IDS], ["mixed.all_ids"], axis=1)
        self.node("Shape", [names.INPUT_IDS], ["mixed.decode_count"], start=0, end=1)
        self.node("Shape", [fused.CHUNK_IDS], ["mixed.chunk_count"], start=1, end=2)
        self.node("Concat", ["mixed.decode_count", "mixed.chunk_count"], ["mixed.split"], axis=0)

    def attention(self, gqa: onnx.NodeProto) -> None:
        """One GroupQueryAttention becomes two: the decode rows [B, 1, ·] and the chunk row [1, S, ·]."""
        qkv, _, _, past_key, past_value, _, _, cos, sin = gqa.input
        context, present_key, present_value = gqa.output
        decode_qkv, chunk_qkv = f"{qkv}.decode", f"{qkv}.chunk"
        self.node("Split", [qkv, "mixed.split"], [decode_qkv, chunk_qkv], axis=1)
        self.node("Reshape", [decode_qkv, self.constant("per_row", [-1, 1, 0])], [f"{decode_qkv}.rows"])
        attrs = {a.name: helper.get_attribute_value(a) for a in gqa.attribute}
        self.node(GQA, [f"{decode_qkv}.rows", "", "", past_key, past_value, fused.SEQLENS_K,
                        fused.TOTAL_SEQUENCE_LENGTH, cos, sin], [f"{context}.decode", present_key, present_value],
                  **attrs)
        self.node(GQA, [chunk_qkv, "", "", fused.chunk_name(past_key), fused.chunk_name(past_value),
                        fused.CHUNK_SEQLENS_K, fused.CHUNK_TOTAL_SEQUENCE_LENGTH, cos, sin],
                  [f"{context}.chunk", fused.chunk_name(present_key), fused.chunk_name(present_value)], **attrs)
        self.node("Reshape", [f"{context}.decode", self.constant("one_row", [1, -1, 0])], [f"{context}.decode_row"])
        self.node("Concat", [f"{context}.decode_row", f"{context}.chunk"], [context], axis=1)

    def last_positions(self, sliced: onnx.NodeProto) -> None:
        """The head reads the decode rows' positions and the chunk's last: [1, B + 1, hidden]."""
        source, out = sliced.input[0], sliced.output[0]
        zero, last, end, axis = (self.constant(n, v) for n, v in
                                 (("zero", [0]), ("last", [-1]), ("end", [2**62]), ("seq_axis", [1])))
        self.node("Slice", [source, zero, "mixed.decode_count", axis], [f"{out}.decode"])
        self.node("Slice", [source, last, end, axis], [f"{out}.chunk"])
        self.node("Concat", [f"{out}.decode", f"{out}.chunk"], [out], axis=1)

    def rewrite(self) -> onnx.ModelProto:
        self.prologue()
        for node in self.graph.node:
            if fused.NUM_LOGITS in node.input:
                continue  # the mixed step's head reads its own rows (last_positions): no num_logits
            if node.op_type == GQA:
                self.attention(node)
            elif node.output[0] in (LAST_HIDDEN, LAST_RESIDUAL):
                self.last_positions(node)
            else:
                if node.op_type == "Gather" and node.input[1] == names.INPUT_IDS:
                    node.input[1] = "mixed.all_ids"
                self.nodes.append(node)
        del self.graph.node[:]
        self.graph.node.extend(self.nodes)
        self.graph.initializer.extend(self._constants.values())
        self._interface()
        return self.model

    def _interface(self) -> None:
        g, batch = self.graph, names.AXIS_BATCH
        for value in [v for v in g.input if v.name == fused.NUM_LOGITS]:
            g.input.remove(value)
        chunk_inputs = [helper.make_tensor_value_info(fused.CHUNK_IDS, TensorProto.INT64, [1, fused.AXIS_CHUNK]),
                        helper.make_tensor_value_info(fused.CHUNK_SEQLENS_K, TensorProto.INT32, [1]),
                        helper.make_tensor_value_info(fused.CHUNK_TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, [])]
        chunk_inputs += [_chunk_value(v) for v in g.input if v.name.startswith("past_key_values.")]
        g.input.extend(chunk_inputs)
        g.output.extend([_chunk_value(v) for v in g.output if v.name.startswith("present.")])
        for value in (*g.input, *g.output):
            if value.name in (names.INPUT_IDS, names.LOGITS, fused.SEQLENS_K) or value.name.startswith(
                    ("past_key_values.", "present.")):
                value.type.tensor_type.shape.dim[0].dim_param = batch
        logits = next(v for v in g.output if v.name == names.LOGITS)
        logits.type.tensor_type.shape.dim[0].dim_param = "batch_plus_1"


def _chunk_value(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    """The chunk row's cache tensor: the same type and shape, batch 1."""
    chunk = onnx.ValueInfoProto()
    chunk.CopyFrom(value)
    chunk.name = fused.chunk_name(value.name)
    chunk.type.tensor_type.shape.dim[0].ClearField("dim_param")
    chunk.type.tensor_type.shape.dim[0].dim_value = 1
    return chunk


def write_mixed_graph(folder: Path) -> None:
    """Write folder/mixed.onnx from folder/model.onnx (fused flavour); the weights stay in model.onnx.data."""
    model = onnx.load(str(Path(folder) / names.MODEL_FILE), load_external_data=False)
    mixed = MixedGraphRewriter(model).rewrite()
    mixed.doc_string = model.doc_string + "; mixed step: a decode batch and a prompt chunk in one pass"
    onnx.save_model(mixed, str(Path(folder) / fused.MIXED_MODEL_FILE))
