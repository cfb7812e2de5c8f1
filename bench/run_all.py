"""Benchmark: `make bench` — llmpack and its peers on one model and workload, alternating, pooled.

Every contender runs in its own process (peers in their own virtual environments) on the same prompt
ids, new-token count and thread count (cli/bench_workload.py). A round runs each contender once
(warm-up excluded, --runs timed generations); the order rotates every round so no one always runs
first or after the heaviest; the machine's load is recorded around every round. Pooled medians over
all rounds go to bench/results/<date>.md with the bandwidth roofline and the ratios; raw JSON lines
go beside it (<date>.jsonl).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import header  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PYTHON = str(REPO / ".venv" / "bin" / "python")
PEER_PYTHON = {"genai": str(REPO / "artifacts" / ".peers" / "genai" / "bin" / "python"),
               "llamacpp": str(REPO / "artifacts" / ".peers" / "llamacpp" / "bin" / "python"),
               "optimum": str(REPO / "artifacts" / ".peers" / "optimum" / "bin" / "python")}
LLAMACPP_TYPES = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}  # llmpack precision -> GGUF file type


@dataclass(frozen=True)
class Contender:
    name: str  # row label
    engine: str  # table column group: llmpack standard / llmpack fused / a peer
    precision: str
    argv: tuple[str, ...]  # the command, without the workload options

    def available(self) -> bool:
        return all(Path(a).exists() for a in self.argv if a.startswith(str(REPO)))


def llmpack(artifact: str, engine: str, precision: str, huge_pages: bool = True) -> Contender:
    """An llmpack artifact through `llm-serve bench`; huge_pages=False is the same on 4 KiB pages, the
    control that shows what runtime/backends/huge_pages.py is worth in the same rounds."""
    path = str(REPO / "artifacts" / artifact)
    suffix, flags = ("", ()) if huge_pages else (" 4k-pages", ("--no-huge-pages",))
    return Contender(f"llmpack {engine} {precision}{suffix}", f"llmpack {engine}", precision,
                     (PYTHON, "-m", "llmpack.cli.bench_cmd", path, "--out", os.devnull, *flags))


def contenders(weight_bytes: dict[str, int]) -> list[Contender]:
    genai, models = PEER_PYTHON["genai"], REPO / "artifacts" / ".peers" / "models"
    hf_source = str(REPO / "artifacts" / ".sources" / "stories110m-shape")
    found = [llmpack("bench-110m", "standard", "fp32"), llmpack("bench-110m-fused-fp32", "ort-fused", "fp32"),
             llmpack("bench-110m-std-int8", "standard", "int8"), llmpack("bench-110m-fused-int8", "ort-fused", "int8"),
             llmpack("bench-110m-std-int4", "standard", "int4"), llmpack("bench-110m-fused-int4", "ort-fused", "int4")]
    found += [llmpack(f"bench-110m-fused-{p}", "ort-fused", p, huge_pages=False) for p in ("fp32", "int8", "int4")]
    for precision in ("fp32", "int8", "int4"):
        found.append(Contender(f"onnxruntime-genai {precision}", "onnxruntime-genai", precision, (
            genai, str(REPO / "bench" / "peers" / "genai_run.py"), str(models / f"genai-110m-{precision}"),
            "--weight-bytes", str(weight_bytes[precision]))))
    for precision, gguf_type in LLAMACPP_TYPES.items():
        # No --weight-bytes: the runner counts the GGUF's own 2-D weight bytes (q4_0 keeps the head in q6_K).
        found.append(Contender(f"llama.cpp {gguf_type}", "llama.cpp (llama-cpp-python)", precision, (
            PEER_PYTHON["llamacpp"], str(REPO / "bench" / "peers" / "llamacpp_run.py"),
            str(models / f"llamacpp-110m-{gguf_type}.gguf"))))
    found.append(Contender("optimum-onnx fp32", "Optimum (optimum-onnx ORTModelForCausalLM)", "fp32", (
        PEER_PYTHON["optimum"], str(REPO / "bench" / "peers" / "optimum_run.py"), str(models / "optimum-110m-fp32"),
        "--weight-bytes", str(weight_bytes["fp32"]))))
    for dtype, precision in (("float32", "fp32"), ("bfloat16", "bf16")):
        found.append(Contender(f"transformers eager {precision}", "transformers + torch (eager)", precision, (
            PYTHON, str(REPO / "bench" / "peers" / "hf_run.py"), hf_source, "--dtype", dtype,
            "--weight-bytes", str(weight_bytes[precision]))))
    return found


def run_one(contender: Contender, args) -> dict | None:
    argv = [*contender.argv, "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
            "--runs", str(args.runs), "--threads", str(args.threads)]
    if "--name" not in argv:
        argv += ["--name", contender.name]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(f"{contender.name} failed ({done.returncode}):\n{done.stderr[-2000:]}\n")
        return None
    return {**json.loads(lines[-1]), "engine": contender.engine, "precision": contender.precision}


def rounds(chosen: list[Contender], args, raw: Path) -> tuple[list[dict], list[float]]:
    records, loads = [], []
    for index in range(args.rounds):
        shift = index % len(chosen)
        for contender in chosen[shift:] + chosen[:shift]:
            loads.append(os.getloadavg()[0])
            record = run_one(contender, args)
            if record is not None:
                record["round"] = index
                records.append(record)
                with open(raw, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record, sort_keys=True) + "\n")
                sys.stderr.write(f"round {index + 1}/{args.rounds} {contender.name}: "
                                 f"{record['decode_tps']['median']} tok/s, TTFT {record['ttft_ms']['median']} ms\n")
    loads.append(os.getloadavg()[0])
    return records, loads


def pooled(records: list[dict]) -> dict[str, dict]:
    """Per contender: every timed run of every round pooled, then the median."""
    table: dict[str, dict] = {}
    for r in records:
        row = table.setdefault(r["name"], {"engine": r["engine"], "precision": r["precision"], "tps": [], "ttft": [],
                                           "bandwidth": [], "rss": [], "bytes": r["artifact_bytes"],
                                           "weights": r.get("weight_bytes_per_token")})
        row["tps"] += r["decode_tps"]["runs"]
        row["ttft"] += r["ttft_ms"]["runs"]
        row["bandwidth"].append(r["read_bandwidth_gbps"])
        row["rss"].append(r["peak_rss_mib"])
    for row in table.values():
        row["tps_median"] = statistics.median(row["tps"])
        row["bw_median"] = statistics.median(row["bandwidth"])
        row["roofline"] = row["bw_median"] * 1e9 / row["weights"] if row["weights"] else None
    return table


def _cell(row: dict) -> str:
    spread = f"{min(row['tps']):.1f}–{max(row['tps']):.1f}"
    return f"{row['tps_median']:.1f} ({spread}) | {statistics.median(row['ttft']):.0f}"


def ratio_lines(table: dict[str, dict], precision: str) -> list[str]:
    """llmpack ort-fused against each other contender of the same precision that ran in the same rounds."""
    ours = table.get(f"llmpack ort-fused {precision}")
    others = [("onnxruntime-genai", f"onnxruntime-genai {precision}"),
              ("optimum-onnx", f"optimum-onnx {precision}"),
              ("itself on 4 KiB pages", f"llmpack ort-fused {precision} 4k-pages")]
    if precision != "fp32":  # llama.cpp f32 is in the table; the issue compares its quantized types
        others.insert(1, ("llama.cpp " + LLAMACPP_TYPES[precision], f"llama.cpp {LLAMACPP_TYPES[precision]}"))
    lines = []
    for label, name in others:
        other = table.get(name)
        if ours and other:
            lines.append(f"- {precision}: llmpack ort-fused / {label} decode {ours['tps_median'] / other['tps_median']:.2f}×, "
                         f"TTFT {statistics.median(ours['ttft']):.0f} vs {statistics.median(other['ttft']):.0f} ms")
    standard = table.get(f"llmpack standard {precision}")
    if ours and standard:
        lines.append(f"- {precision}: llmpack ort-fused / standard decode {ours['tps_median'] / standard['tps_median']:.2f}×")
    return lines


def report(table: dict[str, dict], loads: list[float], args) -> list[str]:
    lines = ["| contender | precision | decode tok/s median (min–max) | TTFT ms | peak RSS MiB | size MB | "
             "read GB/s | roofline tok/s | of roofline |", "|---|---|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        roof = f"{row['roofline']:.0f} | {row['tps_median'] / row['roofline']:.0%}" if row["roofline"] else "– | –"
        lines.append(f"| {name} | {row['precision']} | {_cell(row)} | {statistics.median(row['rss']):.0f} | "
                     f"{row['bytes'] / 1e6:.0f} | {row['bw_median']:.1f} | {roof} |")
    lines += ["", "Ratios, same precision, same rounds (decode tok/s; TTFT: lower is better):", ""]
    for precision in ("fp32", "int8", "int4"):
        lines += ratio_lines(table, precision)
    lines += ["", f"Machine load (1-min average) before each contender: min {min(loads):.2f}, median "
              f"{statistics.median(loads):.2f}, max {max(loads):.2f} (2 cores; the benchmark's own two threads keep it near 2, so above ~2.5 other work was running).",
              f"Workload: {args.prompt_tokens}-token prompt (cli/bench_workload.py prompt_ids), exactly {args.new_tokens} "
              f"new tokens greedy (stop tokens ignored), batch 1, {args.threads} threads, {args.rounds} rounds × "
              f"{args.runs} generations pooled, warm-up excluded, each contender in its own process, order rotated "
              "every round. Roofline = Linear weight bytes per token (head included) ÷ the numpy read-bandwidth "
              "probe taken in the same process."]
    return lines


def weight_bytes() -> dict[str, int]:
    from llmpack.runtime.backends.mlas_layout import linear_weight_bytes
    from llmpack.runtime.manifest import QuantInfo, read_manifest

    manifest = read_manifest(REPO / "artifacts" / "bench-110m")
    fp32 = linear_weight_bytes(manifest)
    quantized = {m: linear_weight_bytes(type("Q", (), {"config": manifest.config, "dtype": "fp32",
                                                       "quant": QuantInfo(m, b, 32, 4, True)}))
                 for m, b in (("int8", 8), ("int4", 4))}
    return {"fp32": fp32, "bf16": fp32 // 2, **quantized}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--only", default="", help="Comma-separated substrings: run the matching contenders only.")
    parser.add_argument("--label", default="", help="Suffix of the results files: <date><label>.md/.jsonl.")
    args = parser.parse_args()
    everyone = contenders(weight_bytes())
    chosen = [c for c in everyone if c.available() and (not args.only or any(s in c.name for s in args.only.split(",")))]
    for missing in (c for c in everyone if not c.available()):
        sys.stderr.write(f"skipping {missing.name}: not built (make bench builds it)\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y-%m-%d") + args.label
    raw = RESULTS / f"{stamp}.jsonl"
    records, loads = rounds(chosen, args, raw)
    lines = [header("llmpack vs peers: batch-1 decode on CPU (bench-110m)", "onnxruntime", "torch", "transformers"),
             *report(pooled(records), loads, args), "", f"Raw JSON lines: `{raw.relative_to(REPO)}`.", ""]
    out = RESULTS / f"{stamp}.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    sys.stdout.write("\n".join(lines) + f"\nwritten to {out}\n")


if __name__ == "__main__":
    main()
