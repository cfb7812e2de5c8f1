"""What an operator sees of `llm-serve run`: a taken port fails before the model loads, the served model's
name, JSON logs, and the lines that say the server started, drained and stopped."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import httpx
from serving import LLM_SERVE, RUN, ServerProcess, free_port


def test_a_taken_port_is_one_error_line_before_the_model_loads(demo_artifact):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([LLM_SERVE, "run", str(demo_artifact), "--port", str(port)], capture_output=True,
                             text=True, timeout=120, check=False)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: cannot listen on 127.0.0.1:{port}: ") and "--port" in lines[-1], lines
    assert not any("backend" in line for line in lines), "the model was loaded before the port was checked"


def test_served_model_name_replaces_the_artifact_name(demo_artifact, tmp_path):
    server = ServerProcess(demo_artifact, tmp_path / "serve.log", "--served-model-name", "my-llama")
    try:
        models = httpx.get(server.base + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["@cf/meta/llama-2-7b-chat-fp16", "my-llama"]
        body = {"model": "my-llama", "prompt": "Once", "max_tokens": 2}
        assert httpx.post(server.base + "/v1/completions", json=body).status_code == 200
        assert httpx.post(server.base + "/v1/completions", json={**body, "model": "demo"}).status_code == 404
        assert httpx.post(server.base + "/ai/run/my-llama", json={"prompt": "Once", "max_tokens": 2}).status_code == 200
    finally:
        assert server.stop() == 0


def test_json_logs_and_the_start_drain_and_stop_lines(demo_artifact, tmp_path):
    server = ServerProcess(demo_artifact, tmp_path / "serve.log", "--log-format", "json", port=free_port())
    httpx.post(server.base + RUN, json={"prompt": "Hello", "max_tokens": 2}, headers={"X-Request-ID": "j-1"})
    assert server.stop() == 0
    records = [json.loads(line) for line in server.log().splitlines()]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert all(r["time"].endswith("Z") for r in records)
    messages = [(r["logger"], r["message"]) for r in records]
    started = [m for logger, m in messages if logger == "llmpack.server" and m.startswith("serving model demo")]
    access = [m for logger, m in messages if logger == "llmpack.access" and m.endswith("id=j-1")]
    assert started and access and access[0].startswith("POST /ai/run/{model} 200 prompt=")
    tail = [m for logger, m in messages if logger == "llmpack.server"][-3:]
    assert tail[0].startswith("shutting down: 0 requests in flight") and tail[1] == "drained: every request finished"
    assert tail[2] == "stopped"


def test_text_logs_carry_utc_timestamps(demo_server):
    line = next(line for line in demo_server.log().splitlines() if "llmpack.server" in line)
    stamp = line.split(" ", 1)[0]
    assert time.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ")
