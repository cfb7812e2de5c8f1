"""Cluster test driver: a two-node local Ray cluster serving an artifact, observed; run only inside a
loopback-only network namespace (tests/test_cluster.py starts it there and asserts on what it writes).

    python tests/cluster_driver.py ARTIFACT OUT.json

It records raw observations (bodies, replica headers, metrics, statuses, sockets), never verdicts: the test
outside decides. Every request has a client timeout and every wait a bound, so nothing here can hang.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from cluster_workload import LONG, WORKERS, greedy_requests, inet_sockets, interfaces

HEADER = "x-llmpack-replica"
TIMEOUT = httpx.Timeout(120.0, connect=10.0)


def main(artifact: str, out: str) -> None:
    assert interfaces() == ["lo"], "run me inside a loopback-only network namespace"
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from llmpack.runtime.engine import EngineOptions
    from llmpack.runtime.serve.cluster.ray_app import application
    from llmpack.runtime.serve.cluster.settings import ClusterSettings
    from llmpack.runtime.serve.settings import ServerSettings

    report: dict = {"interfaces": interfaces()}
    temp = tempfile.mkdtemp(prefix="llmray-", dir="/tmp")  # short: Ray's unix socket paths must fit
    started = time.monotonic()
    os.makedirs("/tmp/ray", exist_ok=True)  # Cluster writes its address there whatever temp_dir says
    node = {"num_cpus": 2, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False, "temp_dir": temp})
    cluster.add_node(**node)
    ray.init(address=cluster.address)
    base = "http://127.0.0.1:8765"
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 8765}, proxy_location="HeadOnly")
        engine = EngineOptions(threads=1, max_batch=4)
        app = application(artifact, engine, ServerSettings(max_queue=32), ClusterSettings(replicas=2, num_cpus=1))
        serve.run(app, name="llmpack", route_prefix="/")
        report["up_s"] = time.monotonic() - started
        report["replica_nodes"] = _replica_nodes()
        with httpx.Client(base_url=base, timeout=TIMEOUT) as client:
            report["greedy"] = _greedy(base)
            report["chat"] = _shared_prefix_chat(client)
            report["probes"] = {path: client.get(path).status_code for path in ("/health", "/ready", "/v1/models")}
        report["kill"] = _kill_under_load(base)
        report["sockets"] = inet_sockets()
        small = application(artifact, EngineOptions(threads=1, max_batch=1),
                            ServerSettings(max_queue=0, shutdown_timeout_s=300),
                            ClusterSettings(replicas=2, num_cpus=1))
        serve.run(small, name="llmpack", route_prefix="/")
        report["full"] = _fill(base)
        report["sockets"] += inet_sockets()
        report["drain"] = _drain_on_delete(base, serve)
    finally:
        Path(out).write_text(json.dumps(report))
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def _replica_nodes() -> list[dict]:
    """The live engine replicas: actor name (ends with the replica id the header carries), pid, node.
    From the GCS actor table: Ray's state API would need the dashboard, which this cluster does not run."""
    from ray._private.state import actors

    table = actors(actor_state_name="ALIVE").values()
    return [{"name": a["Name"], "pid": a["Pid"], "node": a["Address"]["NodeID"], "ip": a["Address"]["IPAddress"]}
            for a in table if "LlmReplica" in (a["ActorClassName"] or "")]


def _greedy(base: str) -> list[dict]:
    """The 24 greedy requests at once: every body and the replica that answered."""
    def one(job):
        path, body = job
        with httpx.Client(base_url=base, timeout=TIMEOUT) as own:
            response = own.post(path, json=body)
        return {"path": path, "status": response.status_code, "body": response.content.decode("utf-8", "replace"),
                "replica": response.headers.get(HEADER)}

    with ThreadPoolExecutor(24) as pool:
        return list(pool.map(one, greedy_requests()))


def _replica_metrics(client: httpx.Client, replica: str) -> str | None:
    """/metrics of one replica: asked until that replica answers (the router picks; 40 tries)."""
    for _ in range(40):
        response = client.get("/metrics")
        if response.headers.get(HEADER) == replica:
            return response.text
    return None


def _shared_prefix_chat(client: httpx.Client) -> dict:
    """Four turns of one conversation, each sent with the earlier turns: where each lands and the prefix
    cache counters of the replica the first landed on, before and after."""
    messages = [{"role": "system", "content": "You are a storyteller."},
                {"role": "user", "content": "Tell me about a llama named Lou."}]
    turns = []
    first = client.post(WORKERS, json={"messages": messages, "max_tokens": 24, "temperature": 0})
    turns.append({"replica": first.headers.get(HEADER), "usage": first.json()["usage"]})
    before = _replica_metrics(client, turns[0]["replica"])
    answer = first.json()["response"]
    for n in range(3):
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": f"And then {n}?"}]
        reply = client.post(WORKERS, json={"messages": messages, "max_tokens": 24, "temperature": 0})
        turns.append({"replica": reply.headers.get(HEADER), "usage": reply.json()["usage"]})
        answer = reply.json()["response"]
    return {"turns": turns, "before": before, "after": _replica_metrics(client, turns[0]["replica"])}


def _stream(base: str, body: dict, first_event: callable | None = None) -> dict:
    """One streamed request, read to its end: status, replica, the last bytes and whether it hung."""
    try:
        with httpx.Client(base_url=base, timeout=TIMEOUT) as own, own.stream("POST", WORKERS, json=body) as r:
            raw = b""
            for chunk in r.iter_bytes():
                if not raw and first_event is not None:
                    first_event(r.headers.get(HEADER))
                raw += chunk
            return {"status": r.status_code, "replica": r.headers.get(HEADER),
                    "tail": raw[-300:].decode("utf-8", "replace"),
                    "outcome": "done" if raw.endswith(b"data: [DONE]\n\n") else "ended"}
    except httpx.TimeoutException:
        return {"outcome": "hung"}
    except httpx.TransportError as exc:
        return {"outcome": f"cut: {type(exc).__name__}"}


def _kill_under_load(base: str) -> dict:
    """8 long streams over both replicas, then 4 more; SIGKILL one replica's process once it streams."""
    import threading

    victim_pid: dict = {}
    streaming = threading.Event()

    def started(replica):
        victim_pid.setdefault("replica", replica)
        streaming.set()

    replicas_before = _replica_nodes()
    bodies = [{"prompt": f"Go on {n}", **LONG} for n in range(8)]
    with ThreadPoolExecutor(12) as pool:
        first = [pool.submit(_stream, base, body, started) for body in bodies]
        streaming.wait(120)
        # The replica that streams first: its actor name ends with its unique id, which the header carries.
        target = next((r for r in replicas_before if r["name"].endswith(victim_pid.get("replica", "?"))), None)
        if target is not None:
            os.kill(target["pid"], signal.SIGKILL)
        later = [pool.submit(_stream, base, {"prompt": f"After {n}", **LONG, "max_tokens": 64}) for n in range(4)]
        results = [f.result(timeout=600) for f in first]
        after = [f.result(timeout=600) for f in later]
    replaced = _wait_replaced(base, {r["name"] for r in replicas_before})
    return {"victim": target, "first": results, "later": after, "replicas_after": replaced}


def _wait_replaced(base: str, before: set[str]) -> list[dict]:
    """Ray's replacement replica, once it answers (bounded: 120 s)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = _replica_nodes()
        if len(now) == 2 and {r["name"] for r in now} != before:
            seen = set()
            with httpx.Client(base_url=base, timeout=TIMEOUT) as client:
                for _ in range(40):
                    seen.add(client.post(WORKERS, json={"prompt": "hi", "max_tokens": 2}).headers.get(HEADER))
            return [{**r, "answered": any(r["name"].endswith(s or "?") for s in seen)} for r in now]
        time.sleep(0.5)
    return _replica_nodes()


def _fill(base: str) -> dict:
    """max_batch 1, max_queue 0 on 2 replicas: hold long streams until both replicas hold one, then ask again."""
    held, statuses = {}, []
    clients = []
    try:
        for _ in range(20):
            client = httpx.Client(base_url=base, timeout=TIMEOUT)
            clients.append(client)
            response = client.send(client.build_request("POST", WORKERS, json={"prompt": "fill", **LONG}), stream=True)
            statuses.append(response.status_code)
            if response.status_code == 200:
                chunks = response.iter_bytes()  # kept: a dropped iterator closes its response
                next(chunks)  # streaming: the replica's one batch slot is taken
                held.setdefault(response.headers.get(HEADER), []).append((response, chunks))
            else:
                response.read()
                response.close()
            if len(held) == 2:
                break
        over = [httpx.post(base + path, json=body, timeout=TIMEOUT) for path, body in
                [(WORKERS, {"prompt": "one too many"}), ("/v1/chat/completions",
                 {"model": "demo", "messages": [{"role": "user", "content": "hi"}]})] * 2]
        full = [{"status": r.status_code, "body": r.text, "retry_after": r.headers.get("retry-after")} for r in over]
    finally:
        for client in clients:
            client.close()
    # Freed: the disconnects cancel the held streams, and a request is served again (bounded wait).
    deadline, again = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        again = httpx.post(base + WORKERS, json={"prompt": "again", "max_tokens": 2}, timeout=TIMEOUT).status_code
        if again == 200:
            break
        time.sleep(0.2)
    return {"held": {k: len(v) for k, v in held.items() if k}, "statuses": statuses, "full": full, "again": again}


def _drain_on_delete(base: str, serve) -> dict:
    """A stream in flight when the app is deleted: Ray stops routing and the replica lets it finish
    (shutdown_timeout_s 300, far more than its 2900 tokens take; Ray starts stopping the replicas within
    ~2 s), as SIGTERM does to `llm-serve run`."""
    import threading

    with httpx.Client(base_url=base, timeout=TIMEOUT) as client:
        body = {"prompt": "drain", **LONG}
        with client.stream("POST", WORKERS, json=body) as response:
            chunks = response.iter_bytes()
            raw = next(chunks)
            deleting = threading.Thread(target=serve.delete, args=("llmpack",))
            deleting.start()
            raw += b"".join(chunks)
        deleting.join(300)
    return {"status": response.status_code, "done": raw.endswith(b"data: [DONE]\n\n"),
            "deleted": not deleting.is_alive(),
            "tail": raw[-200:].decode("utf-8", "replace")}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
