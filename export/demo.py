"""Export stage 0 for `--model demo`: make the built-in tiny Llama-2-architecture checkpoint.

A real sentencepiece tokenizer (trained in about a second on the corpus shipped beside this file,
with Llama-2's special ids and byte fallback) and deterministic random weights, written as a Hugging
Face checkpoint folder so that everything downstream (export, verify, serve) runs as for Llama-2.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

DEMO_CORPUS = Path(__file__).with_name("demo_corpus.txt")
DEMO_VERSION = 1
DEMO_SEED = 20231
DEMO_SHAPE = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=4096,
)


def demo_cache_dir() -> Path:
    root = os.environ.get("LLMPACK_CACHE") or Path.home() / ".cache" / "llmpack"
    return Path(root) / f"demo-v{DEMO_VERSION}"


def train_demo_tokenizer(vocab_size: int = 512) -> bytes:
    """A sentencepiece BPE model configured like Llama-2's (ids, byte fallback, dummy prefix)."""
    import sentencepiece as spm

    corpus = DEMO_CORPUS.read_text(encoding="utf-8")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus.splitlines()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _random_weights(config: dict) -> dict[str, np.ndarray]:
    """Deterministic weights scaled so logits are well separated (greedy parity is meaningful)."""
    rng = np.random.default_rng(DEMO_SEED)
    h, inter, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]

    def linear(out_dim: int, in_dim: int) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    tensors = {"model.embed_tokens.weight": rng.standard_normal((config["vocab_size"], h)).astype(np.float32)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        tensors |= {
            f"{p}.self_attn.q_proj.weight": linear(heads * d, h),
            f"{p}.self_attn.k_proj.weight": linear(kv * d, h),
            f"{p}.self_attn.v_proj.weight": linear(kv * d, h),
            f"{p}.self_attn.o_proj.weight": linear(h, heads * d),
            f"{p}.mlp.gate_proj.weight": linear(inter, h),
            f"{p}.mlp.up_proj.weight": linear(inter, h),
            f"{p}.mlp.down_proj.weight": linear(h, inter),
            f"{p}.input_layernorm.weight": (1 + 0.1 * rng.standard_normal(h)).astype(np.float32),
            f"{p}.post_attention_layernorm.weight": (1 + 0.1 * rng.standard_normal(h)).astype(np.float32),
        }
    tensors["model.norm.weight"] = np.ones(h, np.float32)
    tensors["lm_head.weight"] = 2 * linear(config["vocab_size"], h)
    return tensors


def demo_config(vocab_size: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **DEMO_SHAPE,
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def write_demo_checkpoint(folder: Path) -> Path:
    """Write the demo checkpoint into folder (atomically); reuse it when already there."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=folder.parent))
    try:
        tokenizer = train_demo_tokenizer()
        (staging / "tokenizer.model").write_bytes(tokenizer)
        import sentencepiece as spm

        vocab = spm.SentencePieceProcessor(model_proto=tokenizer).vocab_size()
        config = demo_config(vocab)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (staging / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
        save_file(_random_weights(config), str(staging / "model.safetensors"))
        staging.rename(folder)
    except FileExistsError:
        pass  # another process finished first; its checkpoint is identical
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
