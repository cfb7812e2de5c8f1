"""Benchmark: CPU per streamed token of the server's event loop and of the client — what serving takes from
the cores the engine decodes on (a 2-core machine has nothing spare: every such microsecond comes out of a step).

Loads the artifact as `llm-serve run` does (prefix cache off), serves it with the same app and runner in a
thread of this process, and streams long answers to a client process on loopback: the event loop
thread's CPU time (from /proc, so no profiler in the way) and the client process's own, per token, for
the httpx + JSON client and the http.client client of bench/served_vs_engine.py. `--loop asyncio` hides
uvloop from uvicorn even where it is installed; `--http h11` serves with uvicorn's h11 protocol even where
httptools is installed. Writes bench/results/loop-cpu-<date><label>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import header, write_results  # noqa: E402

CLIENT = """
import json, resource, sys
sys.path.insert(0, {bench!r})
import served_vs_engine as s
request = s.lean_request if {kind!r} == "lean" else s.llmpack_request
request({url!r}, {prompt!r}, 4)
before = resource.getrusage(resource.RUSAGE_SELF)
tokens = sum(request({url!r}, {prompt!r}, {new_tokens})["tokens"] for _ in range({requests}))
after = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps([tokens, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime]))
"""


def thread_cpu(tid: int) -> float:
    with open(f"/proc/self/task/{tid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loop", choices=["auto", "asyncio"], default="auto")
    parser.add_argument("--http", choices=["auto", "h11"], default="auto")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    if args.loop == "asyncio":
        sys.modules["uvloop"] = None  # uvicorn's loop="auto" then takes asyncio's
    import served_vs_engine as bench

    from llmpack.runtime.engine import Engine, EngineOptions
    from llmpack.runtime.serve import uvicorn_runner
    from llmpack.runtime.serve.protocol import ENGINE_LIMITS
    from llmpack.runtime.serve.server import create_app
    from llmpack.runtime.serve.settings import ServerSettings
    from llmpack.runtime.serve.uvicorn_runner import serve

    if args.http == "h11":
        uvicorn_runner.HttpToolsProtocol = None

    engine = Engine.load(args.artifact, EngineOptions(prefix_cache_mb=0, verify_checksums=False, **ENGINE_LIMITS))
    port, ids = bench.free_port(), {}
    app = create_app(engine, ServerSettings())

    def run() -> None:
        ids["loop"] = threading.get_native_id()
        serve(app, "127.0.0.1", port, engine.model_name, 1.0, False)

    threading.Thread(target=run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    bench.wait_ready(None, url + "/ready")
    prompt = bench.prompt_text(args.artifact / "tokenizer.model", 16)
    rows = []
    for round_ in range(args.rounds):
        for kind in ("httpx", "lean"):
            code = CLIENT.format(bench=str(Path(__file__).resolve().parent), kind=kind, url=url, prompt=prompt,
                                 new_tokens=args.new_tokens, requests=args.requests)
            before = thread_cpu(ids["loop"])
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            loop_seconds = thread_cpu(ids["loop"]) - before
            tokens, client_seconds = json.loads(out.strip().splitlines()[-1])
            rows.append((round_ + 1, kind, 1000 * loop_seconds / tokens, 1000 * client_seconds / tokens))
    http = "h11" if uvicorn_runner.HttpToolsProtocol is None else "httptools"
    loop_name = "asyncio" if args.loop == "asyncio" else ("uvloop" if _has_uvloop() else "asyncio (no uvloop)")
    lines = [header("CPU per streamed token: the server's event loop and the client", "onnxruntime", "uvicorn",
                    "starlette", "h11", "httptools", "httpx"),
             f"artifact `{args.artifact.name}`, loop {loop_name}, protocol {http}, "
             f"{args.requests} requests × {args.new_tokens} tokens "
             f"per client run (the loop's CPU includes the warm-up request's 4 tokens)", "",
             "| round | client | event loop ms CPU / token | client process ms CPU / token |", "|---|---|---|---|",
             *(f"| {r} | {kind} | {loop:.3f} | {client:.3f} |" for r, kind, loop, client in rows)]
    write_results("loop-cpu", lines, args.label)
    engine.close()


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
