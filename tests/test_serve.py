"""`mlxtune serve` as a real process on 127.0.0.1, driven by the official `openai` client and by raw HTTP."""

from __future__ import annotations

import http.client
import json
import os
import re
import selectors
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import openai  # the official client (pinned in the test extra)
import pytest

from conftest import MLXTUNE


@pytest.fixture(scope="module")
def server(trained_run):
    run_dir, _ = trained_run
    process, port = _start_serve(run_dir)
    try:
        yield port, run_dir.name
    finally:
        process.terminate()
        process.wait(timeout=30)


def _client(port):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="local", max_retries=0, timeout=120)


def _raw(port, body: bytes, path="/v1/chat/completions", headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    payload = json.loads(response.read())
    connection.close()
    return response.status, payload


def test_openai_client_models_chat_stream_and_completions(server):
    port, model_id = server
    client = _client(port)
    assert [m.id for m in client.models.list().data] == [model_id]
    messages = [{"role": "user", "content": "table: 1-10015132-16"}]
    chat = client.chat.completions.create(model=model_id, messages=messages, max_tokens=8, temperature=0)
    text = chat.choices[0].message.content
    assert text and chat.usage.completion_tokens <= 8 and chat.choices[0].finish_reason in ("stop", "length")
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model=model_id, messages=messages, max_tokens=8, temperature=0, stream=True) if chunk.choices)
    assert streamed == text  # greedy: the stream carries exactly the non-streamed reply
    completion = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert completion.choices[0].text and completion.usage.prompt_tokens > 0
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=2)
    assert unknown.value.body["code"] == "model_not_found"


def test_bad_requests_get_openai_style_4xx_and_50_concurrent_requests_all_answer(server):
    port, model_id = server
    status, payload = _raw(port, b'{"model": "x", "messages": [')
    assert status == 400 and payload["error"]["code"] == "invalid_json" and payload["error"]["message"]
    status, payload = _raw(port, json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                             "max_tokens": "ten"}).encode())
    assert status == 400 and payload["error"]["param"] == "max_tokens" and payload["error"]["type"] == \
        "invalid_request_error"
    status, payload = _raw(port, json.dumps({"messages": "hi"}).encode())
    assert status == 400 and payload["error"]["param"] == "messages"
    status, payload = _raw(port, b'{"prompt": "' + b"x" * (2 << 20) + b'"}', path="/v1/completions")
    assert status == 413 and payload["error"]["code"] == "request_too_large"

    client = _client(port)

    def ask(number):
        reply = client.chat.completions.create(model=model_id, max_tokens=4, temperature=0,
                                               messages=[{"role": "user", "content": f"question {number}"}])
        return reply.choices[0].message.content

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(ask, range(50)))
    assert len(answers) == 50 and all(isinstance(a, str) for a in answers)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/health")
    health = connection.getresponse()
    assert health.status == 200 and json.loads(health.read())["status"] == "ok"
    assert ask(0) == answers[0]  # still healthy, still deterministic


def _request(port, method="POST", path="/v1/chat/completions", body: bytes | None = None, headers=None,
             timeout=60):
    """(status, headers, decoded JSON) of one raw request on a fresh connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, json.loads(response.read())
    finally:
        connection.close()


def _health(port) -> dict:
    return _request(port, "GET", "/health")[2]


GREEDY = {"messages": [{"role": "user", "content": "table: 1-10015132-16"}], "max_tokens": 6, "temperature": 0}


@pytest.mark.parametrize("raw, param", [
    (b'{"messages": [{"role": "user", "content": "hi"}], "min_p": NaN}', None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}', None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e400}', None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}", None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": -1}', "seed"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', None),
    (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}', "tools"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "logprobs": true}', "logprobs"),
])
def test_hostile_json_is_a_400_and_the_next_generation_still_works(server, raw, param):
    port, _ = server
    before = _request(port, body=json.dumps(GREEDY).encode(), headers={"Content-Type": "application/json"})
    status, _, payload = _request(port, body=raw, headers={"Content-Type": "application/json"})
    assert status == 400, payload
    assert payload["error"]["message"] and payload["error"]["type"] == "invalid_request_error"
    if param:
        assert payload["error"]["param"] == param
    after = _request(port, body=json.dumps(GREEDY).encode(), headers={"Content-Type": "application/json"})
    assert after[0] == 200 and after[2]["choices"] == before[2]["choices"]


def test_a_web_page_cannot_reach_the_server(server):
    port, _ = server
    body = json.dumps(GREEDY).encode()
    # text/plain is what a page can POST cross-origin without a CORS preflight
    status, _, payload = _request(port, body=body, headers={"Content-Type": "text/plain"})
    assert status == 415 and payload["error"]["code"] == "unsupported_media_type"
    # DNS rebinding: the page's own name pointed at 127.0.0.1
    status, _, payload = _request(port, body=body, headers={"Content-Type": "application/json",
                                                             "Host": f"evil.example:{port}"})
    assert status == 403 and payload["error"]["code"] == "forbidden_host"
    assert _request(port, "GET", "/v1/models", headers={"Host": "evil.example"})[0] == 403
    status, _, _ = _request(port, "OPTIONS", "/v1/chat/completions")  # the preflight is refused
    assert status == 405
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]"):
        assert _request(port, body=body, headers={"Content-Type": "application/json; charset=utf-8",
                                                   "Host": host})[0] == 200


def test_stream_usage_keep_alive_and_refused_features(server):
    port, model_id = server
    client = _client(port)
    chunks = list(client.chat.completions.create(model=model_id, stream=True, stream_options={"include_usage": True},
                                                 **GREEDY))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=model_id, tools=[{"type": "function", "function": {"name": "f"}}],
                                       **GREEDY)
    assert refused.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_id, logprobs=True, top_logprobs=2, **GREEDY)
    # HTTP/1.1 keep-alive: one connection, several answers (an error in between included)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for body in (GREEDY, {"messages": "x"}, GREEDY):
        connection.request("POST", "/v1/chat/completions", body=json.dumps(body),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status in (200, 400) and json.loads(response.read())
        assert not response.will_close
    connection.close()


def test_a_client_that_disconnects_stops_its_generation(server):
    port, _ = server
    health = _health(port)
    long = {"messages": [{"role": "user", "content": "tell a story"}], "max_tokens": 400, "temperature": 1.0,
            "seed": 1}
    for number in range(10):
        cancel_request(port, {**long, "stream": number % 2 == 0})
    deadline = time.time() + 30
    while time.time() < deadline and (_health(port)["cancelled"] < health["cancelled"] + 10
                                      or _health(port)["generating"]):
        time.sleep(0.05)
    after = _health(port)
    assert after["cancelled"] == health["cancelled"] + 10, after
    generated = after["generated_tokens"] - health["generated_tokens"]
    assert generated < 10 * 400 / 4, f"{generated} tokens generated for 10 cancelled requests"
    status, _, payload = _request(port, body=json.dumps(GREEDY).encode(), headers={"Content-Type":
                                                                                     "application/json"})
    assert status == 200 and payload["choices"][0]["message"]["content"]


def test_serve_answers_with_the_adapter_not_the_base(server, trained_run):
    from mlxtune.inference import generate_text
    from mlxtune.runs import open_for_inference

    port, model_id = server
    run_dir, _ = trained_run
    prompt = "### User:\ntable: 1-10015132-16\n\n### Assistant:\n"
    served = _client(port).completions.create(model=model_id, prompt=prompt, max_tokens=16,
                                              temperature=0).choices[0].text
    tuned = generate_text(open_for_inference(run_dir), prompt, max_tokens=16, use_template=False)
    base = generate_text(open_for_inference(run_dir, adapter=False), prompt, max_tokens=16, use_template=False)
    assert tuned != base, "the prompt must tell the tuned model from the base"
    assert served == tuned


def cancel_request(port: int, body: dict) -> None:
    """Send a request and hang up like an editor's "stop": a stream after its first event, a plain request at once."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
        if body.get("stream"):
            received = b""
            while b"data: " not in received:
                received += connection.recv(4096) or b"data: "  # (a closed connection ends the wait too)


def _start_serve(*args, env=None, timeout=120):
    """`mlxtune serve ARGS --port 0` as a real process; returns (process, port)."""
    process = subprocess.Popen([*MLXTUNE, "serve", *map(str, args), "--port", "0"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=dict(os.environ, COLUMNS="200", **(env or {})))
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline, seen = time.time() + timeout, ""
    while time.time() < deadline and process.poll() is None:
        if selector.select(timeout=1):
            line = process.stdout.readline()
            seen += line
            match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
            if match:
                return process, int(match.group(1))
    process.kill()
    raise AssertionError(f"server did not start:\n{seen}")


@pytest.fixture(scope="module")
def guarded_server(trained_run):
    """A second server: an API key from the environment and a queue of 2."""
    process, port = _start_serve(trained_run[0], "--max-queue", 2, env={"MLXTUNE_API_KEY": "sesame"})
    try:
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_api_key_is_required_when_set(guarded_server):
    port = guarded_server
    body = json.dumps(GREEDY).encode()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
        status, response_headers, payload = _request(port, body=body,
                                                     headers={"Content-Type": "application/json", **headers})
        assert status == 401 and payload["error"]["code"] == "invalid_api_key"
        assert response_headers["WWW-Authenticate"] == "Bearer"
    assert _request(port, "GET", "/health")[0] == 401
    with pytest.raises(openai.AuthenticationError):
        _client(port).chat.completions.create(model="x", **GREEDY)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sesame", max_retries=0, timeout=60)
    assert client.chat.completions.create(model=client.models.list().data[0].id, **GREEDY).choices[0].message.content


def test_a_burst_of_100_gets_answers_and_503s_never_resets(guarded_server):
    port = guarded_server
    body = json.dumps({**GREEDY, "max_tokens": 24}).encode()
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sesame"}
    with ThreadPoolExecutor(max_workers=100) as pool:
        answers = list(pool.map(lambda _: _request(port, body=body, headers=headers, timeout=120), range(100)))
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    for status, response_headers, payload in answers:
        if status == 503:
            assert response_headers["Retry-After"] and payload["error"]["code"] == "server_busy"
    health = _request(port, "GET", "/health", headers=headers)[2]
    assert health["rejected_busy"] == statuses.count(503) and health["max_queue"] == 2


def test_a_busy_port_exits_2_with_one_line_before_loading(model_dir):
    from conftest import run_cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_cli("serve", model_dir, "--port", taken.getsockname()[1], timeout=60)
    assert result.returncode == 2, result.stderr
    assert "cannot listen" in result.stderr and "--port" in result.stderr and "Traceback" not in result.stderr


def test_a_generation_that_fails_costs_one_request_not_the_server(trained_run):
    """An error inside a generation (injected at its second token: no valid request makes MLX fail) answers that
    request with a 500, and the worker goes on: the next request is answered as a fresh server answers it."""
    process, port = _start_serve(trained_run[0], env={"MLXTUNE_FAULT": "serve.token:2:raise"})
    try:
        body = json.dumps(GREEDY).encode()
        headers = {"Content-Type": "application/json"}
        status, _, payload = _request(port, body=body, headers=headers, timeout=30)
        assert status == 500 and payload["error"]["type"] == "server_error", payload
        assert "generation failed: fault injected at serve.token" in payload["error"]["message"]
        status, _, payload = _request(port, body=body, headers=headers, timeout=30)
        assert status == 200 and payload["choices"][0]["message"]["content"], payload
        assert _request(port, "GET", "/health")[2]["failed"] == 1
    finally:
        process.terminate()
        process.wait(timeout=30)
