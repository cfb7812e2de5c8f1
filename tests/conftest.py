"""Shared test fixtures: the ../shared data (skipped with a reason when absent) and tiny Llama models."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_REASON = f"../shared is absent ({SHARED}): it holds the real tokenizer and stories260k model"


@pytest.fixture(scope="session", autouse=True)
def _hermetic_cache(tmp_path_factory):
    """The demo checkpoint cache goes to a per-session folder, never the user's home."""
    previous = os.environ.get("LLMPACK_CACHE")
    os.environ["LLMPACK_CACHE"] = str(tmp_path_factory.mktemp("llmpack-cache"))
    yield
    if previous is None:
        os.environ.pop("LLMPACK_CACHE", None)
    else:
        os.environ["LLMPACK_CACHE"] = previous


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_servers():
    """Servers a failing test did not stop are killed when the session ends."""
    yield
    from serving import ServerProcess

    ServerProcess.kill_leftovers()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(SHARED_REASON)
    return SHARED


@pytest.fixture(scope="session")
def stories_dir(shared_dir) -> Path:
    path = shared_dir / "models" / "stories260k"
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"{path} is missing: {SHARED_REASON}")
    return path


@pytest.fixture(scope="session")
def llama2_tokenizer_path(shared_dir) -> Path:
    path = shared_dir / "models" / "llama2-tokenizer" / "tokenizer.model"
    if not path.is_file():
        pytest.skip(f"{path} is missing: {SHARED_REASON}")
    return path


def make_tiny_llama(folder: Path, tokenizer_model: Path, *, seed: int = 0, dtype: str = "float32",
                    tie: bool = False, kv_heads: int = 2, embed_scale: float = 1.0, eos=2,
                    safetensors: bool = True) -> Path:
    """A random Llama built by transformers itself, saved as a Hugging Face checkpoint folder."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer_model)).vocab_size()
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         tie_word_embeddings=tie, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3 if param.dim() > 1 else 0.1).add_(1.0 if param.dim() == 1 else 0.0)
        model.model.embed_tokens.weight.mul_(embed_scale)
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    if not safetensors:  # transformers 5 only writes safetensors; older checkpoints ship torch pickles
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    shutil.copyfile(tokenizer_model, folder / "tokenizer.model")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": eos}))
    return folder


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory) -> Path:
    from llmpack.export.demo import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "checkpoint")


@pytest.fixture(scope="session")
def demo_artifact(tmp_path_factory) -> Path:
    from llmpack.export.build import BuildOptions, build

    out = tmp_path_factory.mktemp("artifacts") / "demo"
    return build(BuildOptions(model="demo", out=out, graph="standard")).path


@pytest.fixture(scope="session")
def stories_artifact(tmp_path_factory, stories_dir) -> Path:
    from llmpack.export.build import BuildOptions, build

    out = tmp_path_factory.mktemp("artifacts") / "stories260k"
    return build(BuildOptions(model=str(stories_dir), out=out, graph="standard")).path


# --- ort-fused artifacts (tests/test_fused_backend.py, tests/test_mixed_step.py) -------------------------


@pytest.fixture(scope="session")
def fused_stories(tmp_path_factory, stories_dir) -> Path:
    """head_dim 8: the graph pads heads to 16, what GroupQueryAttention on the CPU accepts."""
    from llmpack.export.build import BuildOptions, build

    out = tmp_path_factory.mktemp("f") / "stories"
    return build(BuildOptions(model=str(stories_dir), out=out, graph="ort-fused")).path


@pytest.fixture(scope="session")
def fused_tiny(tmp_path_factory, demo_source) -> Path:
    """head_dim 16, untied head, 2 kv heads for 4 query heads: no padding, a separate fp32 head."""
    from llmpack.export.build import BuildOptions, build

    root = tmp_path_factory.mktemp("tiny")
    source = make_tiny_llama(root / "src", demo_source / "tokenizer.model", seed=7)
    return build(BuildOptions(model=str(source), out=root / "fused", graph="ort-fused", max_context=64)).path


# --- tokenizers built on the fixtures above (runtime tokenizer/template/detokenizer tests) -------


@pytest.fixture(scope="session")
def llama2_tokenizer(llama2_tokenizer_path):
    from llmpack.runtime.tokenizer import Tokenizer

    return Tokenizer.from_file(llama2_tokenizer_path)


@pytest.fixture(scope="session")
def stories_tokenizer(stories_dir):
    from llmpack.runtime.tokenizer import Tokenizer

    return Tokenizer.from_file(stories_dir / "tokenizer.model")


@pytest.fixture(scope="session")
def llama2_sp(llama2_tokenizer_path):
    """sentencepiece itself, for reference values computed without llmpack."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_path))


@pytest.fixture(scope="session", params=["llama2_tokenizer", "stories_tokenizer"])
def any_tokenizer(request):
    """Each real tokenizer in turn."""
    return request.getfixturevalue(request.param)


# --- the HTTP server (tests/test_server.py, tests/test_openai_compat.py) ---------------------------


@pytest.fixture(scope="session")
def demo_server(demo_artifact, tmp_path_factory):
    """One real `llm-serve run` on the demo artifact for the session, key from LLMPACK_API_KEY."""
    from serving import SERVER_API_KEY, ServerProcess

    server = ServerProcess(demo_artifact, tmp_path_factory.mktemp("server") / "serve.log", "--max-body-bytes", "65536",
                           env={"LLMPACK_API_KEY": SERVER_API_KEY})
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="session")
def demo_http(demo_server):
    """An HTTP client for demo_server that sends its API key."""
    import httpx
    from serving import AUTH

    with httpx.Client(base_url=demo_server.base, headers=AUTH, timeout=60) as client:
        yield client
