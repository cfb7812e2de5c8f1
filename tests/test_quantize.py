"""Export stage, `--quant`: MatMulNBits packing vs a numpy reference, quantized artifacts' quality, manifest fields."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from llmpack.export.build import BuildOptions, build, resolve_source
from llmpack.export.quality import THRESHOLDS, compare
from llmpack.export.quantize import QuantSpec, auto_block_size, dequantize, pack, quantize, unpack
from llmpack.export.verify import verify
from llmpack.runtime import manifest as names
from llmpack.runtime.artifact import open_artifact
from llmpack.runtime.errors import BuildError, CheckpointError
from llmpack.runtime.manifest import BuildManifest, read_manifest


def matmul_nbits(q, spec: QuantSpec, a: np.ndarray) -> np.ndarray:
    """Run ONNX Runtime's MatMulNBits alone on the packed weight."""
    inits = [numpy_helper.from_array(q.codes, "B"), numpy_helper.from_array(q.scales, "scales")]
    inputs = ["A", "B", "scales"]
    if q.zero_points is not None:
        inits.append(numpy_helper.from_array(q.zero_points, "zp"))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=q.k, N=q.n, bits=spec.bits,
                            block_size=spec.block_size, accuracy_level=spec.accuracy_level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", 1, list(a.shape))],
                              [helper.make_tensor_value_info("Y", 1, [a.shape[0], q.n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"A": a})[0]


def test_pack_is_low_nibble_first():
    assert pack(np.array([[1, 2, 15, 0]], np.uint8), 4).tolist() == [[0x21, 0x0F]]
    assert pack(np.array([[1, 2, 3]], np.uint8), 4).tolist() == [[0x21, 0x03]]  # odd count: zero high nibble
    codes = np.random.default_rng(0).integers(0, 16, (3, 5, 32)).astype(np.uint8)
    assert np.array_equal(unpack(pack(codes, 4), 4, 32), codes)
    assert np.array_equal(unpack(pack(codes, 8), 8, 32), codes)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k,block", [(160, 32), (176, 64), (256, 128)])  # odd blocks, padded K, one block
def test_matmulnbits_equals_numpy_dequantization(bits, symmetric, k, block):
    rng = np.random.default_rng(bits + k)
    weight = rng.standard_normal((48, k)).astype(np.float32)
    spec = QuantSpec(bits, block, accuracy_level=0, symmetric=symmetric)
    q = quantize(weight, spec)
    assert q.codes.shape == (48, -(-k // block), block * bits // 8)
    reference = dequantize(q, spec)
    step = np.repeat(np.abs(q.scales), block, axis=1)[:, :k]
    assert np.all(np.abs(reference - weight) <= step * 1.0001)  # at most one quantization step off
    a = rng.standard_normal((3, k)).astype(np.float32)
    np.testing.assert_allclose(matmul_nbits(q, spec, a), a @ reference.T, rtol=1e-5, atol=1e-4)
    # accuracy level 4 quantizes the activations to int8 too: close, not equal.
    fast = matmul_nbits(q, QuantSpec(bits, block, 4, symmetric), a)
    assert np.abs(fast - a @ reference.T).max() < 2e-2 * np.abs(a @ reference.T).max()


def test_quality_metrics_catch_a_broken_model():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((50, 64)) * 5
    same = compare(reference, reference)
    assert same.top1_agreement == 1.0 and abs(same.mean_kl) < 1e-9
    broken = compare(reference, rng.standard_normal((50, 64)) * 5)
    assert broken.decided_agreement < THRESHOLDS["int4"][0] and broken.mean_kl > THRESHOLDS["int4"][1]


@pytest.mark.parametrize("graph,quant", [("ort-fused", "int8"), ("ort-fused", "int4"), ("standard", "int4")])
def test_quantized_stories_artifacts_pass_quality_thresholds(tmp_path, stories_dir, graph, quant):
    result = build(BuildOptions(model=str(stories_dir), out=tmp_path / "q", graph=graph, quant=quant))
    report = verify(result.path)
    assert report.ok, report.table()
    assert "top-1 agreement" in report.table() and "KL" in report.table()
    model = onnx.load(str(result.path / names.MODEL_FILE), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    layers, per_layer = result.manifest.config.num_layers, 4 if graph == "ort-fused" else 7
    assert ops.count("MatMulNBits") == layers * per_layer + 1  # every Linear, head included
    assert ops.count("MatMul") == (0 if graph == "ort-fused" else 2 * layers) and "Gemm" not in ops  # attention's only
    embed = next(t for t in model.graph.initializer if t.name == "model.embed_tokens.weight")
    assert embed.data_type == onnx.TensorProto.FLOAT  # tied model: the Gather table stays fp32


def test_int4_demo_artifact_passes_quality_thresholds(tmp_path):
    report = verify(build(BuildOptions(model="demo", out=tmp_path / "d", graph="ort-fused", quant="int4")).path)
    assert report.ok, report.table()


def test_manifest_round_trip_of_quant_and_flavour(tmp_path, stories_dir):
    options = BuildOptions(model=str(stories_dir), out=tmp_path / "a", graph="ort-fused", quant="int4",
                           block_size=64, symmetric=False)
    built = build(options).manifest
    manifest = read_manifest(tmp_path / "a")
    assert manifest == built
    assert manifest.graph_flavour == "ort-fused"
    assert (manifest.quant.method, manifest.quant.bits, manifest.quant.block_size) == ("int4", 4, 64)
    assert manifest.quant.accuracy_level == 4 and manifest.quant.symmetric is False
    from llmpack.cli.inspect_view import describe

    assert "quant         int4: 4-bit weights, block 64, accuracy level 4, with zero points" in describe(manifest)
    data = json.loads((tmp_path / "a" / names.MANIFEST_FILE).read_text())
    for key in ("quant", "graph_flavour"):  # a manifest written before these fields existed
        data.pop(key)
    old = BuildManifest.from_dict(data)
    assert old.quant is None and old.graph_flavour == "standard"
    # different quant settings are a different build, never a reuse of this one
    assert not build(BuildOptions(**{**options.__dict__, "block_size": 32})).reused


def test_block_size_auto_follows_the_model_size(tmp_path):
    from llmpack.export.options import resolve_block_size
    from llmpack.export.random_checkpoint import SHAPES
    from llmpack.runtime.manifest import ModelConfig

    def config(shape: dict) -> ModelConfig:
        heads = shape["num_attention_heads"]
        return ModelConfig(shape["vocab_size"], shape["hidden_size"], shape["intermediate_size"],
                           shape["num_hidden_layers"], heads, shape["num_key_value_heads"],
                           shape["hidden_size"] // heads, 1e-5, 1e4, 4096, False)

    llama2_7b, stories110m = config(SHAPES["llama2-7b"]), config(SHAPES["stories110m"])
    assert auto_block_size(llama2_7b.linear_parameters) == 128  # 6.6 B Linear weights: decode streams them
    assert auto_block_size(stories110m.linear_parameters) == 32
    assert auto_block_size(10**9) == 128 and auto_block_size(10**9 - 1) == 32
    auto = BuildOptions(model="demo", out=tmp_path, quant="int4")
    assert auto.block_size == "auto"
    with pytest.raises(ValueError, match="resolve_block_size"):
        auto.quant_spec  # an unresolved "auto" never reaches the build key or the graph
    assert resolve_block_size(auto, llama2_7b.linear_parameters).quant_spec.block_size == 128
    explicit = BuildOptions(model="demo", out=tmp_path, quant="int4", block_size=64)
    assert resolve_block_size(explicit, llama2_7b.linear_parameters).block_size == 64
    # unquantized builds keep the block their build key always had, whatever the model's size
    plain = BuildOptions(model="demo", out=tmp_path)
    assert resolve_block_size(plain, llama2_7b.linear_parameters).quant_spec.block_size == 32


def test_bad_quant_options_are_refused(tmp_path):
    with pytest.raises(BuildError, match="--dtype fp32"):
        build(BuildOptions(model="demo", out=tmp_path / "x", dtype="fp16", quant="int8"))
    with pytest.raises(BuildError, match="--block-size"):
        build(BuildOptions(model="demo", out=tmp_path / "x", quant="int8", block_size=24))


def test_without_room_for_an_fp32_reference_a_quantized_artifact_is_verified_against_bf16(tmp_path, monkeypatch):
    import llmpack.export.verify as verify_module

    source = resolve_source("stories260k")
    artifact = build(BuildOptions(model=str(source), out=tmp_path / "int4", graph="ort-fused", quant="int4")).path
    manifest = open_artifact(artifact).manifest
    assert verify_module.reference_dtype(manifest, None) == "fp32"
    assert verify_module.reference_dtype(manifest, 1 << 40) == "fp32"
    monkeypatch.setattr(verify_module, "available_memory", lambda: 4 * manifest.config.parameters)  # fp32 won't fit
    report = verify(artifact)
    assert report.ok, report.table()
    assert "bf16 reference" in report.dtype and "top-1 agreement" in report.table()


def test_without_room_for_an_fp32_reference_an_fp32_artifact_is_refused_up_front(tmp_path, monkeypatch):
    import llmpack.export.verify as verify_module

    artifact = build(BuildOptions(model=str(resolve_source("stories260k")), out=tmp_path / "fp32")).path
    monkeypatch.setattr(verify_module, "available_memory", lambda: 1 << 20)
    with pytest.raises(CheckpointError, match=r"GiB for the fp32 reference .* bf16 reference, half the size"):
        verify(artifact)
