"""Benchmark: `llm-serve run` against Ray Serve with 1 and 2 replicas, and prefix affinity on vs off.

Runs only inside a loopback-only network namespace (`make bench-cluster` makes one): Ray binds to the
machine's other addresses otherwise. One single-node Ray (2 CPUs' worth of replicas on this 2-core machine),
one server kind at a time, the same artifact and engine options everywhere:
- overhead: one-token requests one after another, median latency per server kind (what Ray's proxy, the
  ingress and the replica hop add per request);
- throughput: CLIENTS concurrent clients, each streaming REQUESTS greedy answers of TOKENS tokens;
- affinity: CONVERSATIONS chats of TURNS turns sent concurrently (each turn resends the earlier ones), on 2
  replicas with prefix affinity on and off: the share of follow-up turns that land on the replica of their
  previous turn, and the prefix cache's reused tokens / prompt tokens over both replicas.
Writes bench/results/cluster-<date>.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cluster_workload import interfaces  # noqa: E402
from machine import header, write_results  # noqa: E402

RUN = "/ai/run/@cf/meta/llama-2-7b-chat-fp16"
HEADER = "x-llmpack-replica"
PORT = 8790


def overhead(base: str, n: int) -> float:
    """Median ms of a one-token request, sent one after another."""
    times = []
    with httpx.Client(base_url=base, timeout=120) as client:
        for i in range(n):
            started = time.perf_counter()
            assert client.post(RUN, json={"prompt": f"Hi {i % 7}", "raw": True, "max_tokens": 1}).status_code == 200
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def throughput(base: str, clients: int, requests: int, tokens: int) -> tuple[float, float]:
    """(requests/s, generated tokens/s) for `clients` concurrent streaming clients."""
    def client(worker: int) -> int:
        done = 0
        with httpx.Client(base_url=base, timeout=300) as own:
            for i in range(requests):
                body = {"prompt": f"Once upon a time {worker}-{i}", "raw": True, "max_tokens": tokens,
                        "temperature": 0}
                done += own.post(RUN, json=body).json()["usage"]["completion_tokens"]
        return done

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        generated = sum(pool.map(client, range(clients)))
    elapsed = time.perf_counter() - started
    return clients * requests / elapsed, generated / elapsed


def conversations(base: str, chats: int, turns: int) -> tuple[float, list[str]]:
    """(share of follow-up turns on their previous turn's replica, replicas seen)."""
    def chat(n: int) -> list[str]:
        text, seen = f"Chat {n}: once upon a time there was a llama named Lou{n}.", []
        with httpx.Client(base_url=base, timeout=300) as own:
            for turn in range(turns):
                r = own.post(RUN, json={"prompt": text, "raw": True, "max_tokens": 24, "temperature": 0})
                seen.append(r.headers.get(HEADER, "one"))
                text += r.json()["response"] + f" Then, part {turn}:"
        return seen

    with ThreadPoolExecutor(chats) as pool:
        routes = list(pool.map(chat, range(chats)))
    follow = [(a == b) for seen in routes for a, b in zip(seen, seen[1:])]
    return sum(follow) / len(follow), sorted({r for seen in routes for r in seen})


def cache_counters(base: str, replicas: int) -> tuple[float, float]:
    """(reused prompt tokens, prompt tokens) summed over the replicas' own /metrics."""
    from serving import metric

    found: dict[str, str] = {}
    with httpx.Client(base_url=base, timeout=60) as client:
        for _ in range(60):
            r = client.get("/metrics")
            found[r.headers.get(HEADER, "one")] = r.text
            if len(found) == replicas:
                break
    reused = sum(metric(t, "llmpack_prefix_cache_reused_tokens_total") for t in found.values())
    prompt = sum(metric(t, "llmpack_prompt_tokens_total") for t in found.values())
    return reused, prompt


def wait_ready(base: str, proc=None) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc is None or proc.poll() is None, "llm-serve run exited"
        time.sleep(0.2)
    raise RuntimeError(f"{base} not ready")


def measure(base: str, args, replicas: int) -> dict:
    result = {"overhead_ms": overhead(base, args.overhead_requests)}
    result["rps"], result["tps"] = throughput(base, args.clients, args.requests, args.tokens)
    before = cache_counters(base, replicas)
    result["affinity"], result["replicas_seen"] = conversations(base, args.conversations, args.turns)
    after = cache_counters(base, replicas)
    result["reused_share"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
    return result


def single_process(args) -> dict:
    command = [str(Path(sys.executable).with_name("llm-serve")), "run", str(args.artifact), "--port", str(PORT),
               "--max-batch", str(args.max_batch), "--threads", str(args.threads)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{PORT}", proc)
        return measure(f"http://127.0.0.1:{PORT}", args, 1)
    finally:
        proc.terminate()
        proc.wait(60)


def on_ray(args, replicas: int, affinity: bool) -> dict:
    from ray import serve

    from llmpack.runtime.engine import EngineOptions
    from llmpack.runtime.serve.cluster.ray_app import application
    from llmpack.runtime.serve.cluster.settings import ClusterSettings
    from llmpack.runtime.serve.settings import ServerSettings

    engine = EngineOptions(threads=args.threads, max_batch=args.max_batch)
    cluster = ClusterSettings(replicas=replicas, prefix_affinity=affinity, num_cpus=1)
    serve.run(application(args.artifact, engine, ServerSettings(), cluster), name="llmpack", route_prefix="/")
    try:
        return measure(f"http://127.0.0.1:{PORT + 1}", args, replicas)
    finally:
        serve.delete("llmpack")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--overhead-requests", type=int, default=60)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=5)
    args = parser.parse_args()
    if interfaces() != ["lo"]:
        sys.exit("run inside a loopback-only network namespace (make bench-cluster does)")
    import ray
    from ray import serve

    rows = {"llm-serve run": single_process(args)}
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT + 1}, proxy_location="HeadOnly")
        rows["Ray Serve, 1 replica"] = on_ray(args, 1, True)
        rows["Ray Serve, 2 replicas, affinity on"] = on_ray(args, 2, True)
        rows["Ray Serve, 2 replicas, affinity off"] = on_ray(args, 2, False)
    finally:
        serve.shutdown()
        ray.shutdown()
    report(args, rows)


def report(args, rows: dict) -> None:
    lines = [header("Ray Serve scale-out: llm-serve run vs 1 and 2 replicas", "ray", "onnxruntime"), "",
             f"artifact `{args.artifact.name}`, max_batch {args.max_batch}, {args.threads} thread(s) per engine; "
             f"{args.clients} clients × {args.requests} requests × {args.tokens} tokens; "
             f"{args.conversations} chats × {args.turns} turns for affinity.", "",
             "| server | one-token request, median ms | requests/s | generated tok/s | follow-up turn on its "
             "previous replica | prefix cache reused / prompt tokens (chats) |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['overhead_ms']:.1f} | {r['rps']:.2f} | {r['tps']:.0f} | "
                     f"{r['affinity']:.0%} | {r['reused_share']:.0%} |")
    base = rows["llm-serve run"]["overhead_ms"]
    lines += ["", f"Per-request overhead of Ray Serve (1 replica) over `llm-serve run`: "
              f"{rows['Ray Serve, 1 replica']['overhead_ms'] - base:+.1f} ms."]
    write_results("cluster", lines)


if __name__ == "__main__":
    main()
