"""`llm-serve run` against slow and abusive clients over raw loopback sockets: the server keeps answering others.

A body trickled a byte a second, hundreds of idle or half-sent connections, a stream nobody reads,
a keep-alive connection left silent: each is cut by its own configurable deadline (--body-timeout,
--head-timeout, --keep-alive-timeout), and meanwhile ordinary requests are answered at full speed.
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from serving import AUTH, RUN, SERVER_API_KEY, ServerProcess, metric, wait_until

HEAD_TIMEOUT, BODY_TIMEOUT, KEEP_ALIVE = 2.0, 3.0, 1.0
QUICK = {"prompt": "Hello", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def guarded_server(demo_artifact, tmp_path_factory):
    server = ServerProcess(demo_artifact, tmp_path_factory.mktemp("guarded") / "serve.log",
                           "--head-timeout", str(HEAD_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT),
                           "--keep-alive-timeout", str(KEEP_ALIVE), env={"LLMPACK_API_KEY": SERVER_API_KEY})
    yield server
    assert server.stop() == 0, server.log()
    assert "Traceback" not in server.log(), server.log()[-3000:]


def request_head(path: str, length: int | None) -> bytes:
    sized = f"Content-Length: {length}\r\n" if length is not None else ""
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {AUTH['Authorization']}\r\n"
            f"Content-Type: application/json\r\n{sized}\r\n").encode()


def connect(server: ServerProcess, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)  # before connect: sets the window
    sock.connect(("127.0.0.1", server.port))
    return sock


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length (head and body may come in separate reads)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b"\r\n\r\n"  # EOF: stop with what there is
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return head + b"\r\n\r\n" + body


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed this connection (EOF or reset), without waiting."""
    sock.setblocking(False)
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def assert_others_answered(server: ServerProcess, count: int = 5, within: float = 2.0) -> None:
    """Ordinary requests, one after another, each answered in full and promptly."""
    with httpx.Client(base_url=server.base, headers=AUTH, timeout=30) as client:
        for _ in range(count):
            started = time.monotonic()
            assert client.post(RUN, json=QUICK).status_code == 200
            assert time.monotonic() - started < within


def test_a_body_sent_one_byte_per_second_gets_408_while_others_are_answered(guarded_server):
    body = b'{"prompt": "Hello", "max_tokens": 4}'
    sock = connect(guarded_server)
    sock.sendall(request_head(RUN, len(body)))
    answer, started = bytearray(), time.monotonic()

    sock.settimeout(BODY_TIMEOUT + 5)

    def trickle():
        for byte in body:  # far slower than the body timeout allows
            if answer:
                return
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # the server closed the connection after its 408
                return
            time.sleep(1.0)

    def read_answer():
        answer.extend(read_response(sock))

    threads = [threading.Thread(target=trickle), threading.Thread(target=read_answer)]
    for thread in threads:
        thread.start()
    assert_others_answered(guarded_server)
    threads[1].join(BODY_TIMEOUT + 6)
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), bytes(answer[:200])
    assert b"connection: close" in answer.lower() and b"did not arrive within 3 s" in answer
    assert BODY_TIMEOUT <= elapsed < BODY_TIMEOUT + 3
    threads[0].join(5)
    sock.close()


def test_hundreds_of_idle_and_half_sent_connections_do_not_stop_others_and_are_closed(guarded_server):
    silent = [connect(guarded_server) for _ in range(250)]
    half_sent = [connect(guarded_server) for _ in range(50)]
    for sock in half_sent:
        sock.sendall(request_head(RUN, 20)[:30])  # the head never ends: a slowloris
    started = time.monotonic()
    assert_others_answered(guarded_server, count=10)
    # After the head timeout every one of them is closed by the server, freeing its socket.
    time.sleep(max(0.0, HEAD_TIMEOUT + 1.5 - (time.monotonic() - started)))
    still_open = [sock for sock in silent + half_sent if not closed_by_server(sock)]
    assert not still_open, f"{len(still_open)} of 300 idle connections still open"
    for sock in silent + half_sent:
        sock.close()
    assert_others_answered(guarded_server, count=2)


def test_a_client_that_never_reads_its_stream_holds_no_generation_slot(guarded_server):
    body = b'{"prompt": "Go on", "max_tokens": 1500, "temperature": 0, "stream": true}'
    sock = connect(guarded_server, receive_buffer=4096)
    sock.sendall(request_head(RUN, len(body)) + body)  # then never reads a byte
    with httpx.Client(base_url=guarded_server.base, headers=AUTH, timeout=30) as client:
        wait_until(lambda: metric(client.get("/metrics").text, "llmpack_requests_in_flight") == 1)
        assert_others_answered(guarded_server)
        # The generation runs to its end although nothing of it was read: the slot is free again.
        wait_until(lambda: metric(client.get("/metrics").text, "llmpack_requests_in_flight") == 0, timeout=30)
    sock.close()
    assert_others_answered(guarded_server, count=1)


def test_a_silent_keep_alive_connection_is_closed_after_the_keep_alive_timeout(guarded_server):
    body = b'{"prompt": "Hello", "max_tokens": 2}'
    sock = connect(guarded_server)
    sock.sendall(request_head(RUN, len(body)) + body)
    sock.settimeout(10)
    assert read_response(sock).startswith(b"HTTP/1.1 200 ")
    time.sleep(KEEP_ALIVE + 0.5)
    assert closed_by_server(sock)
    sock.close()


@pytest.mark.parametrize("sends_body", [True, False])
def test_an_answer_before_the_body_keeps_the_connection_only_for_a_client_that_sends_it(guarded_server,
                                                                                       sends_body):
    sock = connect(guarded_server)
    sock.settimeout(10)
    sock.sendall(request_head("/ai/run/no-such-model", 1000))
    assert read_response(sock).startswith(b"HTTP/1.1 404 ")  # at once, before the body
    if sends_body:  # the rest arrives promptly: drained, and the connection serves the next request
        body = b'{"prompt": "Hello", "max_tokens": 2}'
        sock.sendall(b" " * 1000 + request_head(RUN, len(body)) + body)
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
    else:  # it never comes: closed at the head timeout, not held for ever
        time.sleep(HEAD_TIMEOUT + 0.5)
        assert closed_by_server(sock)
    sock.close()
