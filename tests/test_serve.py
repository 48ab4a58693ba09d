"""`mlxtune serve` as a real process on 127.0.0.1, driven by the official `openai` client and by raw HTTP."""

from __future__ import annotations

import http.client
import json
import os
import re
import selectors
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import openai  # the official client (pinned in the test extra)
import pytest

from conftest import MLXTUNE


@pytest.fixture(scope="module")
def server(trained_run):
    run_dir, _ = trained_run
    process = subprocess.Popen([*MLXTUNE, "serve", str(run_dir), "--port", "0"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=dict(os.environ, COLUMNS="200"))
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline, seen, port = time.time() + 120, "", None
    while port is None and time.time() < deadline and process.poll() is None:
        if selector.select(timeout=1):
            line = process.stdout.readline()
            seen += line
            match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
            port = int(match.group(1)) if match else None
    assert port, f"server did not start:\n{seen}"
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
