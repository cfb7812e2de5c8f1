"""Benchmark peer: llama.cpp through llama-cpp-python (a GGUF file, f32, q8_0 or q4_0, on its CPU backend).

Runs inside artifacts/.peers/llamacpp (never llmpack's environment); prints one JSON line in the same
record as `llm-serve bench` (cli/bench_workload.py, loaded by path), for the same prompt ids. The
prompt goes in as token ids (no tokenizer, no added BOS: prompt_ids already starts with BOS 1), one
llama_decode for the prompt, then one per token; the shared loop takes the greedy argmax of the last
position's logits read in place (llama_get_logits_ith), so no stop token can end a run early.
Otherwise llama-cpp-python's defaults: mmap'd weights, flash attention off, f16 KV cache.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import llama_cpp
import numpy as np

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_workload", REPO / "cli" / "bench_workload.py")
workload = importlib.util.module_from_spec(spec)
spec.loader.exec_module(workload)


class LlamaCppRunner:
    def __init__(self, model: Path, threads: int, total_tokens: int, prompt_tokens: int):
        batch = max(512, prompt_tokens)  # the whole prompt in one llama_decode, as genai and llmpack do
        self.llm = llama_cpp.Llama(str(model), n_ctx=total_tokens, n_batch=batch, n_ubatch=batch,
                                   n_threads=threads, n_threads_batch=threads, n_gpu_layers=0,
                                   logits_all=False, verbose=False)
        self.vocab = self.llm.n_vocab()

    def _forward(self, ids: list[int]) -> np.ndarray:
        self.llm.eval(ids)  # llama_decode; logits are kept for the batch's last position only
        logits = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(self.vocab,))

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        return self._forward(ids)

    def step(self, token: int) -> np.ndarray:
        return self._forward([token])

    def reset(self) -> None:
        self.llm.reset()  # n_tokens = 0: the next eval drops the KV cache from position 0 on


def linear_bytes(model: Path) -> int:
    """Bytes of the 2-D weights one decode step reads, as stored (token_embd excluded: one row is read).

    Counted from the GGUF itself: llama.cpp's q4_0 keeps output.weight in q6_K, so the nominal bytes of
    the precision would misstate its roofline.
    """
    from gguf import GGUFReader

    tensors = GGUFReader(str(model)).tensors
    return sum(int(t.n_bytes) for t in tensors
               if len(t.shape) == 2 and min(t.shape) > 1 and not t.name.startswith("token_embd"))


def main() -> None:
    args = workload.peer_parser(__doc__, "GGUF model file (make bench-peers writes them).").parse_args()
    if args.weight_bytes is None:
        args.weight_bytes = linear_bytes(args.source)
    runner = LlamaCppRunner(args.source, args.threads, args.prompt_tokens + args.new_tokens, args.prompt_tokens)
    workload.run_peer(args, runner, runner.vocab, args.source.stat().st_size,
                      ("llama_cpp_python", "gguf", "numpy"))


if __name__ == "__main__":
    main()
