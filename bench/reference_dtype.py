"""Measurement: is a bf16 PyTorch reference as fair a judge of int8/int4 artifacts as the fp32 one?

`llm-export verify` falls back to a bf16 reference when the fp32 one does not fit (a 7B model is 27 GB in
fp32). This builds stories260k at int4 and int8, measures each against the fp32 and the bf16 reference with
export/quality.py's own functions, and the bf16 model against the fp32 one. Writes
bench/results/reference-dtype-<date>.md.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import header, write_results  # noqa: E402


def main() -> None:
    import torch
    from transformers import LlamaForCausalLM

    from llmpack.export import quality
    from llmpack.export.build import BuildOptions, build, resolve_source
    from llmpack.runtime.artifact import open_artifact, open_backend

    source = resolve_source("stories260k")
    models = {name: LlamaForCausalLM.from_pretrained(str(source), dtype=dtype).eval()
              for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for quant in ("int8", "int4"):
            artifact = open_artifact(build(BuildOptions(model=str(source), out=Path(tmp) / quant, quant=quant)).path)
            ids = quality.quality_ids(artifact, quality.MAX_TOKENS)
            candidate = quality.artifact_logits(open_backend(artifact), ids)
            for name, model in models.items():
                rows.append((quant, name, quality.compare(quality.reference_logits(model, ids), candidate)))
        own = quality.compare(quality.reference_logits(models["fp32"], ids), quality.reference_logits(models["bf16"], ids))
    lines = [header("bf16 vs fp32 PyTorch reference for judging quantized artifacts", "torch", "transformers",
                    "onnxruntime"),
             f"stories260k, {own.tokens} teacher-forced tokens of export/quality.py's text; limits "
             f"{quality.THRESHOLDS} (min decided top-1 agreement, max mean KL)", "",
             "| artifact | reference | decided top-1 agreement | all top-1 | mean KL (nats) |", "|---|---|---|---|---|",
             *(f"| {q} | {r} | {m.decided_agreement:.3f} of {m.decided} | {m.top1_agreement:.3f} | {m.mean_kl:.2e} |"
               for q, r, m in rows),
             f"| bf16 model | fp32 | {own.decided_agreement:.3f} of {own.decided} | {own.top1_agreement:.3f} | "
             f"{own.mean_kl:.2e} |"]
    write_results("reference-dtype", lines)


if __name__ == "__main__":
    main()
