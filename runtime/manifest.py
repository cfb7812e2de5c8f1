"""The artifact contract: the build manifest schema plus every file, tensor and axis name.

Export writes a `BuildManifest` as `manifest.json`; the runtime reads it back and nothing else.
This module lives on the runtime side so serving needs no torch; export imports it from here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llmpack.runtime.errors import ArtifactError

# 2: the tokenizer kind, chat template and special tokens are recorded (other Llama-family models); a version 1
# manifest still loads, read as sentencepiece + the Llama-2-chat template it always meant.
MANIFEST_VERSION = 2
READABLE_MANIFEST_VERSIONS = (1, 2)
STANDARD_GRAPH = "standard"  # plain ONNX ops: TensorRT parses them
FUSED_GRAPH = "ort-fused"  # ONNX Runtime contrib ops, in-place KV cache (fused_interface.py)
GRAPH_FLAVOURS = (STANDARD_GRAPH, FUSED_GRAPH)
AUTO_GRAPH = "auto"  # a build option, never in a manifest: export.build.resolve_graph picks the flavour

# The runtime reads a prompt in chunks of at most DEFAULT_PREFILL_CHUNK tokens (EngineOptions.prefill_chunk);
# a TensorRT engine's prefill profile accepts up to MAX_PREFILL_CHUNK new tokens per step, so any chunk size
# up to that runs on it without a profile that covers a whole 2500-token prompt over a full cache.
DEFAULT_PREFILL_CHUNK = 128
MAX_PREFILL_CHUNK = 512

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.model"  # sentencepiece (Llama-2: Meta's reference tokenization)
HF_TOKENIZER_FILE = "tokenizer.json"  # the `tokenizers` library's (Llama-3, Qwen2, Mistral's fast tokenizer, …)
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # the checkpoint's own chat template, when the artifact uses one

# BuildManifest.tokenizer: which library reads the tokenizer file
SENTENCEPIECE, HF_TOKENIZERS = "sentencepiece", "tokenizers"
TOKENIZER_FILES = {SENTENCEPIECE: TOKENIZER_FILE, HF_TOKENIZERS: HF_TOKENIZER_FILE}
# BuildManifest.chat_template: Meta's Llama-2-chat construction in ids (runtime/template.py), the checkpoint's
# Jinja template (CHAT_TEMPLATE_FILE), or none (a base model: raw prompts only)
LLAMA2_CHAT, JINJA_CHAT, NO_CHAT = "llama-2-chat", "jinja", "none"
CHAT_TEMPLATES = (LLAMA2_CHAT, JINJA_CHAT, NO_CHAT)
ENGINE_FILE = "model.plan"  # optional: a serialized TensorRT engine, tied to one GPU model and TensorRT version
TIMING_CACHE_FILE = "engine.timing.cache"  # TensorRT's tactic timings, reused by the next engine build

# Graph interface: one decoder graph serves prefill (seq > 1, empty past) and decode (seq = 1).
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"  # logits of the LAST position only: [batch, vocab]
# The standard graph's optional int64 [1] input: how many last positions get logits (an initializer of 1 that
# ONNX Runtime lets a run override: a speculation check feeds k + 1 and gets [batch * (k + 1), vocab]). Not in
# the manifest's inputs: nothing has to feed it, and TensorRT's parser takes it for the constant 1.
NUM_LOGITS = "num_logits"

AXIS_BATCH = "batch"
AXIS_SEQ = "seq"
AXIS_PAST = "past"
AXIS_TOTAL = "past_plus_seq"


def past_key_name(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value_name(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key_name(layer: int) -> str:
    return f"present.{layer}.key"


def present_value_name(layer: int) -> str:
    return f"present.{layer}.value"


@dataclass(frozen=True)
class ModelConfig:
    """The Llama architecture numbers the graph was built from."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    architecture: str = "LlamaForCausalLM"  # config.json's architectures[0]
    # config.json's rope_scaling as read (rope_type and its numbers), None for plain RoPE; the graphs bake the
    # frequencies it gives (export/rope.py)
    rope_scaling: dict | None = None
    attention_bias: bool = False  # q/k/v projections carry biases (Qwen2)
    sliding_window: int | None = None  # attention window of the checkpoint; the build's context never exceeds it

    @property
    def linear_parameters(self) -> int:
        """Weights of every Linear, the head included: what one decode step reads (the one count used everywhere)."""
        attention = self.hidden_size * (2 * self.num_heads + 2 * self.num_kv_heads) * self.head_dim  # q, k, v, o
        per_layer = attention + 3 * self.hidden_size * self.intermediate_size
        return self.num_layers * per_layer + self.vocab_size * self.hidden_size

    @property
    def parameters(self) -> int:
        """All weights as the artifact stores them: the Linears plus the embedding table (norms are negligible)."""
        return self.linear_parameters + self.vocab_size * self.hidden_size


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "int64", "float32", "float16"
    shape: tuple[str | int, ...]


@dataclass(frozen=True)
class FileDigest:
    path: str  # relative to the folder it describes
    sha256: str
    size: int


@dataclass(frozen=True)
class SourceInfo:
    path: str
    files: tuple[FileDigest, ...]


@dataclass(frozen=True)
class EngineProfile:
    """One TensorRT optimization profile as (min, opt, max) per axis; per-input shapes derive from these."""

    name: str  # "prefill" | "decode"
    batch: tuple[int, int, int]
    seq: tuple[int, int, int]
    past: tuple[int, int, int]

    def covers(self, batch: int, seq: int, past: int) -> bool:
        return all(lo <= value <= hi for (lo, _, hi), value in
                   ((self.batch, batch), (self.seq, seq), (self.past, past)))


@dataclass(frozen=True)
class EngineInfo:
    """The optional TensorRT engine beside the ONNX graph: what it was built with and for."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "major.minor": engines do not load on another one
    max_batch: int
    profiles: tuple[EngineProfile, ...]
    files: tuple[FileDigest, ...]  # the engine itself; checked by the TensorRT backend, not at open
    build_key: str  # hash of the graph, TensorRT, GPU and profiles: a match means nothing to rebuild
    workspace_bytes: int
    strongly_typed: bool = True  # tensor types come from the ONNX graph (fp32 norms/softmax kept)
    # Defaults keep older manifests loading. cu12 and cu13 wheels share one version string: the wheel says which.
    tensorrt_distribution: str = ""  # "tensorrt-cu13"
    cuda_runtime: str = ""  # "13.0": cudaRuntimeGetVersion when the engine was built

    @classmethod
    def from_dict(cls, data: dict) -> EngineInfo:
        return cls(**{
            **data,
            "profiles": tuple(EngineProfile(p["name"], *(tuple(p[axis]) for axis in ("batch", "seq", "past")))
                              for p in data["profiles"]),
            "files": tuple(FileDigest(**f) for f in data["files"]),
        })


@dataclass(frozen=True)
class QuantInfo:
    """`--quant`: weight-only block-wise quantization of every Linear, head included (MatMulNBits)."""

    method: str  # "int8" | "int4"
    bits: int
    block_size: int  # weights per scale along the input dimension
    accuracy_level: int  # MatMulNBits' compute type for activations: 0 as is, 4 int8
    symmetric: bool  # no zero points


@dataclass(frozen=True)
class BuildManifest:
    """One build, fully described. Written as manifest.json beside the artifact."""

    name: str
    config: ModelConfig
    dtype: str  # "fp32" | "fp16"
    max_context: int
    opset: int
    bos_token_id: int | None  # None: the model has no BOS (Qwen2); raw prompts are its tokenizer's encoding
    stop_token_ids: tuple[int, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    source: SourceInfo
    files: tuple[FileDigest, ...]
    build_key: str  # hash of everything that determines the bytes of the artifact
    llmpack_version: str
    tool_versions: dict[str, str]
    built_at: str
    graph_flavour: str = STANDARD_GRAPH  # or FUSED_GRAPH
    default_system_prompt: str | None = None
    manifest_version: int = MANIFEST_VERSION
    extra: dict[str, str] = field(default_factory=dict)
    engine: EngineInfo | None = None  # absent in artifacts built without `--engine trt`
    quant: QuantInfo | None = None  # absent: Linear weights in `dtype`
    tokenizer: str = SENTENCEPIECE  # or HF_TOKENIZERS; the file is TOKENIZER_FILES[tokenizer]
    chat_template: str = LLAMA2_CHAT  # or JINJA_CHAT (CHAT_TEMPLATE_FILE) or NO_CHAT
    # What a Jinja template calls the special tokens (bos_token, eos_token, …), from tokenizer_config.json
    special_tokens: dict[str, str] = field(default_factory=dict)

    @property
    def tokenizer_file(self) -> str:
        return TOKENIZER_FILES[self.tokenizer]

    @property
    def kv_dtype(self) -> str:
        return "float16" if self.dtype == "fp16" else "float32"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> BuildManifest:
        version = data.get("manifest_version")
        if version not in READABLE_MANIFEST_VERSIONS:
            raise ArtifactError(
                f"manifest version {version!r} is not supported (this llmpack reads versions "
                f"{', '.join(map(str, READABLE_MANIFEST_VERSIONS))}); rebuild the artifact with this llmpack's "
                "`llm-export build`"
            )
        if data.get("tokenizer", SENTENCEPIECE) not in TOKENIZER_FILES or \
                data.get("chat_template", LLAMA2_CHAT) not in CHAT_TEMPLATES:
            raise ArtifactError(
                f"tokenizer {data.get('tokenizer')!r} / chat template {data.get('chat_template')!r} are unknown to "
                "this llmpack; rebuild the artifact with this llmpack's `llm-export build`"
            )
        flavour = data.get("graph_flavour", STANDARD_GRAPH)
        if flavour not in GRAPH_FLAVOURS:
            raise ArtifactError(
                f"graph flavour {flavour!r} is unknown to this llmpack (it runs {', '.join(GRAPH_FLAVOURS)}); "
                "rebuild the artifact with this llmpack's `llm-export build`"
            )
        try:
            return cls(
                **{
                    **data,
                    "config": ModelConfig(**data["config"]),
                    "stop_token_ids": tuple(data["stop_token_ids"]),
                    "inputs": tuple(_tensor_spec(t) for t in data["inputs"]),
                    "outputs": tuple(_tensor_spec(t) for t in data["outputs"]),
                    "source": SourceInfo(
                        path=data["source"]["path"],
                        files=tuple(FileDigest(**f) for f in data["source"]["files"]),
                    ),
                    "files": tuple(FileDigest(**f) for f in data["files"]),
                    "engine": EngineInfo.from_dict(data["engine"]) if data.get("engine") else None,
                    "quant": QuantInfo(**data["quant"]) if data.get("quant") else None,
                }
            )
        except (KeyError, TypeError) as exc:
            raise ArtifactError(
                f"manifest.json does not match schema version {MANIFEST_VERSION} ({exc}); "
                "rebuild the artifact"
            ) from exc


def _tensor_spec(data: dict) -> TensorSpec:
    return TensorSpec(name=data["name"], dtype=data["dtype"], shape=tuple(data["shape"]))


def sha256_file(path: Path, chunk: int = 1 << 22, on_bytes: Callable[[int], None] | None = None) -> str:
    """SHA-256 of a file read in chunks; `on_bytes(n)` after each (progress of a long hash)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return digest.hexdigest()


def digest_file(folder: Path, relative: str, on_bytes: Callable[[int], None] | None = None) -> FileDigest:
    path = folder / relative
    return FileDigest(path=relative, sha256=sha256_file(path, on_bytes=on_bytes), size=path.stat().st_size)


def read_manifest(artifact: Path) -> BuildManifest:
    """Read and parse manifest.json; raises ArtifactError with the fix when anything is off."""
    path = Path(artifact) / MANIFEST_FILE
    if not Path(artifact).is_dir():
        raise ArtifactError(f"artifact folder {artifact} does not exist; build it with `llm-export build`")
    if not path.is_file():
        raise ArtifactError(
            f"{artifact} is not an llmpack artifact (no {MANIFEST_FILE}); build it with `llm-export build`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); rebuild the artifact") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} is not a JSON object; rebuild the artifact")
    return BuildManifest.from_dict(data)


def check_artifact_files(artifact: Path, manifest: BuildManifest, verify_checksums: bool = True) -> None:
    """Refuse an artifact whose files are missing, resized or (optionally) changed since the build."""
    folder = Path(artifact).resolve()
    for entry in manifest.files:
        path = (folder / entry.path).resolve()
        if folder not in path.parents:
            raise ArtifactError(f"manifest names {entry.path!r}, which is outside the artifact; rebuild it")
        if not path.is_file():
            raise ArtifactError(f"artifact file {entry.path} is missing from {artifact}; rebuild the artifact")
        if path.stat().st_size != entry.size:
            raise ArtifactError(
                f"artifact file {entry.path} is {path.stat().st_size} bytes, the manifest says "
                f"{entry.size}; the artifact is damaged, rebuild it"
            )
        if verify_checksums and sha256_file(path) != entry.sha256:
            raise ArtifactError(
                f"artifact file {entry.path} does not match its SHA-256 in the manifest; "
                "the artifact is damaged or was modified, rebuild it"
            )
