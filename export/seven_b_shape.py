"""Export stage, at the real size: a random-weight checkpoint in the exact Llama-2-7b-chat shape.

`make export-7b-shape` writes it (fp16 safetensors shards, ~13.5 GB) and then exports it with
`llm-export build --dtype fp16` under /usr/bin/time, to measure peak RSS and wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

LLAMA2_7B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float16",
}
SHARED_TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared/models/llama2-tokenizer/tokenizer.model"


def _layer_shapes(c: dict, i: int) -> dict[str, tuple[int, ...]]:
    h, inter = c["hidden_size"], c["intermediate_size"]
    p = f"model.layers.{i}"
    return {
        f"{p}.self_attn.q_proj.weight": (h, h),
        f"{p}.self_attn.k_proj.weight": (h, h),
        f"{p}.self_attn.v_proj.weight": (h, h),
        f"{p}.self_attn.o_proj.weight": (h, h),
        f"{p}.mlp.gate_proj.weight": (inter, h),
        f"{p}.mlp.up_proj.weight": (inter, h),
        f"{p}.mlp.down_proj.weight": (h, inter),
        f"{p}.input_layernorm.weight": (h,),
        f"{p}.post_attention_layernorm.weight": (h,),
    }


def _shards(c: dict) -> list[dict[str, tuple[int, ...]]]:
    h, v = c["hidden_size"], c["vocab_size"]
    shards = [{"model.embed_tokens.weight": (v, h)}]
    shards += [_layer_shapes(c, i) for i in range(c["num_hidden_layers"])]
    shards.append({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return shards


def _random(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) == 1:
        return np.ones(shape, np.float16)
    return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)


def write_checkpoint(folder: Path, tokenizer: Path, seed: int = 0) -> None:
    from safetensors.numpy import save_file
    from tqdm import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = _shards(LLAMA2_7B_CONFIG)
    weight_map = {}
    for index, shapes in enumerate(tqdm(shards, desc="random 7B-shape shards", unit="shard")):
        name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: _random(rng, s) for k, s in shapes.items()}, str(folder / name))
        weight_map |= {k: name for k in shapes}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(LLAMA2_7B_CONFIG, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    shutil.copyfile(tokenizer, folder / "tokenizer.model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, default=Path("artifacts/.sources/llama2-7b-shape"))
    args = parser.parse_args()
    if not SHARED_TOKENIZER.is_file():
        raise SystemExit(f"{SHARED_TOKENIZER} is missing: the 7B-shape checkpoint uses the real Llama-2 tokenizer")
    if (args.checkpoint / "model.safetensors.index.json").is_file():
        return
    write_checkpoint(args.checkpoint, SHARED_TOKENIZER)


if __name__ == "__main__":
    main()
