"""CLI edge: the human-readable view of a manifest for `llm-export inspect`."""

from __future__ import annotations

from llmpack.runtime.backends.fused_interface import has_mixed_graph
from llmpack.runtime.backends.mlas_layout import linear_weight_bytes, streamed_bits_per_weight
from llmpack.runtime.manifest import BuildManifest, TensorSpec


def _shape(spec: TensorSpec) -> str:
    return f"{spec.name:<28} {spec.dtype:<8} [{', '.join(map(str, spec.shape))}]"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _axis(bounds: tuple[int, int, int]) -> str:
    low, opt, high = bounds
    return f"{low}…{high} (opt {opt})"


def _optional_sections(m: BuildManifest) -> list[str]:
    """What only some builds have: quantized weights, a TensorRT engine."""
    lines = []
    if m.quant is not None:
        q = m.quant
        lines.append(f"quant         {q.method}: {q.bits}-bit weights, block {q.block_size}, accuracy level "
                     f"{q.accuracy_level}, {'symmetric' if q.symmetric else 'with zero points'}")
        bits = streamed_bits_per_weight(q.bits, q.block_size, q.accuracy_level, q.symmetric)
        lines.append(f"              read per token on the CPU: {bits:.2f} bits per weight as ONNX Runtime holds them, "
                     f"{_size(linear_weight_bytes(m))} of Linear weights")
    if m.engine is not None:
        e = m.engine
        lines.append(f"engine        TensorRT {e.tensorrt_version} for {e.gpu_name} (compute {e.compute_capability}), "
                     f"max batch {e.max_batch}, workspace {_size(e.workspace_bytes)}, "
                     f"{'strongly typed' if e.strongly_typed else 'weakly typed'}")
        if e.tensorrt_distribution or e.cuda_runtime:  # recorded since issue 16; older manifests lack them
            lines.append(f"              built with {e.tensorrt_distribution or 'an unrecorded TensorRT wheel'}, "
                         f"CUDA runtime {e.cuda_runtime or 'unrecorded'}")
        lines += [f"              profile {p.name:<8} batch {_axis(p.batch)}, seq {_axis(p.seq)}, past {_axis(p.past)}"
                  for p in e.profiles]
        lines += [f"                {f.path:<34} {_size(f.size):>10}  sha256 {f.sha256[:16]}…" for f in e.files]
    return lines


def build_summary(m: BuildManifest) -> str:
    """One line for the end of `llm-export build`: which graph, weights and context were built."""
    weights = f"{m.quant.method} weights (block {m.quant.block_size})" if m.quant else f"{m.dtype} weights"
    return f"{m.graph_flavour} graph, {weights}, {m.dtype} activations, context {m.max_context}"


def describe(m: BuildManifest) -> str:
    c = m.config
    lines = [
        f"artifact      {m.name}  (manifest v{m.manifest_version}, llmpack {m.llmpack_version}, built {m.built_at})",
        f"model         {c.architecture}: {c.num_layers} layers, hidden {c.hidden_size}, MLP {c.intermediate_size}, "
        f"{c.num_heads} heads / {c.num_kv_heads} kv heads × {c.head_dim}, vocab {c.vocab_size}",
        f"              rms_norm_eps {c.rms_norm_eps}, rope_theta {c.rope_theta}, tied embeddings {c.tie_word_embeddings}",
        f"              rope scaling {c.rope_scaling or 'none'}, q/k/v biases {c.attention_bias}, "
        f"sliding window {c.sliding_window or 'none'}",
        f"build         {m.dtype}, context {m.max_context} (model max {c.max_position_embeddings}), opset {m.opset}, "
        f"graph {m.graph_flavour}" + (" + mixed decode/prefill step (mixed.onnx)" if has_mixed_graph(m) else ""),
        *_optional_sections(m),
        f"tokens        BOS {m.bos_token_id}, stop {list(m.stop_token_ids)}; tokenizer {m.tokenizer} "
        f"({m.tokenizer_file}), chat template {m.chat_template}",
        f"system prompt {m.default_system_prompt!r}",
        f"source        {m.source.path}",
        *(f"                {f.path:<34} {_size(f.size):>10}  sha256 {f.sha256[:16]}…" for f in m.source.files),
        "files",
        *(f"                {f.path:<34} {_size(f.size):>10}  sha256 {f.sha256[:16]}…" for f in m.files),
        "tools         " + ", ".join(f"{k} {v}" for k, v in sorted(m.tool_versions.items())),
        f"inputs ({len(m.inputs)})",
        *(f"                {_shape(t)}" for t in m.inputs[:5]),
        f"outputs ({len(m.outputs)})",
        *(f"                {_shape(t)}" for t in m.outputs[:5]),
    ]
    if len(m.inputs) > 5:
        lines.insert(-len(m.outputs[:5]) - 1, f"                … {len(m.inputs) - 5} more past_key_values")
    return "\n".join(lines)
