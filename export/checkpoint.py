"""Export stage 1: read and validate a Hugging Face Llama checkpoint folder (config, weights, tokenizer).

Weights are opened lazily, one tensor at a time, so a 7B checkpoint never sits in memory whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmpack.export.progress import digest_files
from llmpack.export.safetensors_reader import SafetensorsFile
from llmpack.runtime.errors import CheckpointError
from llmpack.runtime.manifest import FileDigest, ModelConfig

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
LLAMA_ARCHITECTURES = {"LlamaForCausalLM"}


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint folder: its config, where each tensor lives, its stop ids."""

    path: Path
    config: ModelConfig
    weight_files: tuple[str, ...]
    tensor_files: dict[str, str]  # tensor name -> weight file
    tokenizer_file: str
    bos_token_id: int
    stop_token_ids: tuple[int, ...]
    source_dtype: str

    def digests(self, tty: bool = False) -> tuple[FileDigest, ...]:
        names = (*self.weight_files, "config.json", self.tokenizer_file)
        extra = ("generation_config.json",) if (self.path / "generation_config.json").is_file() else ()
        return digest_files(self.path, (*names, *extra), "hashing the checkpoint", tty)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path.parent} has no {path.name}: {what}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); re-download the checkpoint") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object; re-download the checkpoint")
    return data


def model_config(raw: dict, where: Path) -> ModelConfig:
    """Translate config.json into the manifest's ModelConfig, refusing anything that is not a Llama."""
    archs = set(raw.get("architectures") or [])
    if raw.get("model_type") != "llama" or (archs and not archs & LLAMA_ARCHITECTURES):
        raise CheckpointError(
            f"{where} holds a {raw.get('model_type') or 'unknown'} model "
            f"({', '.join(sorted(archs)) or 'no architectures'}); llmpack exports Llama "
            "(model_type 'llama', LlamaForCausalLM) checkpoints only"
        )
    rope_scaling = raw.get("rope_scaling") or (raw.get("rope_parameters") or {}).get("rope_type")
    if rope_scaling not in (None, "default"):
        raise CheckpointError(f"{where}: rope_scaling {rope_scaling!r} is not supported; only plain RoPE is")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise CheckpointError(f"{where}: Llama variants with attention or MLP biases are not supported")
    try:
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        rope_theta = raw.get("rope_theta") or (raw.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return ModelConfig(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}/config.json lacks a valid {exc} for a Llama model") from exc


def _weight_layout(path: Path) -> tuple[tuple[str, ...], dict[str, str]]:
    """Find the weight files: a single file, or shards listed by an index."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        if (path / index_name).is_file():
            index = _read_json(path / index_name, "weight index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{path / index_name} has no weight_map; re-download the checkpoint")
            files = tuple(sorted(set(weight_map.values())))
            missing = [name for name in files if not (path / name).is_file()]
            if missing:
                raise CheckpointError(
                    f"{path} is incomplete: {len(missing)} of {len(files)} weight shards are missing "
                    f"({', '.join(missing[:3])}); finish downloading the checkpoint"
                )
            return files, dict(weight_map)
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return (single,), {}
    raise CheckpointError(
        f"{path} has no weights (model.safetensors, pytorch_model.bin or a sharded index); "
        "point --model at a complete Hugging Face Llama checkpoint"
    )


def _stop_ids(path: Path, raw_config: dict) -> tuple[int, ...]:
    generation = path / "generation_config.json"
    source = _read_json(generation, "") if generation.is_file() else raw_config
    eos = source.get("eos_token_id", raw_config.get("eos_token_id", 2))
    ids = eos if isinstance(eos, list) else [eos]
    if not ids or not all(isinstance(i, int) for i in ids):
        raise CheckpointError(f"{path}: eos_token_id {eos!r} is not an id or a list of ids")
    return tuple(ids)


def open_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist; pass a Hugging Face Llama folder or `demo`")
    raw = _read_json(path / "config.json", "not a Hugging Face checkpoint (config.json is required)")
    config = model_config(raw, path)
    files, tensor_files = _weight_layout(path)
    if not (path / "tokenizer.model").is_file():
        raise CheckpointError(
            f"{path} has no tokenizer.model; llmpack serves with the sentencepiece model "
            "(Meta's Llama-2 checkpoints ship it): copy it into the folder"
        )
    checkpoint = Checkpoint(
        path=path,
        config=config,
        weight_files=files,
        tensor_files=tensor_files,
        tokenizer_file="tokenizer.model",
        bos_token_id=int(raw.get("bos_token_id", 1)),
        stop_token_ids=_stop_ids(path, raw),
        source_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
    )
    return checkpoint


class WeightReader:
    """Yields tensors by name as numpy arrays, reading one tensor at a time from the weight files."""

    def __init__(self, checkpoint: Checkpoint):
        self._checkpoint = checkpoint
        self._open: dict[str, object] = {}
        self._location: dict[str, str] = dict(checkpoint.tensor_files)

    def __enter__(self) -> WeightReader:
        if not self._location:
            for name in self._checkpoint.weight_files:
                for key in self._file(name).keys():
                    self._location[key] = name
        return self

    def __exit__(self, *exc) -> None:
        self._open.clear()

    def has(self, name: str) -> bool:
        return name in self._location

    def _file(self, name: str):
        if name not in self._open:
            path = self._checkpoint.path / name
            if name.endswith(".safetensors"):
                self._open[name] = SafetensorsFile(path)
            else:
                self._open[name] = _load_torch_bin(path)
        return self._open[name]

    def get(self, tensor: str) -> np.ndarray:
        """The tensor as numpy, float16 or float32 (bf16 widened)."""
        if tensor not in self._location:
            raise CheckpointError(
                f"tensor {tensor} is missing from {self._checkpoint.path}; the checkpoint is incomplete"
            )
        handle = self._file(self._location[tensor])
        if isinstance(handle, SafetensorsFile):
            return handle.read(tensor)
        value = handle[tensor]
        return value.float().numpy() if str(value.dtype) == "torch.bfloat16" else value.numpy()


def _load_torch_bin(path: Path) -> dict:
    import torch

    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many unrelated types for a bad pickle/zip
        raise CheckpointError(
            f"weight file {path} cannot be read ({type(exc).__name__}: {exc}); it is corrupt or "
            "truncated, re-download it"
        ) from exc
