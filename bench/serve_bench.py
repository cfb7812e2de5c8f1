"""Benchmark: the HTTP server under 1, 4, 8 and 16 concurrent streaming clients (continuous batching).

Starts `llm-serve run` on the artifact, sends fixed raw prompts with greedy decoding and a fixed
number of new tokens, and measures aggregate generated tokens/s, time to first token and the gap
between stream events (inter-token latency) per concurrency. Writes bench/results/serve-<date>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from llmpack.runtime.backends.fused_interface import MIXED_MODEL_FILE
from llmpack.runtime.prefix_cache import DEFAULT_BUDGET_MB

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import header, write_results  # noqa: E402

PROMPT = ("Once upon a time, in a small town by the sea, there lived a girl who loved to read books about "
          "ships, stars and faraway places. Every evening she sat by the window and")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    serve = Path(sys.executable).with_name("llm-serve")
    proc = subprocess.Popen([str(serve), "run", str(args.artifact), "--port", str(port),
                             "--max-batch", str(args.max_batch), "--threads", str(args.threads), "--no-verify-checksums",
                             "--mixed-steps" if args.mixed_steps else "--no-mixed-steps",
                             "--prefix-cache-mb", str(args.prefix_cache_mb)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "LLMPACK_API_KEY": ""})
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base)
    return proc, base


def wait_ready(proc: subprocess.Popen, base: str, hint: str = "") -> None:
    """Poll /ready for up to 60 s; past that, kill the server and end the benchmark."""
    for _ in range(600):
        try:
            if httpx.get(base + "/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the server did not become ready in 60 s{hint}")


def request_body(new_tokens: int) -> dict:
    return {"prompt": PROMPT, "raw": True, "stream": True, "max_tokens": new_tokens, "temperature": 0}


def timing(start: float, stamps: list[float], tokens: int) -> dict:
    return {"ttft": stamps[0] - start, "gaps": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": tokens}


_clients = threading.local()


def _client(base: str) -> httpx.Client:
    """One keep-alive client per client thread, as a real client holds: a new httpx.Client per request
    builds an SSL context (~50 ms of CPU), which counted as time to first token and took the
    server's cores (single client TTFT over HTTP: 130 ms that way, 74 ms with the connection kept)."""
    if getattr(_clients, "base", None) != base:
        _clients.client, _clients.base = httpx.Client(base_url=base, timeout=600), base
    return _clients.client


def one_request(base: str, new_tokens: int) -> dict:
    client = _client(base)
    start, stamps, usage = time.perf_counter(), [], None
    with client.stream("POST", "/ai/run/@cf/meta/llama-2-7b-chat-fp16", json=request_body(new_tokens)) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            elif event.get("response"):
                stamps.append(time.perf_counter())
    return timing(start, stamps, usage["completion_tokens"])


def engine_sender(engine):
    """`--in-process`: the same requests straight into the Engine (no HTTP, no client process), to
    tell the batching engine's own numbers from what the server and the clients add on 2 cores."""
    from llmpack.runtime.serve.protocol import parse_request

    def send(new_tokens: int) -> dict:
        start, stamps = time.perf_counter(), []
        stream = engine.stream_request(parse_request(request_body(new_tokens)))
        for _ in stream:
            stamps.append(time.perf_counter())
        return timing(start, stamps, stream.usage.completion_tokens)
    return send


def run_level(send, clients: int, requests_per_client: int, new_tokens: int) -> dict:
    """One concurrency level once: aggregate tokens/s and every TTFT and inter-token gap seen."""
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        jobs = [pool.submit(lambda: [send(new_tokens) for _ in range(requests_per_client)])
                for _ in range(clients)]
        results = [r for job in jobs for r in job.result()]
    wall = time.perf_counter() - start
    return {"clients": clients, "tok_s": sum(r["tokens"] for r in results) / wall,
            "gaps": [g for r in results for g in r["gaps"]], "ttfts": [r["ttft"] for r in results]}


def pool_rounds(runs: list[dict]) -> dict:
    """Runs of one level over the rounds: median tokens/s (and each round's), pooled percentiles."""
    gaps = sorted(g for run in runs for g in run["gaps"])
    ttfts = sorted(t for run in runs for t in run["ttfts"])

    def pct(values, q):
        return values[min(len(values) - 1, int(q * len(values)))]

    return {"clients": runs[0]["clients"], "rounds": [run["tok_s"] for run in runs],
            "tok_s": statistics.median(run["tok_s"] for run in runs),
            "ttft_p50": statistics.median(ttfts), "ttft_p99": pct(ttfts, 0.99),
            "itl_p50": statistics.median(gaps), "itl_p99": pct(gaps, 0.99)}


def run_rounds(send, args) -> list[dict]:
    """Every level once per round, rounds one after the other: a drift of the machine's speed (its
    memory bandwidth is bimodal) hits every level alike instead of one."""
    levels = [int(n) for n in args.levels.split(",")]
    send(8)  # warm-up
    runs = [[run_level(send, n, args.requests_per_client, args.new_tokens) for n in levels]
            for _ in range(args.rounds)]
    return [pool_rounds([round_runs[i] for round_runs in runs]) for i in range(len(levels))]


def run_levels(args) -> list[dict]:
    if args.in_process:
        from llmpack.runtime.engine import Engine, EngineOptions

        engine = Engine.load(args.artifact, EngineOptions(max_batch=args.max_batch, threads=args.threads,
                                                          verify_checksums=False, mixed_steps=args.mixed_steps,
                                                          prefix_cache_mb=args.prefix_cache_mb))
        try:
            return run_rounds(engine_sender(engine), args)
        finally:
            engine.close()
    proc, base = start_server(args)
    try:
        return run_rounds(lambda tokens: one_request(base, tokens), args)
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--levels", default="1,4,8,16")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3,
                        help="Each level this many times, interleaved; median tokens/s, pooled latencies.")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--label", default="", help="Suffix of the results file: serve-<date><label>.md.")
    parser.add_argument("--in-process", action="store_true",
                        help="Drive the Engine directly instead of `llm-serve run` over HTTP (a diagnostic).")
    parser.add_argument("--no-mixed-steps", dest="mixed_steps", action="store_false",
                        help="ort-fused artifacts: prefill joining prompts in passes of their own (the A/B baseline).")
    parser.add_argument("--no-prefix-cache", dest="prefix_cache_mb", action="store_const", const=0,
                        default=DEFAULT_BUDGET_MB, help="Every request computes its whole prompt (the A/B baseline: "
                        "the fixed prompt is otherwise read once and copied).")
    args = parser.parse_args()
    rows = run_levels(args)
    single = rows[0]
    title = "the engine (in process, no HTTP)" if args.in_process else "llm-serve"
    mixing = ("mixed steps " + ("on" if args.mixed_steps else "off")) if (args.artifact / MIXED_MODEL_FILE).exists() \
        else "no mixed-step graph"
    lines = [header(f"{title} under concurrent streaming clients", "onnxruntime", "numpy", "uvicorn"),
             f"artifact `{args.artifact.name}`, raw prompt of {len(PROMPT)} characters, {args.new_tokens} new tokens "
             f"(greedy), {args.requests_per_client} requests per client, {args.rounds} rounds, --max-batch {args.max_batch}, "
             f"--threads {args.threads}, {mixing}, prefix cache {'on' if args.prefix_cache_mb else 'off'}, "
             f"load before the run: {os.getloadavg()[0]:.2f}", "",
             "| clients | generated tok/s (median) | × single | each round | TTFT p50 / p99 ms | inter-token p50 / p99 ms "
             "| p99 ITL × single |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['clients']} | {row['tok_s']:.1f} | {row['tok_s'] / single['tok_s']:.2f} | "
                     f"{' / '.join(f'{t:.0f}' for t in row['rounds'])} | "
                     f"{1000 * row['ttft_p50']:.0f} / {1000 * row['ttft_p99']:.0f} | "
                     f"{1000 * row['itl_p50']:.1f} / {1000 * row['itl_p99']:.1f} | "
                     f"{row['itl_p99'] / single['itl_p99']:.2f} |")
    write_results("serve", lines, args.label)


if __name__ == "__main__":
    main()
