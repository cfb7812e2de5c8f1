"""Benchmark: prompt-lookup speculative decoding — what it buys on text that repeats its input, what it costs on
text that does not, and what checking k tokens costs against one step at a real model's size.

(a) One artifact (stories260k: a trained model, so acceptance is real), greedy, in ONE process alternating
    `--speculate off` and `ngram` engines request by request: decode tok/s (tokens after the first / time
    after the first) and the share of proposed tokens accepted, for input-grounded prompts (a story, then
    its first sentence again: the model retells it) and free prompts (a story's first words only).
(b) The step costs at bench-110m size, backend only: a decode step (1 token) against a step checking
    k speculated tokens (k + 1 fed), alternating, after a 128-token prompt. Speed-up at a model's size ≈
    (tokens per step) / (cost of that step relative to one decode step). Then (a) again on that artifact:
    random weights rarely repeat, so it shows what speculation costs where it does not pay, with the
    engine's own cost model (speculation.best_k) choosing k.
Writes bench/results/speculation-<date><label>.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import header, write_results  # noqa: E402

STORIES = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her dog, "
    "Max. One day, Lily and Max found a big red ball under a tree. They played with the ball all day long.",
    "Tom had a small blue boat. Every morning he took the boat to the pond and watched it float. One windy day "
    "the boat sailed far away, and Tom was sad. His friend Sue helped him get the boat back.",
    "There was a big brown bear who lived in the woods. The bear liked honey more than anything. One day the "
    "bear saw a bee hive high in a tree and climbed up to get the honey.",
]


def prompt_sets() -> dict[str, list[str]]:
    grounded = [f"{story}\n\n{story.split('.')[0]}." for story in STORIES]  # retell: the story, then its start
    free = [" ".join(story.split()[:4]) for story in STORIES]
    return {"input-grounded": grounded, "free": free}


def timed_answer(engine, prompt: str, new_tokens: int) -> tuple[float, int]:
    from llmpack.runtime.sampling import SamplingParams

    ids = [engine.tokenizer.bos_id, *engine.tokenizer.encode(prompt)]
    first, count = None, 0
    start = time.perf_counter()
    for _ in engine.generate_ids(ids, new_tokens, SamplingParams(temperature=0), stop_ids=[]):
        count += 1
        first = first or time.perf_counter()
    elapsed = time.perf_counter() - (first or start)
    return (count - 1) / elapsed if count > 1 and elapsed > 0 else float("nan"), count


def acceptance_part(artifact: Path, rounds: int, new_tokens: int) -> list[str]:
    from llmpack.runtime.engine import Engine, EngineOptions

    engines = {mode: Engine.load(artifact, EngineOptions(speculate=mode, prefix_cache_mb=0, max_batch=1))
               for mode in ("off", "ngram")}
    lines = [f"## (a) {artifact.name}: greedy, {new_tokens} new tokens, {rounds} rounds alternating off / ngram", "",
             "| prompts | off decode tok/s | ngram decode tok/s | ngram / off | accepted / proposed | "
             "tokens per ngram step |", "|---|---|---|---|---|---|"]
    try:
        for name, prompts in prompt_sets().items():
            speeds = {"off": [], "ngram": []}
            scheduler = engines["ngram"].scheduler
            proposed, accepted, steps_tokens = scheduler.proposed, scheduler.accepted, 0
            for round_ in range(rounds):
                for prompt in prompts:
                    for mode in (("off", "ngram") if round_ % 2 == 0 else ("ngram", "off")):
                        speed, count = timed_answer(engines[mode], prompt, new_tokens)
                        speeds[mode].append(speed)
                        steps_tokens += count if mode == "ngram" else 0
            proposed, accepted = scheduler.proposed - proposed, scheduler.accepted - accepted
            off, on = statistics.median(speeds["off"]), statistics.median(speeds["ngram"])
            steps = steps_tokens - accepted  # each accepted token saved one step
            lines.append(f"| {name} | {off:.0f} | {on:.0f} | **{on / off:.2f}×** | {accepted} / {proposed} "
                         f"({accepted / max(proposed, 1):.0%}) | {steps_tokens / max(steps, 1):.2f} |")
    finally:
        for engine in engines.values():
            engine.close()
    return [*lines, ""]


def cost_part(artifact: Path, rounds: int, ks: list[int]) -> list[str]:
    import numpy as np

    from llmpack.runtime.artifact import open_artifact, open_backend

    backend = open_backend(open_artifact(artifact, verify_checksums=False), "cpu", max_batch=1)
    if not getattr(backend, "can_score", False):
        return [f"## (b) {artifact.name}: no speculation step (rebuild it with this llmpack)", ""]
    prompt = [1, *np.random.default_rng(0).integers(3, backend.vocab_size, 127).tolist()]
    times: dict[int, list[float]] = {k: [] for k in [0, *ks]}
    for _ in range(rounds):
        for k in [0, *ks]:  # each step starts from the same 128 cached tokens
            backend.prefill(0, prompt)
            started = time.perf_counter()
            backend.decode([0], [5]) if k == 0 else backend.score(0, [5] * (k + 1))
            times[k].append(time.perf_counter() - started)
            backend.reset(0)
    one = statistics.median(times[0])
    lines = [f"## (b) {artifact.name}: one step after a 128-token prompt, median of {rounds}", "",
             "| step | ms | × a decode step |", "|---|---|---|", f"| decode (1 token) | {1000 * one:.2f} | 1.00× |"]
    lines += [f"| check {k} speculated ({k + 1} fed) | {1000 * statistics.median(times[k]):.2f} | "
              f"{statistics.median(times[k]) / one:.2f}× |" for k in ks]
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--acceptance", type=Path, required=True, help="A trained ort-fused artifact (stories260k).")
    parser.add_argument("--cost", type=Path, nargs="*", default=[], help="ort-fused artifacts for the step costs.")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--cost-rounds", type=int, default=30)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    lines = [header("Speculative decoding: acceptance and step costs", "onnxruntime", "numpy"), ""]
    lines += acceptance_part(args.acceptance, args.rounds, args.new_tokens)
    for artifact in args.cost:
        lines += cost_part(artifact, args.cost_rounds, [1, 2, 4, 8])
        # the engine as served at that size: its own cost model decides how much to speculate (random weights:
        # what a model that rarely repeats costs with speculation on)
        lines += acceptance_part(artifact, max(1, args.rounds // 2), 128)
    write_results("speculation", lines, args.label)


if __name__ == "__main__":
    main()
