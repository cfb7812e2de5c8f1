"""Benchmark peer: onnxruntime-genai (model builder's fused graph + its C++ Generator loop).

Runs inside artifacts/.peers/genai (never llmpack's environment); prints one JSON line in the same
record as `llm-serve bench` (cli/bench_workload.py, loaded by path), for the same prompt ids.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_workload", REPO / "cli" / "bench_workload.py")
workload = importlib.util.module_from_spec(spec)
spec.loader.exec_module(workload)
DONE = np.zeros(1)  # genai picks the greedy token itself; the shared loop's argmax then costs nothing


class GenaiRunner:
    def __init__(self, model_dir: Path, threads: int, total_tokens: int):
        config = og.Config(str(model_dir))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        self.total = total_tokens
        self.generator = None

    def prefill(self, ids: list[int]) -> np.ndarray:
        params = og.GeneratorParams(self.model)
        # min_length = max_length: the end-of-sequence token can never stop the run early.
        params.set_search_options(do_sample=False, max_length=self.total, min_length=self.total)
        self.generator = og.Generator(self.model, params)
        self.generator.append_tokens(np.asarray([ids], dtype=np.int32))
        self.generator.generate_next_token()  # greedy pick from the prompt's logits
        return DONE

    def step(self, _token: int) -> np.ndarray:
        self.generator.generate_next_token()  # one decode forward + greedy pick
        return DONE

    def reset(self) -> None:
        self.generator = None


def main() -> None:
    args = workload.peer_parser(__doc__, "Folder the onnxruntime-genai model builder wrote.").parse_args()
    vocab = json.loads((args.source / "genai_config.json").read_text())["model"]["vocab_size"]
    runner = GenaiRunner(args.source, args.threads, args.prompt_tokens + args.new_tokens)
    size = sum(f.stat().st_size for f in args.source.iterdir() if f.suffix in (".onnx", ".data"))
    workload.run_peer(args, runner, vocab, size, ("onnxruntime-genai", "onnxruntime", "numpy"))


if __name__ == "__main__":
    main()
