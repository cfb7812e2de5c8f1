"""Serve wing, cluster part: the Ray Serve application — engine replicas behind one body-reading ingress.

`LlmReplica` loads the artifact once and runs the app `llm-serve run` serves (server.create_app) over the
same engine; `Ingress` reads each request's body and streams a replica's answer back (tunnel.py says why the
body must be read before routing). Ray is imported here and in router.py only.

    serve run llmpack.runtime.serve.cluster.ray_app:build artifact=artifacts/stories260k replicas=2
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, fields, replace
from pathlib import Path

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError

from llmpack.runtime.engine import Engine, EngineOptions
from llmpack.runtime.errors import InvalidRequest, ServeError
from llmpack.runtime.serve.cluster.settings import PROBE_HEADROOM, ClusterSettings
from llmpack.runtime.serve.cluster.tunnel import Forwarded, Forwarder, replay
from llmpack.runtime.serve.protocol import ENGINE_LIMITS
from llmpack.runtime.serve.server import create_app
from llmpack.runtime.serve.settings import ServerSettings

ROUTER = "llmpack.runtime.serve.cluster.router:PrefixAffinityRouter"


class LlmReplica:
    """One engine and its app; Ray routes to it only once the warm-up generation has run (constructor)."""

    async def __init__(self, artifact: str, engine: dict, server: dict):
        options = EngineOptions(**{**engine, **ENGINE_LIMITS})
        loaded = await asyncio.to_thread(Engine.load, Path(artifact), options)
        settings = ServerSettings(**server)
        # The warm-up runs here, awaited, instead of in the app's lifespan: a replica that cannot answer
        # fails its start (Ray retries it) rather than joining the pool not ready.
        self.app = create_app(loaded, replace(settings, warmup=False))
        self.state = self.app.state.llm
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        if settings.warmup:
            self.state.ready = False
            await self.state.warm_up()
            if not self.state.ready:
                raise ServeError(f"the replica is not ready: {self.state.not_ready_reason}")
        self.name = serve.get_replica_context().replica_id.unique_id

    async def handle(self, forwarded: Forwarded):
        """The app's ASGI messages for one forwarded request (a streaming call)."""
        async for message in replay(self.app, forwarded.scope, forwarded.body, self.name):
            yield message

    def check_health(self) -> None:
        """Ray's health check is the engine's readiness: a replica that stopped being ready is replaced."""
        if not self.state.ready:
            raise ServeError(f"not ready: {self.state.not_ready_reason}")

    async def __del__(self):
        # Ray stops routing here and waits graceful_shutdown_timeout_s for requests in flight; what is left
        # is cancelled as `llm-serve run` cancels at its shutdown timeout (503 / the stream's error event).
        if not hasattr(self, "_lifespan"):  # the constructor failed before the app started: nothing to drain
            return
        await self.state.drain()
        await self._lifespan.__aexit__(None, None, None)


class Ingress:
    """The HTTP entry: reads a body, picks nothing itself; the replica handle's router picks the replica."""

    def __init__(self, replicas, server: dict):
        settings = ServerSettings(**server)
        stream = replicas.options(stream=True, method_name="handle")
        self.forwarder = Forwarder(stream.remote, (RayActorError, ActorUnavailableError),
                                   (BackPressureError,), settings.max_body_bytes, settings.body_timeout_s,
                                   settings.retry_after_s)

    def __serve_build_asgi_app__(self):
        # Ray Serve's late-bound ingress: the ASGI app needs the replica handle, which only the
        # constructor receives.
        return self.forwarder


def replica_deployment(cluster: ClusterSettings, server: ServerSettings, max_batch: int):
    """LlmReplica with Ray's knobs from the engine's batch and queue sizes and the cluster settings."""
    capacity = max_batch + server.max_queue
    options = {
        "max_ongoing_requests": capacity + PROBE_HEADROOM,
        # Ray's own queue at the ingress, used only while every replica is at max_ongoing_requests.
        "max_queued_requests": cluster.max_queued_requests if cluster.max_queued_requests is not None
        else max(server.max_queue, 1),
        "graceful_shutdown_timeout_s": server.shutdown_timeout_s,
        "health_check_period_s": cluster.health_check_period_s,
        "health_check_timeout_s": cluster.health_check_timeout_s,
        "ray_actor_options": {"num_cpus": cluster.num_cpus, "num_gpus": cluster.num_gpus},
    }
    autoscaling = cluster.autoscaling(max_batch)
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = cluster.replicas
    # Affinity yields to power-of-two choices once replicas' ongoing requests differ by more than the
    # threshold: a shared prefix must not pile a burst onto one replica while another idles.
    router = {"capacity": capacity, "affinity": cluster.prefix_affinity}
    if cluster.prefix_affinity:
        router["imbalanced_threshold"] = cluster.imbalance_threshold if cluster.imbalance_threshold is not None \
            else max_batch
    options["request_router_config"] = RequestRouterConfig(request_router_class=ROUTER, request_router_kwargs=router)
    return serve.deployment(LlmReplica, name="LlmReplica", **options)


def application(artifact: str | Path, engine: EngineOptions, server: ServerSettings, cluster: ClusterSettings):
    """The bound Ray Serve application: the ingress over the replicas."""
    engine_args = {f.name: getattr(engine, f.name) for f in fields(EngineOptions)
                   if f.name not in ENGINE_LIMITS}
    replicas = replica_deployment(cluster, server, engine.max_batch).bind(
        str(Path(artifact).expanduser().resolve()), engine_args, asdict(server))
    ingress = serve.deployment(serve.ingress()(Ingress), name="Ingress", num_replicas=1,
                               max_ongoing_requests=100_000, ray_actor_options={"num_cpus": 0},
                               graceful_shutdown_timeout_s=server.shutdown_timeout_s)
    return ingress.bind(replicas, asdict(server))


def build(args: dict):
    """App builder for `serve run …:build artifact=PATH [replicas=N max_batch=… prefix_affinity=false …]`
    and `serve deploy` configs (deploy/cluster.yaml). Every key is a field of EngineOptions, ServerSettings or
    ClusterSettings; values may be strings, as `serve run` passes them."""
    args = dict(args)
    if "artifact" not in args:
        raise InvalidRequest("the app builder needs artifact=PATH")
    artifact = args.pop("artifact")
    parts = [_pick(cls, args) for cls in (EngineOptions, ServerSettings, ClusterSettings)]
    if args:
        raise InvalidRequest(f"unknown app argument(s): {', '.join(sorted(args))}")
    return application(artifact, *parts)


def _pick(cls, args: dict):
    """The fields of `cls` found in args (removed from it), typed like the field's default."""
    chosen = {}
    for field in fields(cls):
        if field.name in args:
            chosen[field.name] = _typed(args.pop(field.name), field.default)
    return cls(**chosen)


def _typed(value, default):
    if not isinstance(value, str) or isinstance(default, str):
        return value
    if isinstance(default, bool) or value.lower() in ("true", "false"):
        return value.lower() in ("1", "true", "yes", "on")
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
