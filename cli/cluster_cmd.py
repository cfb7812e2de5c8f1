"""CLI edge of the runtime: `llm-serve cluster` — one artifact on N Ray Serve replicas (the `cluster` extra)."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import click

from llmpack.cli.common import defaults_of, setup_logging, translate_errors
from llmpack.cli.serve_cli import ENGINE, SERVER, chosen_engine_options, engine_options
from llmpack.runtime.errors import ServeError
from llmpack.runtime.serve.cluster.settings import ClusterSettings
from llmpack.runtime.serve.settings import DEFAULT_HOST, DEFAULT_PORT, ServerSettings

CLUSTER = defaults_of(ClusterSettings)
log = logging.getLogger("llmpack.cluster")


def cluster_options(f):
    """Ray Serve's knobs (docs/cluster.md says what each does)."""
    count = click.IntRange(min=1)
    f = click.option("--replicas", type=count, default=CLUSTER.replicas, show_default=True,
                     help="Engine replicas (with --min/--max-replicas: the initial count).")(f)
    f = click.option("--min-replicas", type=click.IntRange(min=0), default=None,
                     help="Autoscale on ongoing requests between --min-replicas and --max-replicas.")(f)
    f = click.option("--max-replicas", type=count, default=None)(f)
    f = click.option("--target-ongoing-requests", type=click.FloatRange(min=0.1), default=None,
                     help="Ongoing requests per replica the autoscaler aims for (default: --max-batch).")(f)
    f = click.option("--prefix-affinity/--no-prefix-affinity", default=CLUSTER.prefix_affinity, show_default=True,
                     help="Route a prompt to the replica that served its prefix (Ray's PrefixCacheAffinityRouter); "
                          "off: Ray's power-of-two choices.")(f)
    f = click.option("--imbalance-threshold", type=click.IntRange(min=0), default=None,
                     help="Ongoing-request gap between replicas beyond which affinity yields to load "
                          "(default: --max-batch).")(f)
    f = click.option("--num-cpus", type=click.FloatRange(min=0), default=CLUSTER.num_cpus, show_default=True,
                     help="Ray CPUs each replica reserves.")(f)
    f = click.option("--num-gpus", type=click.FloatRange(min=0), default=CLUSTER.num_gpus, show_default=True,
                     help="Ray GPUs each replica reserves (1 for TensorRT / CUDA backends).")(f)
    f = click.option("--proxy-location", type=click.Choice(["HeadOnly", "EveryNode"]),
                     default=CLUSTER.proxy_location, show_default=True,
                     help="Where Ray Serve listens for HTTP: the head only, or every node (behind your balancer).")(f)
    return f


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--address", default=None, help="A running Ray cluster (`ray start --head` printed it); "
              "default: start a one-machine Ray here.")
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address Ray Serve's HTTP proxy listens on.")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True)
@click.option("--api-key", envvar="LLMPACK_API_KEY", default=None, help="As for `llm-serve run`.")
@click.option("--max-batch", type=click.IntRange(1, 256), default=ENGINE.max_batch, show_default=True,
              help="Per replica: requests decoded together.")
@click.option("--max-queue", type=click.IntRange(min=0), default=SERVER.max_queue, show_default=True,
              help="Per replica: requests that may wait for a batch slot; beyond them, on every replica, 429.")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=SERVER.shutdown_timeout_s,
              show_default=True, help="Seconds a stopping replica's requests get to finish.")
@click.option("--served-model-name", default=None)
@cluster_options
@engine_options
@translate_errors
def cluster(artifact, address, host, port, api_key, max_batch, max_queue, shutdown_timeout, served_model_name,
            **knobs):
    """Serve ARTIFACT from Ray Serve replicas: the routes of `llm-serve run`, prefix-cache affinity, restarts."""
    setup_logging(logging.getLogger().isEnabledFor(logging.DEBUG), timestamps=True)
    try:
        import ray
        from ray import serve

        from llmpack.runtime.serve.cluster.ray_app import application
    except ImportError as exc:
        raise ServeError(f"llm-serve cluster needs the `cluster` extra (pip install 'llmpack[cluster]'): {exc}") \
            from exc
    server = ServerSettings(api_key=api_key or None, max_queue=max_queue, shutdown_timeout_s=shutdown_timeout,
                            served_model_name=served_model_name)
    settings = ClusterSettings(**knobs)
    app = application(artifact, chosen_engine_options(max_batch), server, settings)
    ray.init(address=address, include_dashboard=False)
    try:
        serve.start(http_options={"host": host, "port": port}, proxy_location=settings.proxy_location)
        serve.run(app, name="llmpack", route_prefix="/")
        log.info("serving %s on http://%s:%d from %s", artifact, host, port,
                 f"{settings.replicas} replicas" if settings.autoscaling(max_batch) is None else "autoscaled replicas")
        # Set after ray.init, whose core worker installs a SIGTERM handler that aborts the process.
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
        log.info("shutting down: replicas drain for up to %g s", shutdown_timeout)
        serve.delete("llmpack")
    finally:
        serve.shutdown()
        ray.shutdown()
