"""A real `nemotron3 serve` process on loopback, driven by the official openai client and by raw HTTP: chat,
streaming, reasoning separation, budget, stop strings, logprobs, completions, continuous batching, cancellation,
back-pressure, auth, and a burst of malformed requests after which the server still serves."""

import http.client
import json
import re
import threading
import time

import openai
import pytest

from .helpers import Server


@pytest.fixture(scope="module")
def server(trained_dir):
    s = Server(trained_dir, "--max-batch", "4")
    yield s
    s.stop()


Q = [{"role": "user", "content": "3+4=?"}]


def test_chat_reasoning_stream_and_usage(server):
    c = server.client()
    r = c.chat.completions.create(model="demo", messages=Q, max_tokens=40, temperature=0)
    msg = r.choices[0].message
    reasoning = msg.model_extra.get("reasoning_content")
    assert reasoning is not None and "</think>" not in msg.content and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(c.chat.completions.create(model="demo", messages=Q, max_tokens=40, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    thought = "".join((ch.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for ch in chunks
                      if ch.choices)
    assert content.strip() == msg.content and thought.strip() == reasoning
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    off = c.chat.completions.create(model="demo", messages=Q, max_tokens=20, temperature=0,
                                    extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off.choices[0].message.model_extra.get("reasoning_content") is None
    cut = c.chat.completions.create(model="demo", messages=Q, max_tokens=40, temperature=0,
                                    extra_body={"max_thinking_tokens": 0})
    assert cut.choices[0].message.model_extra["reasoning_content"] == "."   # NVIDIA's ".\n</think>\n\n" forced


def test_sampling_options_stop_n_logprobs_and_completions(server):
    c = server.client()
    base = c.chat.completions.create(model="demo", messages=Q, max_tokens=30, temperature=0,
                                     extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    text = base.choices[0].message.content
    stop = text[1:]
    r = c.chat.completions.create(model="demo", messages=Q, max_tokens=30, temperature=0, stop=[stop],
                                  extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == text[:text.index(stop)].strip()
    r = c.chat.completions.create(model="demo", messages=Q, max_tokens=8, temperature=1.0, n=2, seed=3,
                                  logprobs=True, top_logprobs=2)
    assert len(r.choices) == 2 and len(r.choices[0].logprobs.content[0].top_logprobs) == 2
    again = c.chat.completions.create(model="demo", messages=Q, max_tokens=8, temperature=1.0, n=2, seed=3)
    assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in r.choices]
    comp = c.completions.create(model="demo", prompt="Q: 2+2=?\n<think>", max_tokens=20, temperature=0)
    assert comp.choices[0].text and comp.usage.completion_tokens > 0
    assert [m.id for m in c.models.list().data] and server.raw("GET", "/health")[0] == 200
    status, metrics = server.raw("GET", "/metrics")
    assert status == 200 and "nemotron3_completion_tokens_total" in metrics and "nemotron3_spec_acceptance" in metrics


def test_continuous_batching_and_cancellation(server):
    c = server.client()
    done = {}

    started = threading.Event()

    def long_request():        # streamed, so the short one is sent once this one is decoding, however fast that is
        t0 = time.perf_counter()
        for _ in c.completions.create(model="demo", prompt="The ", max_tokens=2000, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True}):
            started.set()
        done["long"] = time.perf_counter() - t0

    t = threading.Thread(target=long_request)
    t.start()
    assert started.wait(60), "the long request produced no token"
    t0 = time.perf_counter()
    c.completions.create(model="demo", prompt="Q: 1+1=?\n<think>", max_tokens=5, temperature=0)
    short = time.perf_counter() - t0
    assert "long" not in done, "the short request waited for the long one"       # joined the running batch
    t.join()
    assert short < done["long"]
    # a client that goes away frees its slot
    before = int(re.search(r"cancelled_total (\d+)", server.raw("GET", "/metrics")[1]).group(1))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "The ", "max_tokens": 2000, "stream": True,
                                                                 "ignore_eos": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.fp.readline()
    resp.close()                                        # the socket goes away with the response
    conn.close()
    deadline = time.time() + 30
    while int(re.search(r"cancelled_total (\d+)", server.raw("GET", "/metrics")[1]).group(1)) == before:
        assert time.time() < deadline, "the disconnected request was not cancelled"
        time.sleep(0.2)
    assert c.completions.create(model="demo", prompt="hi", max_tokens=3).choices


BAD = [
    (b"{not json", "malformed JSON"),
    ({"model": "demo"}, "'messages' is required"),
    ({"messages": "hello"}, "'messages' is required"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, "content"),
    ({"messages": Q, "max_tokens": -3}, "max_tokens"),
    ({"messages": Q, "max_tokens": "ten"}, "max_tokens"),
    ({"messages": Q, "temperature": -1}, "temperature"),
    ({"messages": Q, "top_p": 0}, "top_p"),
    ({"messages": Q, "stream": "yes"}, "stream"),
    ({"messages": Q, "stop": 7}, "stop"),
    ({"messages": [{"role": "user", "content": "x" * 5000}]}, "context"),
    ({"messages": Q, "top_logprobs": 3}, "logprobs"),
    ([1, 2], "JSON object"),
]


def test_malformed_requests_get_400_and_the_server_survives(server):
    for body, match in BAD:
        status, text = server.raw("POST", "/v1/chat/completions", body)
        err = json.loads(text)["error"]
        assert status == 400 and match in err["message"] and err["type"] == "invalid_request_error", (body, text)
    status, text = server.raw("POST", "/v1/completions", {"prompt": ""})
    assert status == 400
    assert server.raw("POST", "/v1/nope", {})[0] == 404
    r = server.client().chat.completions.create(model="demo", messages=Q, max_tokens=5)
    assert r.choices[0].message is not None


def test_auth_and_back_pressure(trained_dir):
    s = Server(trained_dir, "--api-key", "sekrit", "--max-batch", "1", "--max-queue", "1", "--no-speculative")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert s.raw("GET", "/v1/models", headers={"Authorization": "Bearer sekrix"})[0] == 401 and s.raw("GET", "/health")[0] == 200
        c = s.client("sekrit")
        statuses = []

        def fire():
            try:
                c.completions.create(model="demo", prompt="The ", max_tokens=150, temperature=0,
                                     extra_body={"ignore_eos": True})
                statuses.append(200)
            except openai.RateLimitError:
                statuses.append(429)

        threads = [threading.Thread(target=fire) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sorted(statuses)[0] == 200 and 429 in statuses and len(statuses) == 5     # refused, never hung
    finally:
        s.stop()
