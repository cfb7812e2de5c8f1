"""Benchmark: the Llama-2-7B shape on this CPU — llmpack int4 / int8 with default options against llama.cpp q4_0 / q8_0.

`make bench-7b` runs it. From the random-weight 7B-shape checkpoint it builds what is missing: llmpack's
artifacts (`llm-export build --quant int4|int8`, nothing else set) and llama.cpp's GGUFs (its own converter to
f16, then its own llama-quantize, as `make bench-served` makes the 110M ones; the f16 GGUF is deleted afterwards
unless --keep-f16). Build wall time and peak RSS are recorded in artifacts/.bench-7b/builds.json when a build
runs, and reported from there when it is reused. Then rounds, the contenders' order rotated each round, one fresh
process per contender per round: llmpack through `llm-serve bench` (the backend's own prefill/decode, one warm-up
generation), llama.cpp through its own `llama-bench` (prompt processing of the same number of tokens for TTFT;
generation at the depth of the prompt for decode; its default warm-up). Both use every core. Bytes per token:
llmpack's Linear weights as ONNX Runtime holds them (runtime/backends/mlas_layout.py); llama.cpp's every tensor
but the embedding table, as the GGUF stores them. Writes bench/results/bench-7b-<date><label>.md and .jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import header, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PAIRS = (("int4", "q4_0"), ("int8", "q8_0"))


@dataclass(frozen=True)
class Contender:
    name: str
    engine: str  # "llmpack" | "llama.cpp"
    precision: str  # "int4" | "int8": the two of a pair share it
    path: Path
    build_steps: tuple[str, ...]  # its entries in builds.json


def run_measured(argv: list[str], log: Path) -> tuple[float, float, str]:
    """Run argv to completion: wall seconds, the process's own peak RSS in GiB (wait4), its stdout."""
    start = time.perf_counter()
    with open(log, "w") as err:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO)
        out = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{argv[0]} failed (exit {process.returncode}); see {log}")
    return time.perf_counter() - start, usage.ru_maxrss / 2**20, out


class BuildLog:
    """artifacts/.bench-7b/builds.json: how long each build took and its peak RSS, kept across reuses."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path, self.logs = folder / "builds.json", folder
        self.records = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(self, name: str, argv: list[str]) -> None:
        seconds, rss, out = run_measured(argv, self.logs / f"{name.replace(' ', '-')}.log")
        if "up to date" in out:  # llm-export reused an artifact built from the same weights and options
            return
        self.records[name] = {"seconds": round(seconds, 1), "peak_rss_gib": round(rss, 2),
                              "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
        self.path.write_text(json.dumps(self.records, indent=1))


def build_llmpack(args, builds: BuildLog, precision: str, block: str | None = None) -> Contender:
    """Default options (`--quant` only), or an explicit --block-size for the comparison contenders."""
    name = f"llmpack {precision}" + (f" block {block}" if block else "")
    out = args.artifacts / (f"llama2-7b-shape-{precision}" + (f"-b{block}" if block else ""))
    # always asked: a build whose weights and options match is reused (after hashing the weights, ~1 min)
    builds.run(name, [str(BIN / "llm-export"), "build", "--model", str(args.source), "--out", str(out),
                      "--quant", precision, *(["--block-size", block] if block else [])])
    return Contender(name, "llmpack", precision, out, (name,))


def build_gguf(args, builds: BuildLog) -> list[Contender]:
    models = args.artifacts / ".peers" / "models"
    models.mkdir(parents=True, exist_ok=True)
    f16, found = models / "llama2-7b-shape-f16.gguf", []
    for precision, kind in PAIRS:
        target = models / f"llama2-7b-shape-{kind}.gguf"
        if not target.is_file():
            if not f16.is_file():
                env_path = str(args.converter.parent / "gguf-py")
                builds.run("llama.cpp convert f16", ["env", f"PYTHONPATH={env_path}", sys.executable,
                                                     str(args.converter), str(args.source), "--outtype", "f16",
                                                     "--outfile", str(f16)])
            builds.run(f"llama.cpp quantize {kind}", [str(args.llama_quantize), str(f16), str(target) + ".tmp",
                                                      kind.upper()])
            os.replace(str(target) + ".tmp", target)
        found.append(Contender(f"llama.cpp {kind}", "llama.cpp", precision, target,
                               ("llama.cpp convert f16", f"llama.cpp quantize {kind}")))
    if f16.is_file() and not args.keep_f16:
        f16.unlink()  # 13.5 GB, needed only to make the two above
    return found


def time_llmpack(c: Contender, args, log: Path) -> dict:
    argv = [str(BIN / "llm-serve"), "bench", str(c.path), "--prompt-tokens", str(args.prompt_tokens),
            "--new-tokens", str(args.new_tokens), "--runs", "1", "--warmup", "1", "--out", str(log) + ".jsonl"]
    _, _, out = run_measured(argv, log)
    line = json.loads(next(x for x in out.splitlines() if x.startswith("{")))
    return {"decode_tps": line["decode_tps"]["median"], "ttft_ms": line["ttft_ms"]["median"],
            "peak_rss_gib": line["peak_rss_mib"] / 1024, "probe_gbps": line["read_bandwidth_gbps"]}


def time_llama_cpp(c: Contender, args, log: Path) -> dict:
    base = [str(args.llama_bench), "-m", str(c.path), "-t", str(len(os.sched_getaffinity(0))), "-r", "1", "-o", "json"]
    _, rss_prompt, prompt = run_measured([*base, "-p", str(args.prompt_tokens), "-n", "0"], log)
    _, rss_decode, decode = run_measured([*base, "-p", "0", "-n", str(args.new_tokens), "-d", str(args.prompt_tokens)],
                                         log.with_suffix(".decode.log"))
    prompt_tps = json.loads(prompt)[0]["avg_ts"]
    return {"decode_tps": json.loads(decode)[0]["avg_ts"], "ttft_ms": 1000 * args.prompt_tokens / prompt_tps,
            "peak_rss_gib": max(rss_prompt, rss_decode)}


def bytes_per_token(c: Contender, args) -> int:
    if c.engine == "llmpack":
        from llmpack.runtime.backends.mlas_layout import linear_weight_bytes
        from llmpack.runtime.manifest import read_manifest

        return linear_weight_bytes(read_manifest(c.path))
    sys.path.insert(0, str(args.converter.parent / "gguf-py"))
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(c.path).tensors if t.name != "token_embd.weight")


def run_rounds(contenders: list[Contender], args) -> dict[str, list[dict]]:
    results = {c.name: [] for c in contenders}
    logs = args.artifacts / ".bench-7b"
    for r in range(args.rounds):
        for c in contenders[r % len(contenders):] + contenders[:r % len(contenders)]:
            log = logs / f"round{r}-{c.name.replace(' ', '-')}.log"
            timing = (time_llmpack if c.engine == "llmpack" else time_llama_cpp)(c, args, log)
            timing["load_1min"] = os.getloadavg()[0]
            results[c.name].append(timing)
            print(f"round {r + 1}: {c.name}: {timing['decode_tps']:.2f} tok/s, TTFT {timing['ttft_ms'] / 1000:.2f} s, "
                  f"peak RSS {timing['peak_rss_gib']:.2f} GiB", flush=True)
    return results


def median(rows: list[dict], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def contender_table(contenders, results, builds: BuildLog, args) -> list[str]:
    lines = ["| contender | decode tok/s median (per round) | TTFT s median | peak RSS GiB | bytes per token | "
             "GB/s read while decoding | build (min:s) | build peak RSS GiB | on disk GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in contenders:
        rows, per_token = results[c.name], bytes_per_token(c, args)
        tps = median(rows, "decode_tps")
        disk = sum(f.stat().st_size for f in ([c.path] if c.path.is_file() else c.path.iterdir()) if f.is_file())
        per_round = " ".join(f"{row['decode_tps']:.2f}" for row in rows)
        lines.append(f"| {c.name} | {tps:.2f} ({per_round}) | {median(rows, 'ttft_ms') / 1000:.2f} | "
                     f"{max(row['peak_rss_gib'] for row in rows):.2f} | "
                     f"{per_token / 1e9:.2f} GB ({8 * per_token / PARAMS_7B:.2f} bits/weight) | "
                     f"{per_token * tps / 1e9:.1f} | {build_cells(c, builds)} | {disk / 1e9:.1f} |")
    return lines


def build_cells(c: Contender, builds: BuildLog) -> str:
    steps = [builds.records[name] for name in c.build_steps if name in builds.records]
    if len(steps) < len(c.build_steps):
        return "not recorded (built outside this script) | –"
    seconds = sum(step["seconds"] for step in steps)
    return f"{int(seconds // 60)}:{int(seconds % 60):02d} | {max(step['peak_rss_gib'] for step in steps):.2f}"


def pair_lines(contenders, results) -> list[str]:
    lines = ["", "| pair | decode llmpack / llama.cpp, per round | median | TTFT llmpack / llama.cpp, median |",
             "|---|---|---|---|"]
    for precision, kind in PAIRS:
        ours, theirs = results[f"llmpack {precision}"], results[f"llama.cpp {kind}"]
        ratios = [a["decode_tps"] / b["decode_tps"] for a, b in zip(ours, theirs, strict=True)]
        ttft = median(ours, "ttft_ms") / median(theirs, "ttft_ms")
        lines.append(f"| {precision} vs {kind} | {' '.join(f'{x:.2f}' for x in ratios)} | "
                     f"**{statistics.median(ratios):.2f}×** | {ttft:.2f}× |")
    return lines


def report(contenders, results, builds: BuildLog, args) -> list[str]:
    loads = [row["load_1min"] for rows in results.values() for row in rows]
    probes = [row["probe_gbps"] for rows in results.values() for row in rows if "probe_gbps" in row]
    return [header("Llama-2-7B shape: llmpack int4/int8 (default options) vs llama.cpp q4_0/q8_0",
                   "onnxruntime", "numpy"),
            f"- workload: {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens greedy, batch 1, "
            f"{len(os.sched_getaffinity(0))} threads; {args.rounds} rounds, order rotated, a fresh process each",
            f"- machine load (1-min average) after each contender: min {min(loads):.2f}, max {max(loads):.2f}",
            f"- memory read bandwidth (numpy probe in each llmpack process, 2 threads): {min(probes):.1f}–"
            f"{max(probes):.1f} GB/s",
            "- llmpack: `llm-serve bench` (1 warm-up + 1 timed generation); llama.cpp: `llama-bench -r 1` "
            "(pp for TTFT, tg at depth = prompt for decode)", "",
            *contender_table(contenders, results, builds, args), *pair_lines(contenders, results), "",
            "Bytes per token: llmpack = Linear weights as ONNX Runtime holds them (mlas_layout.py); llama.cpp = "
            "every GGUF tensor except the embedding table. Bits per weight = those bytes over the 6.74 B "
            "weights of every Linear and the head."]


PARAMS_7B = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 32000 * 4096  # Linears + head of Llama-2-7B


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, required=True, help="the 7B-shape Hugging Face checkpoint")
    parser.add_argument("--artifacts", type=Path, default=REPO / "artifacts")
    parser.add_argument("--converter", type=Path, required=True, help="llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument("--llama-quantize", type=Path, required=True)
    parser.add_argument("--llama-bench", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3, help="0: build what is missing and stop")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--keep-f16", action="store_true", help="keep the f16 GGUF the quantized ones are made from")
    parser.add_argument("--also", default="int4:32",
                        help="more llmpack contenders, precision:block, comma-separated (the default shows what "
                             "--block-size auto buys at this size); empty for none")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    builds = BuildLog(args.artifacts / ".bench-7b")
    ours = [build_llmpack(args, builds, precision) for precision, _ in PAIRS]
    contenders = [x for pair in zip(ours, build_gguf(args, builds), strict=True) for x in pair]
    contenders += [build_llmpack(args, builds, *extra.split(":")) for extra in filter(None, args.also.split(","))]
    if args.rounds == 0:  # builds only (e.g. while the machine is busy); the rounds want it quiet
        print("built: " + ", ".join(str(c.path) for c in contenders))
        return
    results = run_rounds(contenders, args)
    out = write_results("bench-7b", report(contenders, results, builds, args), args.label)
    lines = [json.dumps({"name": name, "rounds": rows}) + "\n" for name, rows in results.items()]
    out.with_suffix(".jsonl").write_text("".join(lines))


if __name__ == "__main__":
    main()
