"""Test helpers for the HTTP server: a real `llm-serve run` process on a free loopback port, and SSE parsing."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

LLM_SERVE = str(Path(sys.executable).with_name("llm-serve"))
LLM_EXPORT = str(Path(sys.executable).with_name("llm-export"))
WORKERS_MODEL = "@cf/meta/llama-2-7b-chat-fp16"
SERVER_API_KEY = "test-key-0123456789"  # what the session's demo_server requires
AUTH = {"Authorization": f"Bearer {SERVER_API_KEY}"}
RUN = f"/ai/run/{WORKERS_MODEL}"
REST = f"/client/v4/accounts/0123abcd/ai/run/{WORKERS_MODEL}"
GREEDY = {"temperature": 0, "max_tokens": 12}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`llm-serve run ARTIFACT ...` as a child process; its log goes to a file the tests can read."""

    started: list[ServerProcess] = []  # so a failed test cannot leave a server running after the session

    @classmethod
    def kill_leftovers(cls) -> None:
        for server in cls.started:
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait(10)

    def __init__(self, artifact: Path, log_path: Path, *args: str, env: dict | None = None, port: int | None = None):
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [LLM_SERVE, "run", str(artifact), "--port", str(self.port), "--threads", "1", *args]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})
        ServerProcess.started.append(self)
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llm-serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.base + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"llm-serve was not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


def parse_sse(raw: bytes) -> tuple[list[dict], bool]:
    """The JSON payloads of an event stream and whether it ended with [DONE]; rejects malformed framing."""
    assert raw.endswith(b"\n\n"), raw[-80:]
    payloads, done = [], False
    for block in raw[:-2].split(b"\n\n"):
        assert not done, "an event after [DONE]"
        assert block.startswith(b"data: ") and b"\n" not in block, block
        data = block[len(b"data: "):]
        if data == b"[DONE]":
            done = True
        else:
            payloads.append(json.loads(data))
    return payloads, done


def workers_stream_text(raw: bytes) -> tuple[str, dict]:
    """Text and usage of a complete Workers AI stream."""
    events, done = parse_sse(raw)
    assert done and events, raw[-200:]
    *pieces, last = events
    assert last["response"] == "" and set(last["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert all(set(event) <= {"response", "p"} for event in pieces), pieces
    return "".join(event["response"] for event in pieces), last["usage"]


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample of Prometheus text, 0 when absent (a counter not yet incremented)."""
    pattern = "^" + re.escape(name + (f"{{{labels}}}" if labels else "")) + r" (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)
