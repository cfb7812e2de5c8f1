"""Benchmark peer: Hugging Face Optimum (optimum-onnx's ORTModelForCausalLM on onnxruntime's CPU provider).

Runs inside artifacts/.peers/optimum (never llmpack's environment); prints one JSON line in the same
record as `llm-serve bench` (cli/bench_workload.py, loaded by path), for the same prompt ids. The model
is optimum's own export (text-generation-with-past, fp32, no --optimize); it is driven through
ORTModelForCausalLM.forward as generate() drives it: one forward over the prompt, then one per token
feeding back past_key_values (use_cache=True), a ones attention mask and optimum's position ids. The
shared loop takes the greedy argmax of the last position's logits, so no stop token can end a run early.
Otherwise Optimum's defaults: CPUExecutionProvider, io_binding off (its default on CPU), ORT's default
graph optimizations; the session gets the benchmark's thread count (intra-op; inter-op 1, as the genai peer).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from optimum.onnxruntime import ORTModelForCausalLM

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_workload", REPO / "cli" / "bench_workload.py")
workload = importlib.util.module_from_spec(spec)
spec.loader.exec_module(workload)


class OptimumRunner:
    def __init__(self, model_dir: Path, threads: int, total_tokens: int):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.model = ORTModelForCausalLM.from_pretrained(
            str(model_dir), provider="CPUExecutionProvider", session_options=options, use_cache=True,
            local_files_only=True)
        self.mask = torch.ones((1, total_tokens), dtype=torch.long)  # sliced to the length seen so far
        self.past = None
        self.length = 0

    @torch.inference_mode()
    def _forward(self, ids: list[int]) -> np.ndarray:
        self.length += len(ids)
        out = self.model(input_ids=torch.tensor([ids], dtype=torch.long), attention_mask=self.mask[:, :self.length],
                         past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[0, -1].numpy()

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.reset()
        return self._forward(ids)

    def step(self, token: int) -> np.ndarray:
        return self._forward([token])

    def reset(self) -> None:
        self.past = None
        self.length = 0


def main() -> None:
    args = workload.peer_parser(__doc__, "Folder optimum's ONNX exporter wrote (make bench-peers).").parse_args()
    torch.set_num_threads(args.threads)  # the few torch ops around the session (mask, position ids)
    vocab = json.loads((args.source / "config.json").read_text())["vocab_size"]
    runner = OptimumRunner(args.source, args.threads, args.prompt_tokens + args.new_tokens)
    size = sum(f.stat().st_size for f in args.source.iterdir() if f.name.startswith("model.onnx"))
    workload.run_peer(args, runner, vocab, size, ("optimum-onnx", "optimum", "onnxruntime", "torch",
                                                 "transformers", "numpy"))


if __name__ == "__main__":
    main()
