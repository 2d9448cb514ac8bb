"""Fault and abuse suite on loopback against a real server process with short limits. Oracles: raw sockets (what a
hostile client sends and when the server answers or closes), the server's own /proc entries (threads, fds, RSS back
to baseline), its stderr (no traceback), and each request run alone (a request among 20 concurrent ones and a
poison one gets its solo tokens)."""

import http.client
import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from .helpers import Server

HEADER_T, BODY_T = 1.0, 1.0


@pytest.fixture(scope="module")
def server(trained_dir):
    s = Server(trained_dir, "--max-batch", "4", "--api-key", "k3y", "--header-timeout", str(HEADER_T),
               "--body-timeout", str(BODY_T), "--max-body-bytes", "200000", "--keep-alive", "1",
               "--max-request-tokens", "4000", "--max-n", "4", "--no-speculative")
    yield s
    s.stop()
    assert not any("Traceback" in line for line in s.stderr), "".join(s.stderr)


def _sock(server):
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def _read_all(sock) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


HEAD = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k3y\r\nContent-Type: application/json\r\n"


def test_slowloris_headers_are_cut_at_the_header_deadline(server):
    s = _sock(server)
    t0 = time.monotonic()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    closed = False
    while time.monotonic() - t0 < HEADER_T + 3:
        try:
            s.sendall(b"X-a: b\r\n")                      # a header line every 0.2 s, never the blank line
        except OSError:
            closed = True
            break
        s.settimeout(0.2)
        try:
            if s.recv(1) == b"":
                closed = True
                break
        except TimeoutError:
            pass
    assert closed and time.monotonic() - t0 < HEADER_T + 2
    idle = _sock(server)                                     # connects and sends nothing: also closed
    t0 = time.monotonic()
    assert _read_all(idle) == b"" and time.monotonic() - t0 < HEADER_T + 2


def test_lying_content_length_gets_408_within_the_body_deadline(server):
    s = _sock(server)
    t0 = time.monotonic()
    s.sendall((HEAD + "Content-Length: 100\r\n\r\n").encode() + b'{"prompt": ')
    reply = _read_all(s).decode()
    assert reply.startswith("HTTP/1.1 408") and "Content-Length" in reply and time.monotonic() - t0 < BODY_T + 2


@pytest.mark.parametrize("headers,body,status,match", [
    ("Content-Length: 1000000000000\r\n", b"", 413, "at most 200000"),
    ("Transfer-Encoding: chunked\r\n", b"".join(b"%x\r\n%s\r\n" % (50000, b"x" * 50000) for _ in range(5)) + b"0\r\n\r\n",
     413, "exceeds 200000"),
    ("Content-Length: 100001\r\n", b"[" * 100001, 400, "nested too deeply"),
    ("Content-Length: abc\r\n", b"", 400, ""),
])
def test_oversized_deep_and_bad_bodies_get_a_clear_answer(server, headers, body, status, match):
    s = _sock(server)
    s.sendall((HEAD + headers + "\r\n").encode() + body)
    reply = _read_all(s).decode()
    assert reply.startswith(f"HTTP/1.1 {status}") and match in reply, reply[:300]


def test_auth_is_checked_before_the_body_in_constant_time(server):
    s = _sock(server)
    t0 = time.monotonic()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k3x\r\nContent-Length: 150000\r\n\r\n")
    reply = _read_all(s).decode()                            # answered without waiting for a single body byte
    assert reply.startswith("HTTP/1.1 401") and time.monotonic() - t0 < BODY_T


def test_chunked_body_is_read_and_the_connection_stays_in_sync(server):
    body = json.dumps({"prompt": "Q: 1+1=?\n<think>", "max_tokens": 3, "temperature": 0}).encode()
    s = _sock(server)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7))
    req = (HEAD + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunks + b"0\r\n\r\n"
    s.sendall(req + req)                                     # two pipelined requests on one keep-alive connection
    s.settimeout(30)
    data = b""
    while data.count(b'"text_completion"') < 2:
        data += s.recv(65536)
    assert data.count(b"HTTP/1.1 200") == 2


def _chat(server, seed, **kw):
    return server.raw("POST", "/v1/completions", {"prompt": f"Q: {seed}+2=?\n<think>", "max_tokens": 12,
                                                  "temperature": 0, **kw})


def test_poison_request_among_20_concurrent_ones_leaves_them_their_solo_tokens(server):
    solo = {i: json.loads(_chat(server, i)[1])["choices"][0]["text"] for i in range(20)}
    poison = [{"prompt": [1], "max_tokens": 50, "temperature": 1, "repetition_penalty": 1e-300},
              {"prompt": [1], "max_tokens": 50, "temperature": 1e-300},
              {"prompt": [1], "max_tokens": 5, "seed": 10 ** 30}]
    with ThreadPoolExecutor(23) as pool:
        normal = [pool.submit(_chat, server, i) for i in range(20)]
        bad = [pool.submit(server.raw, "POST", "/v1/completions", p) for p in poison]
        for i, f in enumerate(normal):
            status, text = f.result()
            assert status == 200 and json.loads(text)["choices"][0]["text"] == solo[i]
        for f, field in zip(bad, ("repetition_penalty", "temperature", "seed")):
            status, text = f.result()
            assert status == 400 and field in json.loads(text)["error"]["message"]


def test_work_limits_are_400s(server):
    for body, match in [({"prompt": "a", "n": 5}, "'n' must be <= 4"),
                        ({"prompt": "a", "n": 4, "max_tokens": 1001}, "asks for up to 4004 output tokens"),
                        ({"prompt": ["a", "b"], "max_tokens": 2001}, "max-request-tokens")]:
        status, text = server.raw("POST", "/v1/completions", body)
        assert status == 400 and match in json.loads(text)["error"]["message"], text


def test_500_concurrent_connections_then_resources_back_to_baseline(server):
    server.raw("GET", "/health")
    time.sleep(1.5)
    base_threads, base_fds, base_rss = server.threads(), server.fds(), server.rss_mb()

    def health(_):
        c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
        c.request("GET", "/health")
        status = c.getresponse().status
        c.close()
        return status

    with ThreadPoolExecutor(100) as pool:
        socks = [_sock(server) for _ in range(300)]           # 300 idle sockets held open meanwhile
        statuses = list(pool.map(health, range(500)))
    assert statuses.count(200) == 500
    assert server.threads() <= base_threads + 1              # no thread per connection
    for s in socks:
        s.close()
    deadline = time.monotonic() + HEADER_T + 5
    while server.fds() > base_fds + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.fds() <= base_fds + 2 and server.threads() <= base_threads + 1
    assert server.rss_mb() < base_rss + 50


def test_abandoned_non_streaming_requests_are_cancelled(server):
    before = server.metric("nemotron3_requests_cancelled_total")
    body = json.dumps({"prompt": "The ", "max_tokens": 1000, "n": 4, "temperature": 0, "ignore_eos": True}).encode()   # runs to length
    for _ in range(4):
        s = _sock(server)
        s.sendall((HEAD + f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        time.sleep(0.3)
        s.close()                                            # the client gives up before the answer
    deadline = time.monotonic() + 10
    while server.metric("nemotron3_requests_cancelled_total") < before + 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.metric("nemotron3_requests_cancelled_total") >= before + 4
    assert server.metric("nemotron3_running_requests") == 0
    t0 = time.monotonic()
    assert _chat(server, 1)[0] == 200 and time.monotonic() - t0 < 5


def test_queue_time_limit_answers_503(trained_dir):
    s = Server(trained_dir, "--max-batch", "1", "--max-queue-time", "0.5", "--no-speculative")
    try:
        results = []
        long = threading.Thread(target=lambda: results.append(s.raw("POST", "/v1/completions",
                                                                     {"prompt": "The ", "max_tokens": 1000, "temperature": 0,
                                                                      "ignore_eos": True})))
        long.start()
        while s.metric("nemotron3_running_requests") < 1:     # the long request holds the only slot
            time.sleep(0.05)
        status, text = s.raw("POST", "/v1/completions", {"prompt": "a", "max_tokens": 2})
        long.join()
        assert status == 503 and "max-queue-time" in json.loads(text)["error"]["message"]
        assert results[0][0] == 200
    finally:
        s.stop()


def test_sigterm_drains_in_flight_requests_and_exits_cleanly(trained_dir):
    s = Server(trained_dir, "--max-batch", "2", "--no-speculative", "--shutdown-timeout", "20")
    results = []
    t = threading.Thread(target=lambda: results.append(s.raw("POST", "/v1/completions",
                                                             {"prompt": "The ", "max_tokens": 60,
                                                              "temperature": 0})))
    t.start()
    time.sleep(0.5)
    s.proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert s.proc.wait(30) in (0, -signal.SIGTERM)          # uvicorn re-raises the signal once drained
    assert results and results[0][0] == 200 and json.loads(results[0][1])["usage"]["completion_tokens"] == 60
    time.sleep(0.2)
    assert not any("Traceback" in line for line in s.stderr), "".join(s.stderr)
