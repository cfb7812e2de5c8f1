"""Export stage: build, parity (verify), idempotency, atomicity and every bad input of `llm-export build`."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_tiny_llama

from llmpack.export import build as build_module
from llmpack.export.build import BuildOptions, build, build_lock
from llmpack.export.verify import verify
from llmpack.runtime import manifest as names
from llmpack.runtime.artifact import open_artifact, open_backend
from llmpack.runtime.errors import BuildError, CheckpointError


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory, demo_source):
    root = tmp_path_factory.mktemp("tiny")
    tok = demo_source / "tokenizer.model"
    return {
        "fp32": make_tiny_llama(root / "fp32", tok, seed=1),
        "fp32_other": make_tiny_llama(root / "fp32_other", tok, seed=2),
        "fp16": make_tiny_llama(root / "fp16", tok, seed=3, dtype="float16", tie=True),
        "loud": make_tiny_llama(root / "loud", tok, seed=4, embed_scale=2000.0, kv_heads=4),
        "bf16_bin": make_tiny_llama(root / "bf16_bin", tok, seed=5, dtype="bfloat16", safetensors=False),
        "bf16": make_tiny_llama(root / "bf16", tok, seed=6, dtype="bfloat16"),
    }


def _no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.glob(f".{out.name}.*-*")], "staging folders were left behind"


def test_demo_artifact_layout_and_manifest(demo_artifact):
    manifest = open_artifact(demo_artifact).manifest
    assert {f.path for f in manifest.files} == {names.MODEL_FILE, names.WEIGHTS_FILE, names.TOKENIZER_FILE}
    assert manifest.max_context == 3072 and manifest.stop_token_ids == (2,)
    assert manifest.config.num_kv_heads < manifest.config.num_heads
    assert [s.name for s in manifest.inputs[:3]] == [names.INPUT_IDS, names.ATTENTION_MASK, names.POSITION_IDS]
    assert manifest.outputs[0].shape == (names.AXIS_BATCH, manifest.config.vocab_size)
    assert all(len(f.sha256) == 64 for f in manifest.source.files)
    model = onnx.load(str(demo_artifact / names.MODEL_FILE), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external, "weights must live in external data"
    # The manifest lists what a run must feed; num_logits (speculation checks) is an input with a default of 1
    defaults = {t.name for t in model.graph.initializer}
    assert {i.name for i in model.graph.input if i.name not in defaults} == {s.name for s in manifest.inputs}
    assert {i.name for i in model.graph.input if i.name in defaults} == {names.NUM_LOGITS}


@pytest.mark.parametrize("kind", ["fp32", "fp16"])
def test_tiny_transformers_models_pass_verify(tmp_path, tiny_sources, kind):
    result = build(BuildOptions(model=str(tiny_sources[kind]), out=tmp_path / kind, dtype=kind, graph="standard"))
    report = verify(result.path)
    assert report.ok, report.table()
    if kind == "fp16":  # tied embeddings: the graph has no separate lm_head tensor
        model = onnx.load(str(result.path / names.MODEL_FILE), load_external_data=False)
        assert "lm_head.weight" not in {t.name for t in model.graph.initializer}
    assert result.manifest.max_context == 256  # capped by max_position_embeddings


@pytest.mark.parametrize("kind", ["bf16", "bf16_bin"])
def test_bf16_safetensors_and_torch_bin_checkpoints(tmp_path, tiny_sources, kind):
    source = tiny_sources[kind]
    assert (source / ("model.safetensors" if kind == "bf16" else "pytorch_model.bin")).is_file()
    report = verify(build(BuildOptions(model=str(source), out=tmp_path / kind, graph="standard")).path)
    assert report.ok, report.table()


def test_fp16_graph_survives_activations_that_overflow_fp16(tmp_path, tiny_sources):
    """Embeddings ~2000: their squares overflow fp16, so RMSNorm statistics must run in fp32."""
    result = build(BuildOptions(model=str(tiny_sources["loud"]), out=tmp_path / "loud", dtype="fp16", graph="standard"))
    report = verify(result.path)
    assert report.ok, report.table()


def test_stories260k_builds_and_verifies(stories_artifact):
    manifest = open_artifact(stories_artifact).manifest
    assert manifest.max_context == 512 and manifest.stop_token_ids == (1, 2)
    assert manifest.config.tie_word_embeddings and manifest.config.num_kv_heads == 4
    report = verify(stories_artifact)
    assert report.ok, report.table()


def test_logits_are_last_position_only(demo_artifact):
    backend = open_backend(open_artifact(demo_artifact))
    logits = backend.prefill(0, list(range(3, 303)))
    assert logits.shape == (backend.vocab_size,) and backend.cached_tokens(0) == 300
    assert np.isfinite(logits).all()


def test_verify_fails_against_a_different_model(tmp_path, tiny_sources):
    result = build(BuildOptions(model=str(tiny_sources["fp32"]), out=tmp_path / "a", graph="standard"))
    path = result.path / names.MANIFEST_FILE
    data = json.loads(path.read_text())
    data["source"]["path"] = str(tiny_sources["fp32_other"])
    path.write_text(json.dumps(data))
    report = verify(result.path)
    assert not report.ok
    assert "FAIL" in report.table()


def test_rebuild_is_idempotent_and_force_rebuilds(tmp_path, tiny_sources):
    options = BuildOptions(model=str(tiny_sources["fp32"]), out=tmp_path / "art", graph="standard")
    first = build(options)
    stamp = (first.path / names.WEIGHTS_FILE).stat().st_mtime_ns
    second = build(options)
    assert second.reused and (first.path / names.WEIGHTS_FILE).stat().st_mtime_ns == stamp
    forced = build(BuildOptions(model=options.model, out=options.out, force=True, graph="standard"))
    assert not forced.reused and forced.manifest.built_at >= first.manifest.built_at
    changed = build(BuildOptions(model=options.model, out=options.out, max_context=128, graph="standard"))
    assert not changed.reused and changed.manifest.max_context == 128
    assert not list(tmp_path.glob(".art.*-*"))


def test_interrupted_build_leaves_no_artifact(tmp_path, tiny_sources, monkeypatch):
    def explode(checkpoint, folder, dtype, progress=False, quant=None):
        (folder / names.MODEL_FILE).write_bytes(b"half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "write_decoder_graph", explode)
    out = tmp_path / "art"
    with pytest.raises(KeyboardInterrupt):
        build(BuildOptions(model=str(tiny_sources["fp32"]), out=out, graph="standard"))
    _no_leftovers(out)


def test_stale_staging_from_a_killed_build_is_cleaned(tmp_path, tiny_sources):
    stale = tmp_path / ".art.build-dead"
    stale.mkdir()
    (stale / names.MODEL_FILE).write_bytes(b"partial")
    result = build(BuildOptions(model=str(tiny_sources["fp32"]), out=tmp_path / "art", graph="standard"))
    assert not stale.exists() and open_artifact(result.path)


def test_concurrent_build_into_same_path_fails_fast(tmp_path, tiny_sources):
    out = tmp_path / "art"
    with build_lock(out.resolve()):
        with pytest.raises(BuildError, match="another llm-export build"):
            build(BuildOptions(model=str(tiny_sources["fp32"]), out=out, graph="standard"))


def test_disk_full_is_a_clear_error(tmp_path, tiny_sources, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(build_module, "write_decoder_graph", no_space)
    out = tmp_path / "art"
    with pytest.raises(BuildError, match="disk full"):
        build(BuildOptions(model=str(tiny_sources["fp32"]), out=out, graph="standard"))
    _no_leftovers(out)


def test_too_little_free_space_is_refused_up_front(tmp_path, tiny_sources, monkeypatch):
    monkeypatch.setattr(build_module.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 10))
    with pytest.raises(BuildError, match="not enough disk space"):
        build(BuildOptions(model=str(tiny_sources["fp32"]), out=tmp_path / "art", graph="standard"))


def test_a_quantized_build_asks_for_the_space_its_artifact_takes(tmp_path, monkeypatch):
    """A 7B int4 artifact is ~4 GB: the up-front check must not ask for the fp32 model's 27 GB."""
    plain = build(BuildOptions(model="demo", out=tmp_path / "fp32", graph="ort-fused")).path
    int4 = build(BuildOptions(model="demo", out=tmp_path / "int4", graph="ort-fused", quant="int4")).path
    sizes = {path.name: sum(f.stat().st_size for f in path.iterdir()) for path in (plain, int4)}
    free = (sizes["fp32"] + sizes["int4"]) // 2  # enough for the int4 artifact, not for the fp32 one
    assert sizes["int4"] * 1.3 < free
    monkeypatch.setattr(build_module.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(free, 0, free))
    assert not build(BuildOptions(model="demo", out=tmp_path / "int4", graph="ort-fused", quant="int4",
                                  force=True)).reused
    with pytest.raises(BuildError, match="not enough disk space"):
        build(BuildOptions(model="demo", out=tmp_path / "fp32", graph="ort-fused", force=True))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: shutil.rmtree(d), "does not exist"),
        (lambda d: (d / "config.json").unlink(), "config.json is required"),
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})), "Llama"),
        (lambda d: (d / "model.safetensors").unlink(), "has no weights"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00garbage" * 10), "corrupt"),
        (lambda d: (d / "tokenizer.model").unlink(), "tokenizer.model"),
        (lambda d: (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00002-of-00002.safetensors"}})), "incomplete"),
    ],
    ids=["missing-folder", "no-config", "bad-config", "not-llama", "no-weights", "corrupt-weights", "no-tokenizer", "missing-shard"],
)
def test_bad_checkpoints_are_refused_without_partial_artifact(tmp_path, tiny_sources, damage, message):
    source = _copy(tiny_sources["fp32"], tmp_path / "src")
    damage(source)
    out = tmp_path / "art"
    with pytest.raises(CheckpointError, match=message):
        build(BuildOptions(model=str(source), out=out, graph="standard"))
    _no_leftovers(out)


def test_truncated_weights_are_refused(tmp_path, tiny_sources):
    source = _copy(tiny_sources["fp32"], tmp_path / "src")
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="re-download"):
        build(BuildOptions(model=str(source), out=tmp_path / "art", graph="standard"))
    _no_leftovers(tmp_path / "art")


def test_output_path_that_is_not_an_artifact_is_refused(tmp_path, tiny_sources):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("do not delete")
    with pytest.raises(BuildError, match="not an llmpack artifact"):
        build(BuildOptions(model=str(tiny_sources["fp32"]), out=out, graph="standard"))
    assert (out / "notes.txt").read_text() == "do not delete"
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(BuildError, match="not a folder"):
        build(BuildOptions(model=str(tiny_sources["fp32"]), out=afile, graph="standard"))
