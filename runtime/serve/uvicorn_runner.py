"""Serving stage 5: the process — uvicorn on one socket, one log line when up, exit 0 after SIGTERM/SIGINT.

uvicorn already stops accepting, drains connections for `timeout_graceful_shutdown` and then
cancels what is left, cutting responses mid-body; this subclass starts the app's own drain first
(which ends in-flight generations with a final event before that), logs where it listens and does
not re-raise the signal afterwards (uvicorn does, which would end the process by the signal instead
of exit status 0).
Connections get one deadline uvicorn lacks: for the client's next bytes (see ClientDeadline), on
uvicorn's httptools protocol when httptools is installed (the serve extra pins it), else on its h11 one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Awaitable, Callable

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from llmpack.runtime.errors import ServeError
from llmpack.runtime.serve.settings import ConnectionLimits

try:  # httptools parses in C and writes chunk framing itself: the event loop's CPU per streamed token
    # is 0.19 ms with it vs 0.23 ms with h11 (bench/results/loop-cpu-2026-12-05-*.md), taken from the cores
    # a decode step runs on.
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:
    HttpToolsProtocol = None

log = logging.getLogger("llmpack.server")


class ClientDeadline:
    """A uvicorn HTTP protocol plus one deadline: whenever the server waits on the client, not the app.

    uvicorn times out only a keep-alive connection that stays silent after a response: a client
    that connects and sends nothing, trickles its headers a byte at a time, or trickles the rest of
    a body the server already answered (404, 413…) would hold its socket (and a place under
    limit_concurrency) for ever. While a request is being served the app's own body deadline
    applies (http_edge.read_json), where it can be answered with a 408.
    """

    head_timeout_s = ConnectionLimits.head_timeout_s
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._waiting_on_client():  # a whole request head arrived: the app has it now
            self._disarm_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request head, or the rest of an unread body (uvicorn drains and drops it, so the
        # connection stays usable for a client that sends it at once), within the same deadline.
        if self._waiting_on_client() and not self.transport.is_closing():
            self._arm_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_deadline()
        super().connection_lost(exc)

    def _waiting_on_client(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_deadline(self) -> None:
        self._disarm_deadline()
        self._deadline = self.loop.call_later(self.head_timeout_s, self._timed_out)

    def _disarm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        # No request to answer (h11 cannot send a 408 before one): the connection is just closed.
        if self._waiting_on_client() and not self.transport.is_closing():
            self.transport.close()


class GuardedH11Protocol(ClientDeadline, H11Protocol):
    pass


def guarded_protocol(head_timeout_s: float) -> type:
    """The protocol class uvicorn serves with: httptools' when installed, else h11's, with the deadline."""
    base = GuardedH11Protocol if HttpToolsProtocol is None else \
        type("GuardedHttpToolsProtocol", (ClientDeadline, HttpToolsProtocol), {})
    return type(base.__name__, (base,), {"head_timeout_s": head_timeout_s})


# How long past --shutdown-timeout uvicorn waits before it cuts what is left: the final events of the
# requests the app cancelled at the timeout are on their way; only a client that reads nothing is cut.
FINAL_EVENTS_GRACE_S = 5.0


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, description: str,
                 drain: Callable[[], Awaitable[None]] | None = None):
        super().__init__(config)
        self.description = description
        self.drain = drain
        self._draining: asyncio.Future | None = None

    async def shutdown(self, sockets=None) -> None:
        if self.drain is not None:
            # Runs beside uvicorn's own wait for connections: the app finishes or cancels its
            # in-flight work before that wait's deadline, so every client gets a final event.
            self._draining = asyncio.ensure_future(self.drain())
        await super().shutdown(sockets)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                log.info("serving %s on http://%s:%d", self.description, shown, port)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound now: `llm-serve run` takes its port before loading a model for
    minutes, so a port in use is one `error:` line at once, not uvicorn's words after the load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        shown = f"[{host}]" if ":" in host else host
        raise ServeError(f"cannot listen on {shown}:{port}: {exc.strerror or exc}; stop what uses it or "
                         "choose another --port / --host") from exc
    sock.set_inheritable(True)
    return sock


def serve(app, host: str, port: int, description: str, shutdown_timeout_s: float, verbose: bool,
          limits: ConnectionLimits = ConnectionLimits(), drain: Callable[[], Awaitable[None]] | None = None,
          sock: socket.socket | None = None) -> None:
    """Run until a signal; returns normally after a graceful shutdown, which starts `drain`. Listens on
    `sock` when given (already bound by listen_socket), else binds host:port itself."""
    if not verbose:
        # One line of our own says where the server listens; uvicorn's start-up chatter is debug noise.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    protocol = guarded_protocol(limits.head_timeout_s)
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, http=protocol,
                            timeout_keep_alive=limits.keep_alive_s, limit_concurrency=limits.limit_concurrency,
                            timeout_graceful_shutdown=shutdown_timeout_s + (FINAL_EVENTS_GRACE_S if drain else 0),
                            lifespan="on")
    GracefulServer(config, description, drain).run(sockets=[sock or listen_socket(host, port)])
