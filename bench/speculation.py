"""Benchmark: prompt-lookup speculative decoding — what it buys on text that repeats its input, what it costs on
text that does not, and what checking k tokens costs against one step at a real model's size.

(a) One artifact (stories260k: a trained model, so acceptance is real), greedy, in ONE process alternating
    `--speculate off`, `ngram` and a second `off` (the noise floor) engines request by request: decode tok/s
    (tokens after the first / time after the first) and the share of proposed tokens accepted, for
    input-grounded prompts (a story, then its first sentence again: the model retells it) and free prompts (a
    story's first words only).
    The ceiling column: tokens per step were every step to check the proposer's guess (k ≤ 4, k ≤ 8) against
    the plain answer — what prompt lookup can give on that text at best, whatever the engine's overhead.
(b) The step costs at bench-110m size, backend only: a decode step (1 token) against a step checking
    k speculated tokens (k + 1 fed), alternating, after a 128-token prompt. Speed-up at a model's size ≈
    (tokens per step) / (cost of that step relative to one decode step). Then (a) again on that artifact:
    random weights rarely repeat, so it shows what speculation costs where it does not pay, with the
    engine's own cost model (speculation.best_k) choosing k.
(d) --served: the same prompts through `llm-serve run --speculate off|ngram`, as a client on this machine sees it.
(c) --batch-cost: a check inside a batched step (batch - 1 rows decode, one row checks) against plain
    batched decode: whether speculation could pay within continuous batching.
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


def lookup_ceiling(prompt_ids: list[int], answer: list[int], k: int) -> float:
    """Tokens per step if every step checked the proposer's guess of up to k tokens against this (greedy)
    answer: what prompt lookup could give at best on this text, were a check as cheap as a decode step."""
    from llmpack.runtime.speculation import NgramProposer

    proposer, done, steps = NgramProposer().extend(prompt_ids), 0, 0
    while done < len(answer):
        guess = proposer.propose(min(k, len(answer) - done - 1))
        kept = next((i for i, token in enumerate(guess) if token != answer[done + i]), len(guess))
        proposer.extend(answer[done:done + kept + 1])
        done, steps = done + kept + 1, steps + 1
    return len(answer) / max(steps, 1)


def timed_ids(engine, ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
    from llmpack.runtime.sampling import SamplingParams

    first, answer = None, []
    start = time.perf_counter()
    for token in engine.generate_ids(ids, new_tokens, SamplingParams(temperature=0), stop_ids=[]):
        answer.append(token)
        first = first or time.perf_counter()
    elapsed = time.perf_counter() - (first or start)
    return (len(answer) - 1) / elapsed if len(answer) > 1 and elapsed > 0 else float("nan"), answer


MODES = {"off": "off", "ngram": "ngram", "off again": "off"}  # name -> --speculate; "off again": the noise floor


def acceptance_part(artifact: Path, rounds: int, new_tokens: int) -> list[str]:
    from llmpack.runtime.engine import Engine, EngineOptions

    engines = {name: Engine.load(artifact, EngineOptions(speculate=mode, prefix_cache_mb=0, max_batch=1))
               for name, mode in MODES.items()}
    lines = [f"## (a) {artifact.name}: greedy, {new_tokens} new tokens, {rounds} rounds rotating off / ngram / "
             "off again", "",
             "| prompts | off decode tok/s | ngram decode tok/s | ngram / off: median pair (quartiles) | "
             "off again / off: the noise | accepted / proposed | tokens per ngram step | "
             "ceiling: tokens per step, k ≤ 4 / 8 |", "|---|---|---|---|---|---|---|---|"]
    try:
        for name, prompts in prompt_sets().items():
            lines.append(compare_modes(engines, name, prompts, rounds, new_tokens))
    finally:
        for engine in engines.values():
            engine.close()
    return [*lines, ""]


def compare_modes(engines: dict, name: str, prompts: list[str], rounds: int, new_tokens: int) -> str:
    """One row: each prompt runs off, ngram and off again back to back (the order rotating by round), and the
    ratios are taken per set — on a 0.2 ms-per-token model one request lasts ~70 ms, and the machine's drift
    between requests moves a ratio by ±15 %. "off again / off" is that noise: the same engine twice."""
    speeds, answers, scheduler = {mode: [] for mode in MODES}, {}, engines["ngram"].scheduler
    ratios: dict[str, list[float]] = {"ngram": [], "off again": []}
    proposed, accepted, tokens = scheduler.proposed, scheduler.accepted, 0
    order = list(MODES)
    for round_ in range(rounds):
        for prompt in prompts:
            ids = [engines["off"].tokenizer.bos_id, *engines["off"].tokenizer.encode(prompt)]
            pair = {}
            for mode in order[round_ % 3:] + order[:round_ % 3]:
                pair[mode], answer = timed_ids(engines[mode], ids, new_tokens)
                speeds[mode].append(pair[mode])
                tokens += len(answer) if mode == "ngram" else 0
                answers[tuple(ids)] = answer
            for mode, values in ratios.items():
                values.append(pair[mode] / pair["off"])
    proposed, accepted = scheduler.proposed - proposed, scheduler.accepted - accepted
    steps = tokens - accepted  # each accepted token saved one step
    ceilings = [statistics.mean(lookup_ceiling(list(ids), answer, k) for ids, answer in answers.items())
                for k in (4, 8)]
    return (f"| {name} | {statistics.median(speeds['off']):.0f} | {statistics.median(speeds['ngram']):.0f} | "
            f"**{spread(ratios['ngram'])}** | {spread(ratios['off again'])} | {accepted} / {proposed} "
            f"({accepted / max(proposed, 1):.0%}) | {tokens / max(steps, 1):.2f} | "
            f"{ceilings[0]:.2f} / {ceilings[1]:.2f} |")


def spread(ratios: list[float]) -> str:
    quartiles = statistics.quantiles(ratios, n=4)
    return f"{statistics.median(ratios):.2f}× ({quartiles[0]:.2f}–{quartiles[2]:.2f})"


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


def batch_cost_part(artifact: Path, rounds: int, batches: list[int], ks: list[int]) -> list[str]:
    """(c) What speculation inside continuous batching would cost. ONNX Runtime's CPU GroupQueryAttention
    refuses batch > 1 with several new tokens per row after a cache ("batch_size must be 1 when
    sequence_length > 1 and past context is given"), so rows cannot all check proposals in one step; the
    shape that runs is the mixed step's: batch - 1 rows decode while one row is fed k + 1 tokens (mixed.onnx
    gives that row's last logits only, a check needs all k + 1: the head over k more positions is the
    difference, small beside the layers). Against a plain decode step of the whole batch; rows 128 tokens in."""
    import numpy as np

    from llmpack.runtime.artifact import open_artifact, open_backend

    backend = open_backend(open_artifact(artifact, verify_checksums=False), "cpu", max_batch=max(batches))
    if not getattr(backend, "can_mix", False):
        return [f"## (c) {artifact.name}: no mixed-step graph (mixed.onnx)", ""]
    prompt = [1, *np.random.default_rng(0).integers(3, backend.vocab_size, 127).tolist()]
    for slot in range(max(batches)):
        backend.prefill(slot, prompt)
    times = {(b, k): [] for b in batches for k in [0, *ks]}
    for _ in range(rounds):
        for (b, k), samples in times.items():
            started = time.perf_counter()
            if k == 0:
                backend.decode(list(range(b)), [5] * b)
            else:  # the last row checks k speculated tokens (k + 1 fed) beside the others' decode step
                backend.decode_and_prefill(list(range(b - 1)), [5] * (b - 1), b - 1, [5] * (k + 1))
            samples.append(time.perf_counter() - started)
            for slot in range(b):
                backend.truncate(slot, len(prompt))
    lines = [f"## (c) {artifact.name}: batch - 1 rows decode + 1 row fed k + 1 tokens, vs plain batched decode, "
             f"median of {rounds}", "", "| batch | decode step ms | " + " | ".join(f"check {k} (× decode)" for k in ks)
             + " |", "|---|---|" + "---|" * len(ks)]
    for b in batches:
        one = statistics.median(times[(b, 0)])
        cells = [f"{1000 * statistics.median(times[(b, k)]):.2f} ({statistics.median(times[(b, k)]) / one:.2f}×)"
                 for k in ks]
        lines.append(f"| {b} | {1000 * one:.2f} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def served_part(artifact: Path, rounds: int, new_tokens: int) -> list[str]:
    """(d) As a user measures: `llm-serve run ARTIFACT --speculate off` and `--speculate ngram` (every other
    option its default) side by side on loopback, and a streaming client on this machine sending each prompt to
    one then the other (order alternating): decode tok/s as the client sees it, per-pair ratios. Greedy, so both
    servers send the same text (tests/test_speculation_engine.py); the Workers AI route, raw prompts."""
    import subprocess

    from served_vs_engine import free_port, llmpack_request, wait_ready

    ports = {mode: free_port() for mode in ("off", "ngram")}
    command = str(Path(sys.executable).parent / "llm-serve")
    servers = {mode: subprocess.Popen([command, "run", str(artifact), "--speculate", mode, "--port", str(port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for mode, port in ports.items()}
    lines = [f"## (d) {artifact.name} served: `llm-serve run --speculate off|ngram`, a streaming client, greedy, "
             f"{new_tokens} new tokens, {rounds} rounds alternating", "",
             "| prompts | off decode tok/s | ngram decode tok/s | ngram / off: median pair (quartiles) |",
             "|---|---|---|---|"]
    try:
        for mode, server in servers.items():
            wait_ready(server, f"http://127.0.0.1:{ports[mode]}/ready")
        for name, prompts in prompt_sets().items():
            speeds, ratios = {"off": [], "ngram": []}, []
            for round_ in range(rounds):
                for prompt in prompts:
                    pair = {mode: llmpack_request(f"http://127.0.0.1:{ports[mode]}", prompt, new_tokens)["decode"]
                            for mode in (("off", "ngram") if round_ % 2 == 0 else ("ngram", "off"))}
                    for mode, speed in pair.items():
                        speeds[mode].append(speed)
                    ratios.append(pair["ngram"] / pair["off"])
            lines.append(f"| {name} | {statistics.median(speeds['off']):.0f} | "
                         f"{statistics.median(speeds['ngram']):.0f} | **{spread(ratios)}** |")
    finally:
        for server in servers.values():
            server.terminate()
            server.wait(timeout=30)
    return [*lines, ""]


def larger_model_workload(args) -> tuple[int, int]:
    """(rounds, new tokens) at bench-110m size: a third of the rounds, 128 tokens (a request takes ~2 s, not 70 ms)."""
    return max(2, args.rounds // 3), 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--acceptance", type=Path, nargs="*", default=[],
                        help="Trained ort-fused artifacts (stories260k).")
    parser.add_argument("--cost", type=Path, nargs="*", default=[], help="ort-fused artifacts for (b), then (a).")
    parser.add_argument("--served", type=Path, nargs="*", default=[],
                        help="artifacts for (d): through `llm-serve run`, off vs ngram.")
    parser.add_argument("--step-cost", type=Path, nargs="*", default=[],
                        help="ort-fused artifacts for (b) alone (a 7B one: (a) there would take hours).")
    parser.add_argument("--rounds", type=int, default=12, help="(a)'s rounds; a third of them at bench-110m size.")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--cost-rounds", type=int, default=30)
    parser.add_argument("--batch-cost", type=Path, nargs="*", default=[],
                        help="ort-fused artifacts for (c): a k-token check inside a batched step.")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    lines = [header("Speculative decoding: acceptance and step costs", "onnxruntime", "numpy"), ""]
    for artifact in args.acceptance:
        lines += acceptance_part(artifact, args.rounds, args.new_tokens)
    for artifact in args.cost:
        lines += cost_part(artifact, args.cost_rounds, [1, 2, 4, 8])
        # the engine as served at that size: its own cost model decides how much to speculate (random weights:
        # what a model that rarely repeats costs with speculation on)
        lines += acceptance_part(artifact, *larger_model_workload(args))
    for artifact in args.served:
        workload = (args.rounds, args.new_tokens) if artifact in args.acceptance else larger_model_workload(args)
        lines += served_part(artifact, *workload)
    for artifact in args.step_cost:
        lines += cost_part(artifact, args.cost_rounds, [1, 2, 4, 8])
    for artifact in args.batch_cost:
        lines += batch_cost_part(artifact, args.cost_rounds, [2, 4], [1, 2, 4])
    write_results("speculation", lines, args.label)


if __name__ == "__main__":
    main()
