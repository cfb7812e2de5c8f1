"""Export stage 0 for tests and benchmarks: random-weight Llama checkpoints of a named shape.

The demo model, the stories110M-shape benchmark model and the exact Llama-2-7b-chat shape all come
from here, written as Hugging Face folders (one safetensors shard per layer, so even the 7B shape
is generated one layer at a time). Weights are scaled so logits are well separated: greedy parity
between PyTorch and ONNX is then a meaningful check rather than a coin toss between near-ties.
"""

from __future__ import annotations

import argparse
import errno
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "stories110m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                        num_key_value_heads=12, vocab_size=32000, max_position_embeddings=4096),
}
SHARED_TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared/models/llama2-tokenizer/tokenizer.model"


def llama_config(shape: dict, dtype: str = "float32", tie: bool = False) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", **shape,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": tie,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": dtype,
    }


def _layer(c: dict, i: int, rng: np.random.Generator, dtype) -> dict[str, np.ndarray]:
    h, inter = c["hidden_size"], c["intermediate_size"]
    d = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d

    def linear(out_dim: int, in_dim: int) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim), dtype=np.float32) / np.sqrt(in_dim)).astype(dtype)

    def norm() -> np.ndarray:
        return (1 + 0.1 * rng.standard_normal(h, dtype=np.float32)).astype(dtype)

    p = f"model.layers.{i}"
    return {
        f"{p}.self_attn.q_proj.weight": linear(q, h), f"{p}.self_attn.k_proj.weight": linear(kv, h),
        f"{p}.self_attn.v_proj.weight": linear(kv, h), f"{p}.self_attn.o_proj.weight": linear(h, q),
        f"{p}.mlp.gate_proj.weight": linear(inter, h), f"{p}.mlp.up_proj.weight": linear(inter, h),
        f"{p}.mlp.down_proj.weight": linear(h, inter),
        f"{p}.input_layernorm.weight": norm(), f"{p}.post_attention_layernorm.weight": norm(),
    }


def _shards(c: dict, rng: np.random.Generator, dtype):
    """Yields one dict of tensors per shard: embeddings, each layer, then the head."""
    h, v = c["hidden_size"], c["vocab_size"]
    yield {"model.embed_tokens.weight": rng.standard_normal((v, h), dtype=np.float32).astype(dtype)}
    for i in range(c["num_hidden_layers"]):
        yield _layer(c, i, rng, dtype)
    head = {"model.norm.weight": np.ones(h, dtype)}
    if not c["tie_word_embeddings"]:
        head["lm_head.weight"] = (2 * rng.standard_normal((v, h), dtype=np.float32) / np.sqrt(h)).astype(dtype)
    yield head


def write_random_checkpoint(folder: Path, config: dict, tokenizer: bytes, seed: int,
                            stop_ids=(2,), progress: bool = False) -> Path:
    """Write the checkpoint atomically (staging folder + rename); reuse it when already there."""
    from safetensors.numpy import save_file
    from tqdm import tqdm

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        rng, dtype = np.random.default_rng(seed), np.dtype(config["torch_dtype"])
        count = config["num_hidden_layers"] + 2
        weight_map = {}
        shards = tqdm(_shards(config, rng, dtype), total=count, desc="random weights", unit="shard", disable=not progress)
        for index, tensors in enumerate(shards):
            name = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            save_file(tensors, str(staging / name))
            weight_map |= dict.fromkeys(tensors, name)
        (staging / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (staging / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": list(stop_ids)}))
        (staging / "tokenizer.model").write_bytes(tokenizer)
        staging.rename(folder)
    except OSError as exc:
        # Another process finished the same checkpoint first: Linux says ENOTEMPTY, others EEXIST.
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not (folder / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a random-weight Llama checkpoint of a named shape.")
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not SHARED_TOKENIZER.is_file():
        raise SystemExit(f"{SHARED_TOKENIZER} is missing: these shapes use the real Llama-2 tokenizer (../shared)")
    config = llama_config(SHAPES[args.shape], args.dtype)
    write_random_checkpoint(args.out, config, SHARED_TOKENIZER.read_bytes(), args.seed, progress=True)


if __name__ == "__main__":
    main()
