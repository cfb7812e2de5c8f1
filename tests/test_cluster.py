"""Scale-out on Ray Serve: a two-node local Ray cluster, two replicas of the demo artifact, against one
`llm-serve run`.

Ray binds to the machine's other addresses unless it runs where only loopback exists, so the cluster runs in
tests/cluster_driver.py inside a loopback-only network namespace (../shared/tools/loopback-netns or unshare);
it is brought up once for the module and writes what it saw, and the tests here judge it. No check depends
on timing: the killed replica is killed once it streams, the full cluster is filled by holding streams.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from cluster_workload import comparable, greedy_requests, loopback_command, off_loopback
from conftest import REPO
from serving import ServerProcess, metric, parse_sse

pytest.importorskip("ray", reason="the `cluster` extra (ray[serve]) is not installed")
# Bringing the cluster up twice (the second app is the full one) and the kill under load take ~70 s here;
# the bound leaves room for a machine several times slower.
pytestmark = pytest.mark.timeout(600)
DRIVER_TIMEOUT_S = 540


@pytest.fixture(scope="module")
def cluster_run(demo_artifact, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("cluster")
    out, log = folder / "report.json", folder / "driver.log"
    command, why = loopback_command([sys.executable, str(REPO / "tests" / "cluster_driver.py"), str(demo_artifact),
                                     str(out)], REPO)
    if command is None:
        pytest.skip(why)
    with open(log, "wb") as sink:
        # Its own process group: on a timeout every Ray process it started goes with it.
        driver = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        try:
            returncode = driver.wait(DRIVER_TIMEOUT_S)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
    tail = log.read_text(errors="replace")[-6000:]
    assert returncode == 0 and out.is_file(), tail
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reference(demo_artifact, tmp_path_factory) -> list[bytes]:
    """The 24 greedy requests answered by one `llm-serve run` with the replicas' batch size."""
    server = ServerProcess(demo_artifact, tmp_path_factory.mktemp("one") / "serve.log", "--max-batch", "4")
    try:
        def one(job):
            return httpx.post(server.base + job[0], json=job[1], timeout=120).content

        with ThreadPoolExecutor(24) as pool:
            return list(pool.map(one, greedy_requests()))
    finally:
        assert server.stop() == 0, server.log()


def test_ray_ran_inside_loopback_only_and_no_socket_left_it(cluster_run):
    assert cluster_run["interfaces"] == ["lo"]
    assert len(cluster_run["sockets"]) > 20  # Ray's GCS, raylets, workers and the HTTP proxy were all seen
    assert off_loopback(cluster_run["sockets"]) == []
    assert {replica["ip"] for replica in cluster_run["replica_nodes"]} == {"127.0.0.1"}


def test_two_replicas_on_two_nodes(cluster_run):
    nodes = [replica["node"] for replica in cluster_run["replica_nodes"]]
    assert len(nodes) == 2 and len(set(nodes)) == 2, cluster_run["replica_nodes"]


def test_24_concurrent_greedy_requests_match_one_llm_serve_run_byte_for_byte(cluster_run, reference):
    answers = cluster_run["greedy"]
    assert [answer["status"] for answer in answers] == [200] * 24
    for (path, _), answer, expected in zip(greedy_requests(), answers, reference):
        assert comparable(path, answer["body"].encode()) == comparable(path, expected), path
    served = [answer["replica"] for answer in answers]
    assert len(set(served)) == 2 and None not in served, served  # both replicas answered some


def test_a_shared_prefix_chat_stays_on_one_replica_and_hits_its_prefix_cache(cluster_run):
    chat = cluster_run["chat"]
    turns = chat["turns"]
    assert len({turn["replica"] for turn in turns}) == 1, turns
    assert chat["before"] is not None and chat["after"] is not None  # that replica's own /metrics
    hits = metric(chat["after"], "llmpack_prefix_cache_hits_total") - metric(chat["before"],
                                                                               "llmpack_prefix_cache_hits_total")
    reused = metric(chat["after"], "llmpack_prefix_cache_reused_tokens_total") - \
        metric(chat["before"], "llmpack_prefix_cache_reused_tokens_total")
    assert hits == 3  # turns 2-4 each started from the previous turn's sequence
    # ... and reused at least each previous turn's whole prompt, not only the template's first tokens
    assert reused >= sum(turn["usage"]["prompt_tokens"] for turn in turns[:-1])


def test_health_and_readiness_answer_through_the_cluster(cluster_run):
    assert cluster_run["probes"] == {"/health": 200, "/ready": 200, "/v1/models": 200}


def test_a_replica_killed_under_load_is_replaced_and_no_request_hangs(cluster_run):
    kill = cluster_run["kill"]
    victim = kill["victim"]
    assert victim is not None
    victim_id = victim["name"].rsplit("#", 1)[1]
    for result in kill["first"]:
        assert result["outcome"] in ("done", "ended"), result  # never a hang or a cut connection
        assert result["status"] == 200
        if result["outcome"] == "ended":  # cut by the kill: the stream's own error event, no [DONE]
            assert result["replica"] == victim_id
            events, done = parse_sse(result["tail"][result["tail"].rindex("data: "):].encode())
            assert not done and events[-1]["errors"][0]["code"] == 3040, result["tail"]
    assert any(result["outcome"] == "ended" for result in kill["first"])  # the kill did hit streams
    for result in kill["later"]:  # sent after the kill: served by the other replica, completely
        assert result["outcome"] == "done" and result["replica"] != victim_id, result
    after = kill["replicas_after"]
    assert len(after) == 2 and victim["name"] not in {r["name"] for r in after}, after
    assert any(r["answered"] for r in after if r["pid"] != victim["pid"])


def test_the_cluster_answers_429_when_every_replica_is_full(cluster_run):
    full = cluster_run["full"]
    assert sorted(full["held"].values()) == [1, 1], full["held"]  # one stream fills each replica (batch 1, queue 0)
    for answer in full["full"]:
        assert answer["status"] == 429 and answer["retry_after"] == "1", answer
        body = json.loads(answer["body"])
        assert body.get("error", {}).get("type") == "rate_limit_error" or body["errors"][0]["code"] == 3040
    assert full["again"] == 200  # the held streams' disconnects freed the replicas


def test_deleting_the_app_lets_a_stream_in_flight_finish(cluster_run):
    drain = cluster_run["drain"]
    assert drain["status"] == 200 and drain["done"], drain["tail"]  # ended with [DONE], not an error event
    assert drain["deleted"]
