"""Benchmark edge, shared by `llm-serve bench` and the peers in `make bench`: one workload, one record.

The same prompt ids, the same greedy loop timing (TTFT = prompt in → first token's logits out; decode
tokens/s over the remaining new tokens), the same statistics, the same read-bandwidth probe and the
same JSON record for every engine. Standard library + numpy only: the peers' own virtual environments
(which never install llmpack) load this file by path.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import numpy as np

PROBE_BYTES = 512 * 2**20  # far beyond the last-level cache (32 MiB here): the read comes from DRAM


def prompt_ids(count: int, vocab_size: int, bos: int = 1) -> list[int]:
    """The fixed prompt: BOS then a deterministic walk over ordinary (non-special) token ids."""
    span = max(1, vocab_size - 100)
    return [bos] + [100 + (7 * i) % span for i in range(count - 1)]


def timed_generation(prefill: Callable[[list[int]], np.ndarray], step: Callable[[int], np.ndarray],
                     prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """Greedy generation of exactly new_tokens (no stop token): (seconds to first token, decode tok/s)."""
    start = time.perf_counter()
    logits = prefill(prompt)
    token = int(np.argmax(logits))
    first = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = int(np.argmax(step(token)))
    end = time.perf_counter()
    return first - start, (new_tokens - 1) / (end - first)


def spread(values: list[float], digits: int = 2) -> dict:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "runs": [round(v, digits) for v in values]}


def read_bandwidth(threads: int, repeats: int = 5) -> float:
    """GB/s of a numpy max() over a DRAM-sized array, split across `threads` threads (numpy drops the GIL).

    Taken in the same process as the run it sits beside: this machine's bandwidth differs per process.
    """
    data = np.ones(PROBE_BYTES // 4, np.float32)
    parts = np.array_split(data, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.max, parts))
            best = max(best, data.nbytes / (time.perf_counter() - start) / 1e9)
    return round(best, 1)


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "memory_gib": round(memory),
            "load_1min": round(os.getloadavg()[0], 2)}


def versions(*packages: str) -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def run_workload(prefill, step, reset, prompt: list[int], new_tokens: int, runs: int, warmup: int = 1) -> dict:
    """Warm-up generations (excluded), then `runs` timed ones; TTFT in ms and decode tok/s spreads."""
    for _ in range(warmup):
        timed_generation(prefill, step, prompt, new_tokens)
        reset()
    ttft, tps = [], []
    for _ in range(runs):
        first, speed = timed_generation(prefill, step, prompt, new_tokens)
        reset()
        ttft.append(1000 * first)
        tps.append(speed)
    return {"ttft_ms": spread(ttft, 1), "decode_tps": spread(tps, 2)}


def run_backend(backend, prompt: list[int], new_tokens: int, runs: int, warmup: int = 1) -> dict:
    """run_workload on slot 0 of an llmpack backend: its own prefill / decode / reset calls."""
    return run_workload(lambda ids: backend.prefill(0, ids), lambda token: backend.decode([0], [token])[0],
                        lambda: backend.reset(0), prompt, new_tokens, runs, warmup)


def run_engine(engine, prompt: list[int], new_tokens: int, runs: int, warmup: int = 1) -> dict:
    """run_workload's measure through the engine's own loop (batch scheduler, sampling, speculation when on):
    greedy, exactly new_tokens, stop ids ignored; TTFT = submit → first token."""
    from llmpack.runtime.sampling import SamplingParams

    def generation() -> tuple[float, float]:
        start = first = time.perf_counter()
        for count, _ in enumerate(engine.generate_ids(prompt, new_tokens, SamplingParams(temperature=0), stop_ids=[])):
            if count == 0:
                first = time.perf_counter()
        return first - start, (new_tokens - 1) / (time.perf_counter() - first)

    for _ in range(warmup):
        generation()
    timings = [generation() for _ in range(runs)]
    return {"ttft_ms": spread([1000 * t for t, _ in timings], 1), "decode_tps": spread([s for _, s in timings], 2)}


def record(name: str, timings: dict, *, prompt_tokens: int, new_tokens: int, threads: int, artifact_bytes: int,
           weight_bytes_per_token: int | None, packages: tuple[str, ...], **extra) -> dict:
    """The JSON record every engine writes: timings, memory, size, bandwidth probe, machine, versions."""
    rss = peak_rss_mib()  # before the probe, whose 512 MiB array is not the engine's
    bandwidth = read_bandwidth(threads)
    line = {"name": name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "threads": threads, **timings,
            "peak_rss_mib": rss, "artifact_bytes": artifact_bytes, "read_bandwidth_gbps": bandwidth,
            "weight_bytes_per_token": weight_bytes_per_token, "machine": machine(), "versions": versions(*packages),
            **extra}
    if weight_bytes_per_token:
        roofline = bandwidth * 1e9 / weight_bytes_per_token
        line["roofline_tps"] = round(roofline, 1)
        line["roofline_fraction"] = round(timings["decode_tps"]["median"] / roofline, 3)
    return line


def emit(line: dict, out: str | None) -> str:
    text = json.dumps(line, sort_keys=True)
    if out:
        with open(out, "a", encoding="utf-8") as handle:
            handle.write(text + "\n")
    return text


def peer_parser(description: str, source_help: str) -> argparse.ArgumentParser:
    """The command line every peer runner takes (bench/run_all.py passes the same workload to all)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("source", type=Path, help=source_help)
    parser.add_argument("--name", required=True)
    for flag, default in (("--prompt-tokens", 128), ("--new-tokens", 128), ("--runs", 5), ("--threads", 2)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--weight-bytes", type=int, default=None, help="Linear weight bytes read per token.")
    return parser


def run_peer(args, runner, vocab_size: int, artifact_bytes: int, packages: tuple[str, ...]) -> None:
    """Time `runner` (prefill/step/reset) on the shared workload and print its JSON line."""
    prompt = prompt_ids(args.prompt_tokens, vocab_size)
    timings = run_workload(runner.prefill, runner.step, runner.reset, prompt, args.new_tokens, args.runs)
    line = record(args.name, timings, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                  threads=args.threads, artifact_bytes=artifact_bytes, weight_bytes_per_token=args.weight_bytes,
                  packages=packages, artifact=str(args.source))
    sys.stdout.write(emit(line, None) + "\n")
