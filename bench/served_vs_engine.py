"""Benchmark: what the server costs — decode tok/s and TTFT as a streaming HTTP client sees them, beside the
engine's own in process, in alternating rounds; optionally llama.cpp's own HTTP server on the same machine.

Every contender runs in a process of its own, started fresh in every round (this VM's memory bandwidth
differs per process), in an order that rotates per round. All use default options except the prefix
cache (off: every request computes its whole prompt, so TTFT compares like with like):
- engine: `Engine.stream` in a child process (no HTTP): the text stream the server sits on;
- served: `llm-serve run ARTIFACT --prefix-cache-mb 0`, a streaming client in this process on the
  Workers AI route (one keep-alive connection per client thread, as a real client holds);
- llama-server (--llama-server BIN --gguf NAME=PATH): llama.cpp's server on the same GGUF files as
  `make bench-peers` builds, its native /completion route streaming, the same client code.
Per request: TTFT = request sent → first text; decode tok/s = (completion tokens − 1) / (end − first text).
Batch 1 is one client; batch N is N clients at once (aggregate tok/s over the wall time).
Writes bench/results/served-vs-engine-<date><label>.md.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import header, write_results  # noqa: E402

STORY = ("Once upon a time, in a small town by the sea, there lived a girl who loved to read books about ships, "
         "stars and faraway places. Every evening she sat by the window and watched the boats come home. ")


def prompt_text(tokenizer_path: Path, tokens: int) -> str:
    """A natural-text raw prompt of about `tokens` tokens (BOS included) for the artifact's tokenizer."""
    from llmpack.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_path)
    ids = tokenizer.encode(STORY * (1 + tokens // 20))[: tokens - 1]
    return tokenizer.decode(ids)


def request_timing(start: float, first: float | None, end: float, tokens: int) -> dict:
    first = end if first is None else first
    decode = (tokens - 1) / (end - first) if tokens > 1 and end > first else float("nan")
    return {"ttft": first - start, "decode": decode, "tokens": tokens}


# --- the engine in process (run in a child: `--worker engine`) -----------------------------------


def engine_worker(args) -> None:
    from llmpack.runtime.engine import Engine, EngineOptions
    from llmpack.runtime.sampling import SamplingParams
    from llmpack.runtime.serve.protocol import ENGINE_LIMITS

    engine = Engine.load(args.artifact, EngineOptions(prefix_cache_mb=0, verify_checksums=False, **ENGINE_LIMITS))
    ids = [engine.tokenizer.bos_id, *engine.tokenizer.encode(args.prompt)]
    greedy = SamplingParams(temperature=0)

    def send() -> dict:
        start, first = time.perf_counter(), None
        stream = engine.stream(ids, args.new_tokens, greedy)
        for _ in stream:
            first = first or time.perf_counter()
        return request_timing(start, first, time.perf_counter(), stream.usage.completion_tokens) | \
            {"prompt_tokens": len(ids)}

    print(json.dumps(run_levels(send, args)))
    engine.close()


# --- HTTP contenders ------------------------------------------------------------------------------


_local = threading.local()


def client(base: str):
    import httpx

    if getattr(_local, "base", None) != base:
        _local.client, _local.base = httpx.Client(base_url=base, timeout=600), base
    return _local.client


def llmpack_request(base: str, prompt: str, new_tokens: int) -> dict:
    body = {"prompt": prompt, "raw": True, "stream": True, "max_tokens": new_tokens, "temperature": 0}
    start, first, usage = time.perf_counter(), None, None
    with client(base).stream("POST", "/ai/run/@cf/meta/llama-2-7b-chat-fp16", json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            elif event.get("response") and first is None:
                first = time.perf_counter()
    return request_timing(start, first, time.perf_counter(), usage["completion_tokens"]) | \
        {"prompt_tokens": usage["prompt_tokens"]}


def llama_request(base: str, prompt: str, new_tokens: int) -> dict:
    body = {"prompt": prompt, "stream": True, "n_predict": new_tokens, "temperature": 0, "cache_prompt": False}
    start, first, final = time.perf_counter(), None, {}
    with client(base).stream("POST", "/completion", json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event.get("stop"):
                final = event
            elif event.get("content") and first is None:
                first = time.perf_counter()
    return request_timing(start, first, time.perf_counter(), final.get("tokens_predicted", 0)) | \
        {"prompt_tokens": final.get("tokens_evaluated", 0)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str) -> None:
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"{url} was not ready in 120 s")


def served(command: list[str], ready_path: str, request, args) -> list[dict]:
    port = free_port()
    proc = subprocess.Popen([*command, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "LLMPACK_API_KEY": ""})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base + ready_path)
        return run_levels(lambda: request(base, args.prompt, args.new_tokens), args)
    finally:
        proc.terminate()
        proc.wait(30)


# --- rounds ---------------------------------------------------------------------------------------


def run_levels(send, args) -> list[dict]:
    """Warm-up, then each client count: its requests' timings and the aggregate tok/s."""
    send()
    out = []
    for clients in args.clients:
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            jobs = [pool.submit(lambda: [send() for _ in range(args.requests)]) for _ in range(clients)]
            results = [r for job in jobs for r in job.result()]
        wall = time.perf_counter() - start
        out.append({"clients": clients, "aggregate": sum(r["tokens"] for r in results) / wall,
                    "decode": statistics.median(r["decode"] for r in results),
                    "ttft": statistics.median(r["ttft"] for r in results),
                    "tokens": statistics.median(r["tokens"] for r in results),
                    "prompt_tokens": results[0]["prompt_tokens"]})
    return out


def contenders(args) -> dict:
    """name → a function running one fresh process of it and returning its levels."""
    serve = str(Path(sys.executable).with_name("llm-serve"))
    found = {}
    for artifact in args.artifacts:
        def engine(artifact=artifact):
            out = subprocess.run([sys.executable, __file__, "--worker", "engine", str(artifact), "--prompt",
                                  args.prompt, *level_args(args)], capture_output=True, text=True, check=True)
            return json.loads(out.stdout.strip().splitlines()[-1])
        found[f"{artifact.name} engine"] = engine
        found[f"{artifact.name} served"] = lambda artifact=artifact: served(
            [serve, "run", str(artifact), "--prefix-cache-mb", "0", "--no-verify-checksums"], "/ready",
            llmpack_request, args)
    for name, path in args.gguf:
        found[f"llama-server {name}"] = lambda path=path: served(
            [args.llama_server, "-m", path, "-t", str(os.cpu_count()), "-c", "3072", "-np", str(max(args.clients)),
             "--host", "127.0.0.1", "--no-webui"], "/health", llama_request, args)
    return found


def level_args(args) -> list[str]:
    return ["--new-tokens", str(args.new_tokens), "--requests", str(args.requests),
            "--clients", ",".join(map(str, args.clients))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=3, help="Requests per client per level.")
    parser.add_argument("--clients", type=lambda s: [int(n) for n in s.split(",")], default=[1, 8])
    parser.add_argument("--llama-server", help="llama.cpp's llama-server binary (make bench-llama-server).")
    parser.add_argument("--gguf", action="append", default=[], type=lambda s: tuple(s.split("=", 1)),
                        help="NAME=PATH of a GGUF file for --llama-server; repeat.")
    parser.add_argument("--label", default="")
    parser.add_argument("--worker", choices=["engine"], help=argparse.SUPPRESS)
    parser.add_argument("--prompt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.artifact = args.artifacts[0]
        return engine_worker(args)
    args.prompt = prompt_text(args.artifacts[0] / "tokenizer.model", args.prompt_tokens)
    report(run_rounds(contenders(args), args), args)


def run_rounds(found: dict, args) -> dict[str, list[list[dict]]]:
    names, results = list(found), {name: [] for name in found}
    for round_ in range(args.rounds):
        order = names[round_ % len(names):] + names[: round_ % len(names)]  # each goes first once in a while
        for name in order:
            results[name].append(found[name]())
            print(f"round {round_ + 1} {name}: " + ", ".join(
                f"{lv['clients']}c {lv['aggregate']:.1f} tok/s" for lv in results[name][-1]), file=sys.stderr)
    return results


def report(results: dict[str, list[list[dict]]], args) -> None:
    lines = [header("Served vs in-process decode, and llama.cpp's server", "onnxruntime", "numpy", "uvicorn",
                    "fastapi", "httpx"),
             f"raw prompt of ~{args.prompt_tokens} tokens, {args.new_tokens} new tokens greedy, {args.requests} "
             f"requests per client per level, {args.rounds} rounds (a fresh process per contender per round, order "
             f"rotated), prefix cache off, load before the run {os.getloadavg()[0]:.2f}", ""]
    for level_index, clients in enumerate(args.clients):
        lines += [f"## {clients} client{'s' if clients > 1 else ''}", "",
                  "| contender | decode tok/s per request (median; rounds) | aggregate tok/s | TTFT ms (median) "
                  "| tokens | prompt tokens |", "|---|---|---|---|---|---|"]
        for name, rounds in results.items():
            levels = [r[level_index] for r in rounds]
            each = " / ".join(f"{lv['decode']:.1f}" for lv in levels)
            lines.append(
                f"| {name} | {statistics.median(lv['decode'] for lv in levels):.1f} ({each}) | "
                f"{statistics.median(lv['aggregate'] for lv in levels):.1f} | "
                f"{1000 * statistics.median(lv['ttft'] for lv in levels):.1f} | {levels[0]['tokens']:.0f} | "
                f"{levels[0]['prompt_tokens']} |")
        lines += ["", *ratio_lines(results, level_index), ""]
    write_results("served-vs-engine", lines, args.label)


def ratio_lines(results: dict, level_index: int) -> list[str]:
    """Served / engine per artifact, round by round (each round's pair ran back to back)."""
    lines = []
    for name in results:
        if not name.endswith(" served"):
            continue
        artifact = name.removesuffix(" served")
        pairs = list(zip(results[name], results[artifact + " engine"]))
        decode = [s[level_index]["decode"] / e[level_index]["decode"] for s, e in pairs]
        aggregate = [s[level_index]["aggregate"] / e[level_index]["aggregate"] for s, e in pairs]
        ttft = [1000 * (s[level_index]["ttft"] - e[level_index]["ttft"]) for s, e in pairs]
        each_decode, each_ttft = " / ".join(f"{r:.3f}" for r in decode), " / ".join(f"{t:+.1f}" for t in ttft)
        lines.append(f"- {artifact}: served / engine decode {statistics.median(decode):.3f}× ({each_decode}), "
                     f"aggregate {statistics.median(aggregate):.3f}×, "
                     f"TTFT served − engine {statistics.median(ttft):+.1f} ms ({each_ttft})")
    return lines


if __name__ == "__main__":
    main()
