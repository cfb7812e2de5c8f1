"""Benchmark: what the server costs — decode tok/s and TTFT as a streaming HTTP client sees them, beside the
engine's own in the same process; and llama.cpp's own HTTP server on the same machine.

This VM's memory bandwidth differs from process to process by up to ±30 %, more than the cost being
measured, so served and in-process are compared inside ONE process: a worker loads the artifact with
`llm-serve run`'s defaults (prefix cache off, so every request computes its whole prompt), serves it with
the same app and uvicorn runner in a thread, and alternates `--pairs` times between
- engine: `Engine.stream` called in that process (the text stream the server sits on), and
- served: a client in a separate process streaming from the Workers AI route over loopback (one
  keep-alive connection per client thread, as a real client holds).
Every round starts a fresh worker per artifact (and a fresh llama-server per GGUF: --llama-server BIN
--gguf NAME=PATH, its native /completion route, the same client process code), order rotated.
Per request: TTFT = request sent → first text; decode tok/s = (completion tokens − 1) / (end − first text).
Batch 1 is one client; batch N is N clients at once (aggregate tok/s over the wall time). TTFT is also
measured on its own, interleaved request by request: `--ttft-requests` times, the engine, a served request
and a lean served request one after the other (order rotated; the two clients are processes of their own
that wait on a pipe between requests), and served − engine is taken within each such triple. A 128-token
prefill varies by ±10 % (±15 ms) from request to request and this VM's bandwidth drifts over seconds, so
a few milliseconds of serving show only in many adjacent differences: the report gives their median and a
95 % confidence interval of that median (order statistics; no distribution assumed).
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


# --- workers (child processes) -------------------------------------------------------------------

MODES = ("engine", "served", "served-lean")  # in process; httpx + JSON client; http.client, no JSON
CLIENT_OF = {"served": "llmpack", "served-lean": "lean"}


def pair_worker(args) -> None:
    """One artifact in this process: the server in a thread, and alternately the engine direct / a client process."""
    from llmpack.runtime.engine import Engine, EngineOptions
    from llmpack.runtime.sampling import SamplingParams
    from llmpack.runtime.serve.protocol import ENGINE_LIMITS
    from llmpack.runtime.serve.server import create_app
    from llmpack.runtime.serve.settings import ServerSettings
    from llmpack.runtime.serve.uvicorn_runner import serve

    engine = Engine.load(args.artifact, EngineOptions(prefix_cache_mb=0, verify_checksums=False, **ENGINE_LIMITS))
    port = free_port()
    app = create_app(engine, ServerSettings())
    threading.Thread(target=serve, args=(app, "127.0.0.1", port, engine.model_name, 1.0, False), daemon=True).start()
    ids = engine.tokenizer.raw_prompt_ids(args.prompt)
    greedy = SamplingParams(temperature=0)

    def send(new_tokens: int) -> dict:
        start, first = time.perf_counter(), None
        stream = engine.stream(ids, new_tokens, greedy)
        for _ in stream:
            first = first or time.perf_counter()
        return request_timing(start, first, time.perf_counter(), stream.usage.completion_tokens) | \
            {"prompt_tokens": len(ids)}

    wait_ready(None, f"http://127.0.0.1:{port}/ready")
    out = {mode: [] for mode in MODES}
    for pair in range(args.pairs):
        for mode in MODES[pair % len(MODES):] + MODES[: pair % len(MODES)]:
            out[mode].append(run_levels(send, args) if mode == "engine" else
                             client_process(f"http://127.0.0.1:{port}", CLIENT_OF[mode], args))
    out["ttft"] = interleaved_ttft(send, f"http://127.0.0.1:{port}", args)
    print(json.dumps(out))


def interleaved_ttft(send, url: str, args) -> dict[str, list[float]]:
    """One-token requests, engine / served / served-lean back to back (order rotated), `--ttft-requests` times."""
    clients = {mode: subprocess.Popen(
        [sys.executable, __file__, "--worker", "client", "--url", url, "--kind", CLIENT_OF[mode], "--prompt",
         args.prompt, "--on-demand", "unused"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for mode in MODES[1:]}

    def ttft(mode: str) -> float:
        if mode == "engine":
            return send(1)["ttft"]
        clients[mode].stdin.write("1\n")
        clients[mode].stdin.flush()
        return json.loads(clients[mode].stdout.readline())["ttft"]

    try:
        for mode in MODES:  # warm-up: each client's connection is open before the first timed request
            ttft(mode)
        out = {mode: [] for mode in MODES}
        for index in range(args.ttft_requests):
            for mode in MODES[index % len(MODES):] + MODES[: index % len(MODES)]:
                out[mode].append(ttft(mode))
        return out
    finally:
        for proc in clients.values():
            proc.stdin.close()
            proc.wait(30)


def client_worker(args) -> None:
    request = {"llmpack": llmpack_request, "lean": lean_request, "llama": llama_request}[args.kind]
    if args.on_demand:  # one request per line read (its new-token count), its timing written back
        for line in sys.stdin:
            print(json.dumps(request(args.url, args.prompt, int(line))), flush=True)
        return
    print(json.dumps(run_levels(lambda new_tokens: request(args.url, args.prompt, new_tokens), args)))


def client_process(url: str, kind: str, args) -> list[dict]:
    """The levels as a client in a process of its own sees them (a user's client on the same machine)."""
    return json.loads(child([sys.executable, __file__, "--worker", "client", "--url", url, "--kind", kind,
                             "--prompt", args.prompt, *level_args(args), "unused"]).splitlines()[-1])


def child(command: list[str]) -> str:
    """A worker's stdout; its stderr's tail in the exception when it fails (a bare exit status says nothing)."""
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{command[3]} worker exited with {out.returncode}:\n{out.stderr[-3000:]}")
    return out.stdout.strip()


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


def lean_request(base: str, prompt: str, new_tokens: int) -> dict:
    """llmpack_request with the standard library's http.client and no JSON per event (curl | grep-like): what
    is left of the served cost once the client itself costs next to nothing (httpx + json: ~0.25 ms of CPU
    per event here, taken from the same 2 cores the engine runs on)."""
    import http.client

    if getattr(_local, "lean_base", None) != base:
        host, port = base.removeprefix("http://").split(":")
        _local.lean, _local.lean_base = http.client.HTTPConnection(host, int(port), timeout=600), base
    body = json.dumps({"prompt": prompt, "raw": True, "stream": True, "max_tokens": new_tokens, "temperature": 0})
    start, first, usage = time.perf_counter(), None, None
    _local.lean.request("POST", "/ai/run/@cf/meta/llama-2-7b-chat-fp16", body, {"Content-Type": "application/json"})
    response = _local.lean.getresponse()
    for line in response:
        if first is None and line.startswith(b'data: {"response":"') and not line.startswith(b'data: {"response":""'):
            first = time.perf_counter()
        elif line.startswith(b'data: {"response":"","usage"'):
            usage = json.loads(line[6:])["usage"]
    return request_timing(start, first, time.perf_counter(), usage["completion_tokens"]) | \
        {"prompt_tokens": usage["prompt_tokens"]}


def llama_request(base: str, prompt: str, new_tokens: int) -> dict:
    body = {"prompt": prompt, "stream": True, "n_predict": new_tokens, "temperature": 0, "cache_prompt": False}
    start, first, final = time.perf_counter(), None, {}
    # A new connection per request: llama-server drops a kept-alive connection after a couple of streamed
    # responses (the next request on it fails with "Server disconnected"); a loopback connect is ~0.1 ms.
    with client(base).stream("POST", "/completion", json=body, headers={"Connection": "close"}) as response:
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
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    if proc is not None:
        proc.kill()
    raise SystemExit(f"{url} was not ready in 120 s")


def llama_server(command: list[str], args) -> list[dict]:
    """A fresh llama-server process, measured by a client process."""
    port = free_port()
    proc = subprocess.Popen([*command, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base + "/health")
        return client_process(base, "llama", args)
    finally:
        proc.terminate()
        proc.wait(30)


# --- rounds ---------------------------------------------------------------------------------------


def run_levels(send, args) -> list[dict]:
    """Warm-up, then each client count: its requests' timings and the aggregate tok/s."""
    send(args.new_tokens)
    out = []
    for clients in args.clients:
        start = time.perf_counter()
        each = max(1, -(-args.requests // clients))  # about --requests in all, at least one per client
        with ThreadPoolExecutor(clients) as pool:
            jobs = [pool.submit(lambda: [send(args.new_tokens) for _ in range(each)]) for _ in range(clients)]
            results = [r for job in jobs for r in job.result()]
        wall = time.perf_counter() - start
        out.append({"clients": clients, "aggregate": sum(r["tokens"] for r in results) / wall,
                    "decode": statistics.median(r["decode"] for r in results),
                    "ttft": statistics.median(r["ttft"] for r in results),
                    "tokens": statistics.median(r["tokens"] for r in results),
                    "prompt_tokens": results[0]["prompt_tokens"]})
    return out


def contenders(args) -> dict:
    """name → a function that runs one fresh process of it: {"engine": [levels…], "served": [levels…]} for an
    artifact (one entry per pair), [levels] for llama-server."""
    found = {}
    for artifact in args.artifacts:
        def pair(artifact=artifact):
            return json.loads(child([sys.executable, __file__, "--worker", "pair", str(artifact), "--prompt",
                                     args.prompt, "--pairs", str(args.pairs), *level_args(args)]).splitlines()[-1])
        found[artifact.name] = pair
    for name, path in args.gguf:
        found[f"llama-server {name}"] = lambda path=path: llama_server(
            [args.llama_server, "-m", path, "-t", str(os.cpu_count()), "-c", "3072", "-np", str(max(args.clients)),
             "--host", "127.0.0.1", "--no-webui"], args)
    return found


def level_args(args) -> list[str]:
    return ["--new-tokens", str(args.new_tokens), "--requests", str(args.requests),
            "--clients", ",".join(map(str, args.clients)), "--ttft-requests", str(args.ttft_requests)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--rounds", type=int, default=3, help="Fresh processes per contender.")
    parser.add_argument("--pairs", type=int, default=2, help="Engine / served alternations inside each process.")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=4,
                        help="Requests per level: one client sends them all, N clients about requests/N each.")
    parser.add_argument("--clients", type=lambda s: [int(n) for n in s.split(",")], default=[1, 8])
    parser.add_argument("--ttft-requests", type=int, default=60,
                        help="Interleaved one-token request triples (engine, served, served-lean) per process.")
    parser.add_argument("--llama-server", help="llama.cpp's llama-server binary (make bench-llama-server).")
    parser.add_argument("--gguf", action="append", default=[], type=lambda s: tuple(s.split("=", 1)),
                        help="NAME=PATH of a GGUF file for --llama-server; repeat.")
    parser.add_argument("--label", default="")
    parser.add_argument("--worker", choices=["pair", "client"], help=argparse.SUPPRESS)
    parser.add_argument("--prompt", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--on-demand", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=["llmpack", "lean", "llama"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.artifact = args.artifacts[0]
        return pair_worker(args) if args.worker == "pair" else client_worker(args)
    args.prompt = prompt_text(args.artifacts[0] / "tokenizer.model", args.prompt_tokens)
    report(run_rounds(contenders(args), args), args)


def run_rounds(found: dict, args) -> dict[str, list]:
    names, results = list(found), {name: [] for name in found}
    for round_ in range(args.rounds):
        order = names[round_ % len(names):] + names[: round_ % len(names)]  # each goes first once in a while
        for name in order:
            results[name].append(found[name]())
            print(f"round {round_ + 1} {name}: {json.dumps(results[name][-1])[:300]}", file=sys.stderr)
    return results


def rows(results: dict[str, list]) -> dict[str, list[list[dict]]]:
    """contender row → its runs (each a list of levels): an artifact gives '<name> engine' and '<name> served'."""
    out = {}
    for name, runs in results.items():
        if isinstance(runs[0], dict):
            for mode in MODES:
                out[f"{name} {mode}"] = [levels for run in runs for levels in run[mode]]
        else:
            out[name] = runs
    return out


def report(results: dict[str, list], args) -> None:
    lines = [header("Served vs in-process decode, and llama.cpp's server", "onnxruntime", "numpy", "uvicorn",
                    "fastapi", "httpx"),
             f"raw prompt of ~{args.prompt_tokens} tokens, {args.new_tokens} new tokens greedy, ~{args.requests} "
             f"requests per level (at least one per client); {args.rounds} rounds of a fresh process per contender (order rotated), "
             f"each llmpack process cycling {args.pairs}× through the engine in process and client processes on "
             f"its server (httpx + JSON per event: 'served'; http.client, no JSON: 'served-lean'); prefix cache off; load before the run {os.getloadavg()[0]:.2f}", ""]
    table = rows(results)
    for index, clients in enumerate(args.clients):
        lines += [f"## {clients} client{'s' if clients > 1 else ''}", "",
                  "| contender | decode tok/s per request (median; each run) | aggregate tok/s | TTFT ms (median) "
                  "| tokens | prompt tokens |", "|---|---|---|---|---|---|"]
        for name, runs in table.items():
            levels = [run[index] for run in runs]
            each = " / ".join(f"{lv['decode']:.0f}" for lv in levels)
            lines.append(
                f"| {name} | {statistics.median(lv['decode'] for lv in levels):.1f} ({each}) | "
                f"{statistics.median(lv['aggregate'] for lv in levels):.1f} | "
                f"{1000 * statistics.median(lv['ttft'] for lv in levels):.1f} | {levels[0]['tokens']:.0f} | "
                f"{levels[0]['prompt_tokens']} |")
        lines += ["", *ratio_lines(results, index), *peer_lines(table, index), ""]
    lines += ttft_lines(results, args.ttft_requests)
    write_results("served-vs-engine", lines, args.label)


def ratio_lines(results: dict[str, list], index: int) -> list[str]:
    """Served / engine per artifact, pair by pair (each pair ran in one process, back to back)."""
    lines = []
    for name, runs in results.items():
        if not isinstance(runs[0], dict):
            continue
        for mode in MODES[1:]:
            pairs = [(s[index], e[index]) for run in runs for s, e in zip(run[mode], run["engine"])]
            decode = [s["decode"] / e["decode"] for s, e in pairs]
            ttft = [1000 * (s["ttft"] - e["ttft"]) for s, e in pairs]
            each_decode, each_ttft = " / ".join(f"{r:.3f}" for r in decode), " / ".join(f"{t:+.1f}" for t in ttft)
            lines.append(f"- {name}: {mode} / engine decode **{statistics.median(decode):.3f}×** ({each_decode}); "
                         f"TTFT {mode} − engine {statistics.median(ttft):+.1f} ms ({each_ttft})")
    return lines


def ttft_lines(results: dict[str, list], requests: int) -> list[str]:
    """The interleaved TTFT requests: each mode's median, and served − engine within each adjacent triple."""
    lines = ["## TTFT (one-token requests, one client, interleaved)", "",
             f"{requests} engine / served / served-lean triples per process, each request right after the other; "
             "the difference is taken inside each triple", "",
             "| contender | TTFT ms (median) | − engine: median of the differences (95 % CI) | requests |",
             "|---|---|---|---|"]
    for name, runs in results.items():
        if not isinstance(runs[0], dict):
            continue
        for mode in MODES:
            ttfts = [t for run in runs for t in run["ttft"][mode]]
            diffs = [1000 * (s - e) for run in runs for s, e in zip(run["ttft"][mode], run["ttft"]["engine"])]
            low, high = median_interval(diffs)
            spread = "" if mode == "engine" else f"**{statistics.median(diffs):+.1f} ms** ({low:+.1f} … {high:+.1f})"
            lines.append(f"| {name} {mode} | {1000 * statistics.median(ttfts):.1f} | {spread} | {len(ttfts)} |")
    return [*lines, ""]


def median_interval(values: list[float]) -> tuple[float, float]:
    """A distribution-free ~95 % confidence interval of the median: the order statistics n/2 ∓ 0.98·√n."""
    ordered, half = sorted(values), 0.98 * len(values) ** 0.5
    low, high = int(len(values) / 2 - half), int(len(values) / 2 + half)
    return ordered[max(low, 0)], ordered[min(high, len(values) - 1)]


def peer_lines(table: dict[str, list[list[dict]]], index: int) -> list[str]:
    """llmpack served / llama-server at the same weight width (medians of each side's runs)."""
    lines = []
    for ours, theirs in (("fp32", "f32"), ("int8", "q8_0"), ("int4", "q4_0")):
        mine = [n for n in table if n.endswith(f"-{ours} served")]
        peer = f"llama-server {theirs}"
        if mine and peer in table:
            served = statistics.median(run[index]["decode"] for run in table[mine[0]])
            other = statistics.median(run[index]["decode"] for run in table[peer])
            lines.append(f"- llmpack {ours} served / {peer}: decode {served / other:.2f}×")
    return lines


if __name__ == "__main__":
    main()
