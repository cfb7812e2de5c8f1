"""Soak: `llm-serve run` under mixed traffic for a set time, loopback only; exits 1 when a pass criterion fails.

Starts the server on a free 127.0.0.1 port with a small queue (so 429s happen), warms it with the
same traffic, then drives it for --duration seconds from --clients threads: JSON and streaming,
short and ~1500-token prompts, Workers AI, REST and OpenAI routes, ~10% of requests hanging up
mid-stream and ~10% invalid. Every request has a timeout and the run has a hard deadline.
Pass: every valid request completes or gets 429 (none lost, hung or 5xx), every invalid one gets
a 4xx, anonymous RSS (not counting the prefix cache, which fills its budget as traffic comes, nor the
weights file's mapping; the cache counted at its high-water mark, since what it evicts stays in the heap)
grows by at most +10% over the second half of the run — read with nothing in
flight at the middle and at the end (the traffic pauses until the server is idle), so what requests hold
while they run is not counted, and the first minutes' growth (arenas, caches filling) is behind the first
reading whatever the length; the samples' fitted slope over the second half is reported beside it —
nothing in flight at the end (/metrics),
and SIGTERM ends the server with exit 0. Writes bench/results/soak-<date>.md.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import header  # noqa: E402
from serve_bench import _free_port, wait_ready  # noqa: E402

MODEL = "@cf/meta/llama-2-7b-chat-fp16"
RUN, REST, CHAT = f"/ai/run/{MODEL}", f"/client/v4/accounts/soak/ai/run/{MODEL}", "/v1/chat/completions"
# The long prompt is just under the schema's 4096 characters.
SHORT, LONG = "Tell me about llamas.", "The llama walked along the mountain path. " * 95
REQUEST_TIMEOUT = 120.0
INVALID = [  # (path, body bytes, content type): each must get a 4xx
    (RUN, b'{"prompt": ', "application/json"),
    (RUN, b'{"prompt": 5}', "application/json"),
    (RUN, b'{"prompt": "a", "temperature": NaN}', "application/json"),
    (RUN, b'{"prompt": "a", "prompt": "b"}', "application/json"),
    (RUN, b'{"messages": [{"role": "assistant", "content": "x"}]}', "application/json"),
    ("/ai/run/@cf/meta/llama-3-8b-instruct", b'{"prompt": "a"}', "application/json"),
    (REST, b'{"prompt": "a"}', "text/plain"),
    (RUN, b'{"prompt": "' + b"a" * 1_100_000 + b'"}', "application/json"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}]}', "application/json"),
]


class Tally:
    """Thread-safe counts and latencies by request kind."""

    def __init__(self):
        self.lock = threading.Lock()
        self.statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.latencies: dict[str, list[float]] = collections.defaultdict(list)
        self.failures: list[str] = []

    def record(self, kind: str, status: int | str, seconds: float, failure: str | None = None) -> int | str:
        with self.lock:
            self.statuses[kind][status] += 1
            if status == 200:
                self.latencies[kind].append(seconds)
            if failure:
                self.failures.append(f"{kind}: {failure}")
        return status


def sse_complete(lines: list[str]) -> bool:
    """A whole stream: [DONE] last, and a usage event (Workers AI) or a finish chunk (OpenAI) before it."""
    if not lines or lines[-1] != "data: [DONE]":
        return False
    payloads = [json.loads(line[6:]) for line in lines[:-1]]
    return bool(payloads) and any("usage" in p or (p.get("choices") or [{}])[0].get("finish_reason") for p in payloads)


def valid_body(rng: random.Random, path: str, stream: bool) -> dict:
    prompt = LONG if rng.random() < 0.25 else SHORT
    common = {"max_tokens": rng.randint(8, 96), "temperature": rng.choice([0, 0.8]), "seed": rng.randint(1, 99),
              "stream": stream}
    if path == CHAT:
        return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **common,
                **({"stream_options": {"include_usage": True}} if stream else {})}
    return {"prompt": prompt, "raw": prompt is LONG, **common}


def send_valid(client: httpx.Client, rng: random.Random, tally: Tally) -> int | str:
    path, stream = rng.choice([RUN, REST, CHAT]), rng.random() < 0.5
    kind, started = f"valid {'stream' if stream else 'json'}", time.monotonic()
    try:
        with client.stream("POST", path, json=valid_body(rng, path, stream)) as response:
            if response.status_code != 200:
                response.read()
                failure = None if response.status_code == 429 else f"{response.status_code} {response.text[:200]}"
                return tally.record(kind, response.status_code, time.monotonic() - started, failure)
            if stream:
                complete = sse_complete([line for line in response.iter_lines() if line])
            else:
                answer = json.loads(response.read())
                complete = "usage" in answer.get("result", answer)
    except (httpx.HTTPError, ValueError) as exc:
        return tally.record(kind, type(exc).__name__, time.monotonic() - started, repr(exc)[:200])
    return tally.record(kind, 200 if complete else "incomplete", time.monotonic() - started,
                 None if complete else f"{path} answer incomplete")


def send_disconnecting(client: httpx.Client, rng: random.Random, tally: Tally) -> int | str:
    body = {"prompt": rng.choice([SHORT, LONG]), "max_tokens": 400, "stream": True}
    started = time.monotonic()
    try:
        with client.stream("POST", RUN, json=body) as response:
            status = response.status_code
            if status == 200:
                events = (line for line in response.iter_lines() if line)
                for _ in range(rng.randint(1, 5)):
                    next(events, None)
            # leaving the block closes the connection mid-stream
    except httpx.HTTPError as exc:
        return tally.record("disconnecting", type(exc).__name__, time.monotonic() - started, repr(exc)[:200])
    return tally.record("disconnecting", status, time.monotonic() - started,
                        None if status in (200, 429) else str(status))


def send_invalid(client: httpx.Client, rng: random.Random, tally: Tally) -> int | str:
    path, body, content_type = rng.choice(INVALID)
    started = time.monotonic()
    try:
        response = client.post(path, content=body, headers={"Content-Type": content_type})
    except httpx.HTTPError as exc:
        return tally.record("invalid", type(exc).__name__, time.monotonic() - started, repr(exc)[:200])
    ok = 400 <= response.status_code < 500 and response.headers.get("content-type") == "application/json"
    return tally.record("invalid", response.status_code, time.monotonic() - started,
                 None if ok else f"{path} got {response.status_code} {response.text[:200]}")


def client_loop(base: str, seed: int, until: float, tally: Tally) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT) as client:
        while time.monotonic() < until:
            roll = rng.random()
            send = send_invalid if roll < 0.1 else send_disconnecting if roll < 0.2 else send_valid
            if send(client, rng, tally) == 429:
                time.sleep(rng.uniform(0.5, 1.5))  # as Retry-After: 1 asks, with jitter


def drive(base: str, clients: int, seconds: float, seed: int, tally: Tally | None = None) -> Tally:
    tally, until = tally or Tally(), time.monotonic() + seconds
    threads = [threading.Thread(target=client_loop, args=(base, seed * 1000 + n, until, tally), daemon=True)
               for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + REQUEST_TIMEOUT + 10)  # a request still running then is hung
    if any(thread.is_alive() for thread in threads):
        tally.failures.append("a client thread is still waiting on the server (hung request)")
    return tally


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


class RssSampler(threading.Thread):
    """Every `every` s: (seconds, total RSS, anonymous RSS outside the prefix cache) in MiB."""

    def __init__(self, pid: int, base: str, every: float):
        super().__init__(daemon=True)
        self.pid, self.base, self.every, self.samples, self.stopped = pid, base, every, [], threading.Event()
        self.started_at = time.monotonic()
        self.cache_peak = 0.0  # MiB: the most the prefix cache has held so far

    def read(self) -> tuple[float, float]:
        """(anonymous RSS, the prefix cache's high-water mark) now, in MiB. The peak, not the current size:
        what the cache frees when it evicts stays resident in the heap (measured: a 150 s soak whose cache
        went from 44 to 30 MiB showed +19 % 'outside the cache' with the current size subtracted)."""
        anonymous, cache = memory_mib(self.pid, self.base)
        self.cache_peak = max(self.cache_peak, cache)
        return anonymous, self.cache_peak

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            try:
                anonymous, cache = self.read()
            except (httpx.HTTPError, OSError):
                continue  # a slow /metrics under load: skip this sample
            self.samples.append((time.monotonic() - self.started_at, rss_mib(self.pid), anonymous - cache))

    def mark(self) -> float:
        """The time the measured run starts."""
        return time.monotonic() - self.started_at


def second_half_growth(samples: list[tuple[float, float, float]], start: float, end: float) -> tuple[float, float]:
    """(growth in MiB the least-squares line over the second half of [start, end] gives across that half,
    the line's level where the half begins) for anonymous RSS outside the prefix cache."""
    middle = (start + end) / 2
    points = [(t, outside) for t, _, outside in samples if middle <= t <= end]
    if len(points) < 3:
        raise SystemExit("too few RSS samples in the second half of the run; run the soak longer")
    mean_t = sum(t for t, _ in points) / len(points)
    mean_v = sum(v for _, v in points) / len(points)
    slope = sum((t - mean_t) * (v - mean_v) for t, v in points) / sum((t - mean_t) ** 2 for t, _ in points)
    return slope * (end - middle), mean_v + slope * (middle - mean_t)


def metric(base: str, name: str, default: float | None = None) -> float:
    text = httpx.get(base + "/metrics", timeout=10).text
    found = [float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " ")]
    if not found and default is not None:
        return default
    return found[0]


def memory_mib(pid: int, base: str) -> tuple[float, float]:
    """Anonymous RSS, and the part of it the prefix cache holds. Neither of these counts as growth:
    the weights file's mapping (RssFile: the fp32 embedding table pages in row by row as new token
    ids are looked up, up to its size, and the kernel can drop it), and the prefix cache (budgeted by
    --prefix-cache-mb, filled by traffic). Measured on bench-110m int4, 150 s: +80 MiB of the
    mapped model.onnx.data between warm-up and the end."""
    return rss_mib(pid, "RssAnon"), metric(base, "llmpack_prefix_cache_bytes", 0.0) / 2**20


def settle(base: str, timeout: float = 20.0) -> float:
    """Wait for the server to drain (cancelled streams finish between tokens); returns what is still in flight."""
    deadline = time.monotonic() + timeout
    while (left := metric(base, "llmpack_requests_in_flight")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # let freed buffers go back before RSS is read
    return left


def start_server(artifact: Path, args, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    serve = Path(sys.executable).with_name("llm-serve")
    command = [str(serve), "run", str(artifact), "--host", "127.0.0.1", "--port", str(port), "--max-queue",
               str(args.max_queue), "--max-batch", str(args.max_batch), "--threads", str(args.threads),
               *args.server_arg]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "LLMPACK_API_KEY": ""})
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base, f"; see {log_path}")
    return proc, base


def percentile(values: list[float], q: float) -> str:
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))]:.2f}" if ordered else "—"


def quiescent_growth(middle: tuple[float, float], end: tuple[float, float]) -> tuple[float, float]:
    """(MiB grown, MiB at the middle) of anonymous RSS outside the prefix cache, from (RSS, cache) readings
    taken with nothing in flight at the middle and at the end of the run."""
    return (end[0] - end[1]) - (middle[0] - middle[1]), middle[0] - middle[1]


def verdicts(tally: Tally, growth: tuple[float, float], in_flight: float, exit_code: int | None) -> list[str]:
    """The failed pass criteria, each in one line; empty when the run passed. `growth`: quiescent_growth."""
    failed = list(tally.failures[:20])
    grew, level = growth
    if grew > 0.10 * level:
        failed.append(f"anonymous RSS outside the prefix cache grew {grew:+.1f} MiB over the second half of the run "
                      f"from {level:.0f} MiB, both read idle (> +10%)")
    if in_flight:
        failed.append(f"{in_flight:.0f} requests still in flight after the run")
    if exit_code != 0:
        failed.append(f"the server exited with {exit_code} after SIGTERM")
    return failed


def report(args, tally: Tally, rss: RssSampler, end: tuple[tuple, tuple, tuple, tuple, float, int | None],
           failed: list[str]) -> str:
    """The results file; `end` is (RSS, prefix cache) after warm-up and after the run, the idle growth over the
    second half, the samples' fitted growth there, in flight at the end, exit code."""
    (rss_warm, cache_warm), (rss_end, cache_end), (grew, level), (fitted, fitted_level), in_flight, exit_code = end
    total = sum(sum(counter.values()) for counter in tally.statuses.values())
    lines = [header("Soak: llm-serve under mixed traffic", "onnxruntime", "uvicorn", "fastapi"),
             f"settings: artifact `{args.artifact.name}`, {args.clients} "
             f"clients, --max-queue {args.max_queue}, --max-batch {args.max_batch}, --threads {args.threads}, "
             f"warm-up {args.warmup:g} s, seed {args.seed}" + "".join(f", {a}" for a in args.server_arg), "",
             f"**{'PASS' if not failed else 'FAIL'}** — {total} requests answered in {args.duration:g} s "
             f"({total / args.duration:.1f}/s)", "",
             "| kind | requests | by status | p50 / p99 latency of 200s (s) |", "|---|---|---|---|"]
    for kind, counter in sorted(tally.statuses.items()):
        latency = tally.latencies[kind]
        shown = ", ".join(f"{status}: {n}" for status, n in sorted(counter.items(), key=str))
        lines.append(f"| {kind} | {sum(counter.values())} | {shown} | "
                     f"{percentile(latency, 0.5)} / {percentile(latency, 0.99)} |")
    step = max(1, len(rss.samples) // 12)
    series = ", ".join(f"{t:.0f} s: {total:.0f}" for t, total, _ in rss.samples[::step])
    outside = ", ".join(f"{t:.0f} s: {mib:.1f}" for t, _, mib in rss.samples[::step])
    lines += ["", f"anonymous RSS after warm-up {rss_warm:.1f} MiB, after the run {rss_end:.1f} MiB "
                  f"({100 * (rss_end / rss_warm - 1):+.1f}%), the prefix cache {cache_warm:.1f} MiB after warm-up and "
                  f"{cache_end:.1f} MiB at its peak; "
                  f"total RSS (with the weights' file mapping) over time (MiB): {series}",
              "", f"anonymous RSS outside the prefix cache, read idle: {level:.1f} MiB at the middle of the run, "
                  f"{level + grew:.1f} MiB at the end ({100 * grew / level:+.2f}%, limit +10%); under traffic over "
                  f"time (MiB): {outside}; the line fitted to those samples over the second half grows "
                  f"{fitted:+.2f} MiB from {fitted_level:.1f} ({100 * fitted / fitted_level:+.2f}%, for information)",
              "", f"in flight at the end (/metrics): {in_flight:.0f}; server exit status after SIGTERM: {exit_code}"]
    lines += ["", *(f"- failed: {line}" for line in failed)] if failed else []
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of measured traffic")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of the same traffic before RSS is taken")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--server-arg", action="append", default=[],
                        help="passed on to llm-serve run (repeat for several), e.g. --server-arg=--no-huge-pages")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results"
                        / f"soak-{dt.date.today().isoformat()}.md")
    args = parser.parse_args()
    log_path = Path(tempfile.gettempdir()) / f"llmpack-soak-{os.getpid()}.log"  # kept out of the results
    proc, base = start_server(args.artifact, args, log_path)
    try:
        rss = RssSampler(proc.pid, base, every=2.0)
        rss.start()
        drive(base, args.clients, args.warmup, args.seed + 1)  # warm-up: same mix, not counted
        settle(base)
        warm = memory_mib(proc.pid, base)
        started = rss.mark()
        tally = drive(base, args.clients, args.duration / 2, args.seed)
        settle(base)
        middle = rss.read()
        drive(base, args.clients, args.duration / 2, args.seed + 7, tally)
        fitted = second_half_growth(rss.samples, started, rss.mark())
        in_flight = settle(base)
        end = rss.read()
        growth = quiescent_growth(middle, end)
        rss.stopped.set()
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    failed = verdicts(tally, growth, in_flight, exit_code)
    text = report(args, tally, rss, (warm, end, growth, fitted, in_flight, exit_code), failed)
    args.out.write_text(text)
    sys.stdout.write(text + f"\nwritten to {args.out} (server log {log_path})\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
