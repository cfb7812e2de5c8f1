"""Benchmark: batch-1 decode speed on 4 KiB pages vs after moving the weights onto 2 MiB pages.

This VM's memory bandwidth is set per process (it moves by ±20 % between two runs of the same
command), so a comparison across processes needs many rounds to see a few percent. Instead each
process measures itself twice: it loads the artifact on 4 KiB pages, decodes, then either moves its
memory onto huge pages (`collapse`) or does nothing (`control`: what warming up alone changes) and
decodes again. The effect of huge pages is the median after/before ratio of the collapse processes
over that of the control processes. Writes bench/results/huge-pages-<date>.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import header, write_results  # noqa: E402

PROMPT_TOKENS = 16  # the shared benchmark prompt (cli/bench_workload.py), short: decode is what is timed


def measure_one_process(artifact: Path, steps: int, collapse: bool, threads: int) -> dict:
    from llmpack.cli import bench_workload as workload
    from llmpack.runtime.artifact import open_artifact, open_backend
    from llmpack.runtime.backends.huge_pages import back_with_huge_pages

    opened = open_artifact(artifact, verify_checksums=False)
    backend = open_backend(opened, "cpu", threads=threads, max_batch=1, huge_pages=False)
    prompt = workload.prompt_ids(PROMPT_TOKENS, opened.manifest.config.vocab_size, opened.manifest.bos_token_id)

    def decode_tps(warmup: int) -> float:
        return workload.run_backend(backend, prompt, steps, runs=3, warmup=warmup)["decode_tps"]["median"]

    before = decode_tps(warmup=1)
    start, moved = time.perf_counter(), 0
    if collapse:
        moved = back_with_huge_pages()
    seconds = time.perf_counter() - start
    after = decode_tps(warmup=0)
    return {"before": before, "after": after, "moved_mib": moved / 2**20, "collapse_s": seconds}


def run_rounds(artifact: Path, rounds: int, steps: int, threads: int) -> dict[str, list[dict]]:
    results = {"collapse": [], "control": []}
    for round_ in range(rounds):
        order = ["collapse", "control"] if round_ % 2 == 0 else ["control", "collapse"]
        for mode in order:
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(artifact), "--steps", str(steps),
                                  "--threads", str(threads)], check=True, capture_output=True, text=True).stdout
            results[mode].append(json.loads(out.strip().splitlines()[-1]))
            last = results[mode][-1]
            sys.stderr.write(f"{artifact.name} round {round_ + 1} {mode}: {last['before']:.2f} -> "
                             f"{last['after']:.2f} tok/s\n")
    return results


def summary_rows(artifact: Path, results: dict[str, list[dict]]) -> list[str]:
    ratio = {mode: [r["after"] / r["before"] for r in runs] for mode, runs in results.items()}
    effect = statistics.median(ratio["collapse"]) / statistics.median(ratio["control"])
    collapsed = results["collapse"]
    return [
        f"| {artifact.name} | " + " ".join(f"{x:.3f}" for x in ratio["collapse"]) + " | "
        + " ".join(f"{x:.3f}" for x in ratio["control"]) + f" | **{effect:.3f}×** | "
        f"{statistics.median(r['moved_mib'] for r in collapsed):.0f} MiB in "
        f"{statistics.median(r['collapse_s'] for r in collapsed):.2f} s | "
        f"{statistics.median(r['before'] for r in collapsed + results['control']):.2f} |"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--rounds", type=int, default=4, help="Pairs of processes (collapse, control) per artifact.")
    parser.add_argument("--steps", type=int, default=64, help="Tokens generated greedily per timed block (3 blocks before, 3 after).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=["collapse", "control"], help=argparse.SUPPRESS)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    if args.child:
        line = measure_one_process(args.artifacts[0], args.steps, args.child == "collapse", args.threads)
        sys.stdout.write(json.dumps(line) + "\n")
        return
    lines = [header("Huge pages: decode after/before in one process", "llmpack", "onnxruntime"),
             f"{args.rounds} rounds × (one collapse process, one control process), {args.steps} decode steps per "
             f"block after a {PROMPT_TOKENS}-token prompt, 3 blocks before and 3 after, batch 1, {args.threads} threads.", "",
             "| artifact | after/before, collapse | after/before, control | effect | moved | tok/s before |",
             "|---|---|---|---|---|---|"]
    for artifact in args.artifacts:
        lines += summary_rows(artifact, run_rounds(artifact, args.rounds, args.steps, args.threads))
    write_results("huge-pages", lines, args.label)


if __name__ == "__main__":
    main()
