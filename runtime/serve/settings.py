"""Serve wing: what an operator sets for the server — each default defined once; the CLI reads it from here.

Light on purpose (no FastAPI, no uvicorn): `llm-serve --help` and `infer` import it without the HTTP stack.
"""

from __future__ import annotations

from dataclasses import dataclass

# Where `llm-serve run` and `llm-serve cluster` listen unless told otherwise: loopback, so nothing is exposed by
# default (put --host 0.0.0.0 behind a firewall or a balancer on purpose).
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


@dataclass(frozen=True)
class ServerSettings:
    api_key: str | None = None
    max_queue: int = 64  # requests that may wait while the batch is full; more get 429
    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 30.0  # the whole body must arrive within this; a trickling client gets 408
    stream_padding: bool = False  # Workers AI's random "p" field against token-length side channels
    retry_after_s: int = 1
    shutdown_timeout_s: float = 10.0
    warmup: bool = True
    served_model_name: str | None = None  # the name /v1/models lists beside the Workers id (default: the artifact's)


@dataclass(frozen=True)
class ConnectionLimits:
    keep_alive_s: float = 5.0  # uvicorn's timeout_keep_alive: a silent keep-alive connection is closed
    head_timeout_s: float = 10.0  # request line + headers must arrive within this, from connect or last response
    limit_concurrency: int | None = None  # uvicorn's: connections + requests at once, beyond it a plain 503
