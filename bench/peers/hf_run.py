"""Benchmark peer: transformers + torch, eager, with its own KV cache (DynamicCache), fp32 or bf16.

Runs in its own process (llmpack's venv has torch and transformers for export; serving never imports
them); prints one JSON line in the same record as `llm-serve bench` for the same prompt ids.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_workload", REPO / "cli" / "bench_workload.py")
workload = importlib.util.module_from_spec(spec)
spec.loader.exec_module(workload)


class HfRunner:
    def __init__(self, source: Path, dtype: str):
        self.model = LlamaForCausalLM.from_pretrained(str(source), dtype=getattr(torch, dtype)).eval()
        self.past = None

    @torch.inference_mode()
    def _forward(self, ids: list[int]):
        out = self.model(torch.tensor([ids]), past_key_values=self.past, use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values
        return out.logits[0, -1].float().numpy()

    def prefill(self, ids: list[int]):
        self.past = None
        return self._forward(ids)

    def step(self, token: int):
        return self._forward([token])

    def reset(self) -> None:
        self.past = None


def main() -> None:
    parser = workload.peer_parser(__doc__, "Hugging Face checkpoint folder.")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runner = HfRunner(args.source, args.dtype)
    size = sum(f.stat().st_size for f in args.source.glob("*.safetensors"))
    workload.run_peer(args, runner, runner.model.config.vocab_size, size, ("torch", "transformers", "numpy"))


if __name__ == "__main__":
    main()
