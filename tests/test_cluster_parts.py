"""Scale-out parts that need no running Ray: the ingress's failure handling, prompt extraction, the app
builder's arguments and the shipped `serve deploy` config (tests/test_cluster.py runs the real cluster)."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import REPO

from llmpack.runtime.errors import InvalidRequest
from llmpack.runtime.serve.cluster.tunnel import Forwarded, Forwarder, prompt_text

ray = pytest.importorskip("ray", reason="the `cluster` extra (ray[serve]) is not installed")


class Lost(Exception):
    pass


class Busy(Exception):
    pass


def _serve(calls, body=b'{"prompt": "hi", "stream": true}', path="/ai/run/x"):
    """Run the Forwarder on one request whose replica calls are `calls` (each: messages, then maybe raise)."""
    attempts, sent = [], []

    async def call(forwarded: Forwarded):
        attempts.append(forwarded)
        messages, failure = calls[len(attempts) - 1]
        for message in messages:
            yield message
        if failure is not None:
            raise failure

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    forwarder = Forwarder(call, (Lost,), (Busy,), max_body_bytes=1024, body_timeout_s=5, retry_after_s=1)
    scope = {"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""}
    asyncio.run(forwarder(scope, receive, send))
    return attempts, sent


START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}


def test_a_replica_lost_before_answering_is_retried_once_on_another():
    ok = [START, {"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False}]
    attempts, sent = _serve([([], Lost()), (ok, None)])
    assert len(attempts) == 2 and attempts[0] == attempts[1]
    assert sent == ok


def test_a_replica_lost_twice_before_answering_gives_a_503():
    attempts, sent = _serve([([], Lost()), ([], Lost())], path="/v1/chat/completions")
    assert len(attempts) == 2 and sent[0]["status"] == 503
    assert json.loads(sent[1]["body"])["error"]["code"] == "3040"


def test_a_replica_lost_mid_stream_ends_it_with_the_error_event_and_no_retry():
    first = {"type": "http.response.body", "body": b'data: {"response":"a"}\n\n', "more_body": True}
    attempts, sent = _serve([([START, first], Lost())])
    assert len(attempts) == 1 and sent[:2] == [START, first]
    last = sent[2]
    assert last["more_body"] is False and last["body"].startswith(b"data: {") and b"[DONE]" not in last["body"]
    assert json.loads(last["body"][len(b"data: "):])["errors"][0]["code"] == 3040


def test_a_full_ingress_queue_answers_the_servers_429():
    _, sent = _serve([([], Busy())])
    assert sent[0]["status"] == 429 and (b"retry-after", b"1") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["errors"][0]["code"] == 3040


def test_the_router_sees_each_family_s_prompt_text_in_order():
    assert prompt_text(b'{"prompt": "Once upon"}') == "Once upon"
    chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]}
    longer = {"messages": chat["messages"] + [{"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]}
    assert prompt_text(json.dumps(longer).encode()).startswith(prompt_text(json.dumps(chat).encode()))
    assert prompt_text(b"") == prompt_text(b"not json") == prompt_text(b'{"text": "hi"}') == ""


def _replicas_of(app):
    return app._bound_deployment.init_args[0]._bound_deployment  # the ingress is bound over the replicas


def test_the_app_builder_takes_strings_as_serve_run_passes_them(demo_artifact):
    from llmpack.runtime.serve.cluster import ray_app

    fixed = _replicas_of(ray_app.build({"artifact": str(demo_artifact), "replicas": "3", "max_batch": "2",
                                        "prefix_affinity": "false", "max_queue": "5"}))
    assert (fixed.num_replicas, fixed.max_ongoing_requests, fixed.max_queued_requests) == (3, 2 + 5 + 4, 5)
    assert fixed.init_args[1]["max_batch"] == 2 and fixed.init_args[2]["max_queue"] == 5
    router = fixed._deployment_config.request_router_config
    assert router.request_router_kwargs == {"capacity": 2 + 5, "affinity": False}
    scaled = _replicas_of(ray_app.build({"artifact": str(demo_artifact), "min_replicas": "1", "max_replicas": "4"}))
    autoscaling = scaled._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (1, 4, 8)
    router = scaled._deployment_config.request_router_config
    assert router.request_router_class == ray_app.ROUTER
    assert router.request_router_kwargs == {"capacity": 8 + 64, "affinity": True, "imbalanced_threshold": 8}
    with pytest.raises(InvalidRequest, match="unknown app argument"):
        ray_app.build({"artifact": str(demo_artifact), "replica": "3"})


def test_the_shipped_serve_deploy_config_is_valid():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "deploy" / "cluster.yaml").read_text()))
    assert config.applications[0].import_path == "llmpack.runtime.serve.cluster.ray_app:build"


def test_the_socket_check_flags_any_address_but_loopback():
    from cluster_workload import _address, off_loopback

    assert _address("0100007F:1F90") == "127.0.0.1:8080"
    assert _address("00000000000000000000000001000000:0050") == "::1:80"
    fine = [{"local": "127.0.0.1:6379", "remote": "127.0.0.1:40000"}, {"local": "0.0.0.0:8000", "remote": "0.0.0.0:0"},
            {"local": "::1:80", "remote": ":::0"}, {"local": "::ffff:127.0.0.1:80", "remote": ":::0"}]
    assert off_loopback(fine) == []
    leaks = [{"local": "10.0.0.5:6379", "remote": "0.0.0.0:0"}, {"local": "127.0.0.1:5000", "remote": "8.8.8.8:53"}]
    assert off_loopback(leaks) == leaks
