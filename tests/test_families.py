"""Export of the Llama family beyond Llama-2 (issue #20): tiny random Llama-3 / Qwen2 / Mistral checkpoints made
with transformers' own classes, built standard and fused, fp32 and int4, each passing `verify` (logits ≈
PyTorch, greedy == transformers `generate`, or the quantization quality bounds); what cannot be exported is
refused in one line naming the config field.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from families import llama3_checkpoint, mistral_checkpoint, qwen2_checkpoint
from serving import LLM_EXPORT

from llmpack.export.build import build
from llmpack.export.options import BuildOptions
from llmpack.export.verify import verify
from llmpack.runtime import manifest as names
from llmpack.runtime.errors import CheckpointError

SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "models" / "llama2-tokenizer" / "tokenizer.model"
FAMILIES = ("llama3", "qwen2", "mistral")


def make_checkpoint(family: str, folder: Path, **kwargs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if family == "mistral":
        if not SHARED_TOKENIZER.is_file():
            pytest.skip(f"needs the Llama-2 tokenizer at {SHARED_TOKENIZER} (../shared is absent)")
        return mistral_checkpoint(folder, SHARED_TOKENIZER, **kwargs)
    return {"llama3": llama3_checkpoint, "qwen2": qwen2_checkpoint}[family](folder)


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory) -> Path:
    return make_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize(("graph", "quant"), [("standard", "none"), ("ort-fused", "none"), ("standard", "int4"),
                                              ("ort-fused", "int4")])
def test_each_family_builds_and_verifies(checkpoint, graph, quant, tmp_path):
    out = tmp_path / "artifact"
    result = build(BuildOptions(model=str(checkpoint), out=out, graph=graph, quant=quant, max_context=256))
    report = verify(out)
    assert report.ok, report.table()
    assert "greedy" in report.table() or quant != "none"  # fp32 builds are held to transformers' generate


def test_the_artifact_records_the_tokenizer_template_and_stop_ids(checkpoint, tmp_path):
    manifest = build(BuildOptions(model=str(checkpoint), out=tmp_path / "a", graph="ort-fused", max_context=64)).manifest
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    assert manifest.tokenizer == names.HF_TOKENIZERS and manifest.chat_template == names.JINJA_CHAT
    assert list(manifest.stop_token_ids) == (generation["eos_token_id"] if isinstance(generation["eos_token_id"], list)
                                             else [generation["eos_token_id"]])
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()
    template = (checkpoint / "chat_template.jinja").read_text()
    assert (tmp_path / "a" / names.CHAT_TEMPLATE_FILE).read_text() == template
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(checkpoint))
    assert manifest.special_tokens == hf.special_tokens_map and "eos_token" in manifest.special_tokens
    config = json.loads((checkpoint / "config.json").read_text())
    assert manifest.config.architecture == config["architectures"][0]
    assert manifest.config.attention_bias == (config["model_type"] == "qwen2")


@pytest.mark.parametrize("kind", ["linear", "dynamic", "llama3", "default"])
def test_rope_frequencies_equal_transformers(kind):
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from llmpack.export.model_config import model_config
    from llmpack.export.rope import inverse_frequencies

    scaling = {"linear": {"rope_type": "linear", "factor": 4.0}, "dynamic": {"rope_type": "dynamic", "factor": 2.0},
               "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64}, "default": None}[kind]
    hf = LlamaConfig(hidden_size=128, num_attention_heads=2, head_dim=64, rope_theta=500000.0, rope_scaling=scaling,
                     max_position_embeddings=512)
    config = model_config(hf.to_dict() | {"architectures": ["LlamaForCausalLM"]}, Path("x"))
    expected = (ROPE_INIT_FUNCTIONS[kind](hf, torch.device("cpu"))[0] if kind != "default" else
                1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.int64).float() / 64))).numpy()
    np.testing.assert_allclose(inverse_frequencies(config), expected, rtol=1e-6)


def test_a_sliding_window_smaller_than_the_context_caps_it_with_a_log_line(tmp_path, caplog):
    folder = make_checkpoint("mistral", tmp_path / "mistral", sliding_window=48)
    with caplog.at_level(logging.WARNING, logger="llmpack.export"):
        manifest = build(BuildOptions(model=str(folder), out=tmp_path / "a", max_context=256)).manifest
    assert manifest.max_context == 48 and manifest.config.sliding_window == 48
    assert "context capped at 48" in caplog.text and "sliding_window" in caplog.text
    assert verify(tmp_path / "a").ok


def edited(checkpoint: Path, tmp_path: Path, **changes) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


@pytest.mark.parametrize(("changes", "words"), [
    ({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}, "holds a mixtral model"),
    ({"num_local_experts": 8}, "num_local_experts=8 means mixture-of-experts layers"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type 'yarn' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"mlp_bias": True}, "mlp_bias=True means biases on the MLP projections"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks a number for low_freq_factor, high_freq_factor"),
])
def test_what_cannot_be_exported_is_refused_naming_the_field(changes, words, tmp_path):
    folder = edited(make_checkpoint("llama3", tmp_path / "llama3"), tmp_path, **changes)
    with pytest.raises(CheckpointError) as caught:
        build(BuildOptions(model=str(folder), out=tmp_path / "a"))
    assert words in str(caught.value), caught.value


def test_a_checkpoint_without_a_tokenizer_is_refused_naming_both_files(tmp_path):
    folder = make_checkpoint("qwen2", tmp_path / "qwen2")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="needs tokenizer.model .* or tokenizer.json"):
        build(BuildOptions(model=str(folder), out=tmp_path / "a"))


def test_dynamic_rope_stops_the_context_at_max_position_embeddings(tmp_path):
    folder = edited(make_checkpoint("llama3", tmp_path / "llama3"), tmp_path, rope_scaling=None,
                    rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500000.0},
                    max_position_embeddings=40)
    manifest = build(BuildOptions(model=str(folder), out=tmp_path / "a", max_context=256)).manifest
    assert manifest.max_context == 40 and manifest.config.rope_scaling["rope_type"] == "dynamic"
    assert verify(tmp_path / "a").ok


def test_the_cli_builds_verifies_and_inspects_a_qwen2_checkpoint(tmp_path):
    folder = make_checkpoint("qwen2", tmp_path / "qwen2")
    out = tmp_path / "qwen2-int4"
    run = subprocess.run([LLM_EXPORT, "build", "--model", str(folder), "--out", str(out), "--quant", "int4"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    run = subprocess.run([LLM_EXPORT, "verify", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    run = subprocess.run([LLM_EXPORT, "inspect", str(out)], capture_output=True, text=True, timeout=60)
    assert "Qwen2ForCausalLM" in run.stdout and "tokenizer tokenizers (tokenizer.json), chat template jinja" in run.stdout


@pytest.mark.parametrize("graph", ["standard", "ort-fused"])
def test_the_engine_answers_a_text_prompt_greedily_as_transformers_generate(checkpoint, graph, tmp_path):
    """The runtime end to end (the artifact's own tokenizer, raw prompt, the engine's loop) against transformers'
    tokenizer + generate on the checkpoint, token for token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmpack.runtime.engine import Engine
    from llmpack.runtime.sampling import SamplingParams

    build(BuildOptions(model=str(checkpoint), out=tmp_path / "a", graph=graph, max_context=128))
    prompt = "Once upon a time, Lily 🙂 saw 你好 and said:  hello"
    hf_ids = AutoTokenizer.from_pretrained(str(checkpoint))(prompt)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([hf_ids]), attention_mask=torch.ones(1, len(hf_ids), dtype=torch.long),
                             max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    engine = Engine.load(tmp_path / "a")
    try:
        ids = engine.tokenizer.raw_prompt_ids(prompt)
        assert ids == hf_ids
        got = list(engine.generate_ids(ids, 24, SamplingParams(temperature=0), stop_ids=[]))
    finally:
        engine.close()
    assert got == out[0, len(hf_ids):].tolist()
