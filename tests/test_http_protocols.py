"""The connection deadline on both uvicorn protocols the server may run (httptools when installed, else h11).

tests/test_hostile_clients.py drives `llm-serve run`, which takes httptools from the serve extra; here the
same deadline is checked on each protocol class directly, under a bare uvicorn server in a thread.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from llmpack.runtime.serve import uvicorn_runner
from llmpack.runtime.serve.uvicorn_runner import ClientDeadline, guarded_protocol

HEAD_TIMEOUT = 0.5


async def hello_app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    body = b"hello"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(params=["httptools", "h11"])
def protocol(request, monkeypatch):
    if request.param == "httptools":
        if uvicorn_runner.HttpToolsProtocol is None:
            pytest.skip("httptools is not installed (the serve extra pins it)")
        return guarded_protocol(HEAD_TIMEOUT)
    monkeypatch.setattr(uvicorn_runner, "HttpToolsProtocol", None)
    return guarded_protocol(HEAD_TIMEOUT)


@pytest.fixture
def port(protocol):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(hello_app, http=protocol, log_config=None, lifespan="off", timeout_keep_alive=60)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start within 30 s"
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(30)


def test_the_protocol_is_httptools_when_installed_else_h11(monkeypatch):
    chosen = guarded_protocol(7.0)
    assert issubclass(chosen, ClientDeadline) and chosen.head_timeout_s == 7.0
    if uvicorn_runner.HttpToolsProtocol is not None:
        assert issubclass(chosen, uvicorn_runner.HttpToolsProtocol)
    monkeypatch.setattr(uvicorn_runner, "HttpToolsProtocol", None)
    assert issubclass(guarded_protocol(7.0), H11Protocol)


def closed_by_server(sock: socket.socket, within_s: float = 30.0) -> bool:
    """Whether the server closes the connection (EOF) before `within_s`: generous, the deadline is 0.5 s."""
    sock.settimeout(within_s)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False


def test_a_silent_connection_is_closed_at_the_head_deadline(port):
    with socket.create_connection(("127.0.0.1", port)) as sock:
        assert closed_by_server(sock)


def test_a_half_sent_head_is_closed_at_the_head_deadline(port):
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        assert closed_by_server(sock)


def test_requests_are_answered_and_the_idle_connection_then_closed(port):
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for _ in range(2):  # keep-alive: the deadline is disarmed while a request is served, re-armed after
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            sock.settimeout(30)
            reply = b""
            while not reply.endswith(b"hello"):
                chunk = sock.recv(4096)
                assert chunk, "the server closed before answering"
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200")
        assert closed_by_server(sock)  # keep-alive is 60 s: only the head deadline closes it this soon
