"""Serving stage 5: the process — uvicorn on one socket, one log line when up, exit 0 after SIGTERM/SIGINT.

uvicorn already stops accepting, drains connections for `timeout_graceful_shutdown` and then
cancels what is left; this subclass only logs where it listens and does not re-raise the signal
afterwards (uvicorn does, which would end the process by the signal instead of exit status 0).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

import uvicorn

log = logging.getLogger("llmpack.server")


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, description: str):
        super().__init__(config)
        self.description = description

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


def serve(app, host: str, port: int, description: str, shutdown_timeout_s: float, verbose: bool) -> None:
    """Run until a signal; returns normally after a graceful shutdown."""
    if not verbose:
        # One line of our own says where the server listens; uvicorn's start-up chatter is debug noise.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=verbose,
                            timeout_graceful_shutdown=shutdown_timeout_s, lifespan="on")
    GracefulServer(config, description).run()
