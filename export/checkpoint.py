"""Export stage 1: read and validate a Hugging Face Llama checkpoint folder (config, weights, tokenizer).

Weights are opened lazily, one tensor at a time, so a 7B checkpoint never sits in memory whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmpack.export.model_config import model_config
from llmpack.export.progress import digest_files
from llmpack.export.safetensors_reader import SafetensorsFile
from llmpack.export.tokenizer_files import TOKENIZER_CONFIG, TokenizerChoice, choose_tokenizer
from llmpack.runtime import manifest as names
from llmpack.runtime.errors import CheckpointError
from llmpack.runtime.manifest import FileDigest, ModelConfig

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint folder: its config, where each tensor lives, its stop ids."""

    path: Path
    config: ModelConfig
    weight_files: tuple[str, ...]
    tensor_files: dict[str, str]  # tensor name -> weight file
    tokenizer: TokenizerChoice
    bos_token_id: int | None
    stop_token_ids: tuple[int, ...]
    source_dtype: str

    @property
    def tokenizer_file(self) -> str:
        return self.tokenizer.source_file

    def digests(self, tty: bool = False) -> tuple[FileDigest, ...]:
        files = (*self.weight_files, "config.json", self.tokenizer_file)
        extra = ("generation_config.json",) if (self.path / "generation_config.json").is_file() else ()
        if self.tokenizer.tokenizer == names.HF_TOKENIZERS:  # the template and token names reach the artifact
            extra += tuple(name for name in (TOKENIZER_CONFIG, names.CHAT_TEMPLATE_FILE) if (self.path / name).is_file())
        return digest_files(self.path, (*files, *extra), "hashing the checkpoint", tty)


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
    tokenizer = choose_tokenizer(path)
    bos = raw.get("bos_token_id", 1 if tokenizer.tokenizer == names.SENTENCEPIECE else None)
    checkpoint = Checkpoint(
        path=path,
        config=config,
        weight_files=files,
        tensor_files=tensor_files,
        tokenizer=tokenizer,
        bos_token_id=bos if isinstance(bos, int) else None,
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
