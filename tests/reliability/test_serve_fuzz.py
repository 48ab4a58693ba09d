"""A real `mlxtune serve` on 127.0.0.1 under 2,000 random and mutated requests (issue 23): wrong types, NaN and
Infinity, huge numbers, deep nesting, bad UTF-8, random bytes, wrong headers and cancelled streams. Every answer is a
well-formed 2xx/4xx/503 (JSON for errors), the server answers a normal request exactly as before, and its memory stays
flat. Bounded in count and in time (a deadline stops the loop early on a slow machine; at least 2,000 is asserted)."""

from __future__ import annotations

import http.client
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from test_serve import _start_serve, cancel_request  # noqa: E402  (tests/ is on sys.path through conftest)

REQUESTS = 2000
DEADLINE_S = 90  # typically ~35 s on 2 busy cores
CLIENTS = 4  # concurrent clients, each with its own random sequence
# Both length fields: a mutation that breaks one name leaves the other (not the 256-token default).
GOOD = {"messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 2, "max_completion_tokens": 2,
        "temperature": 0}
ODD_VALUES = [None, True, False, "", "x" * 300, -1, 0, 1, 2**31, -(2**63), 1e308, -1e-308, 0.5, [], [1], {},
              {"a": None}, "NaN", "\ud800", "\u0000", 10**18]
FIELDS = ["messages", "max_tokens", "temperature", "top_p", "min_p", "seed", "stop", "stream", "n", "model",
          "repetition_penalty", "stream_options", "tools", "logprobs", "frequency_penalty", "prompt", "role"]


def _rss_kb(pid: int) -> int | None:
    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        return None
    return int(next(line.split()[1] for line in status.read_text().splitlines() if line.startswith("VmRSS:")))


def _body(rng: random.Random) -> tuple[str, bytes, dict]:
    """(path, body, extra headers) of one random request."""
    kind = rng.randrange(12)
    good = json.dumps(GOOD).encode()
    if kind == 0:  # valid JSON, a wrong type in one field
        body = dict(GOOD)
        body[rng.choice(FIELDS)] = rng.choice(ODD_VALUES)
        if rng.random() < 0.3:
            body["messages"] = [{"role": rng.choice(["user", "bot", 1]), "content": rng.choice(ODD_VALUES)}]
        return "/v1/chat/completions", json.dumps(body).encode(), {}
    if kind == 1:  # non-finite and huge numbers in the text itself
        token = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"9" * rng.choice([25, 5000, 50000])])
        return "/v1/chat/completions", good.replace(b"0}", token + b"}"), {}
    if kind == 2:  # deep nesting
        depth = rng.choice([65, 1000, 100_000])
        return "/v1/chat/completions", b'{"messages": ' + b"[" * depth + b"]" * depth + b"}", {}
    if kind == 3:  # bad UTF-8 and lone surrogates
        bad = rng.choice([b"\xff\xfe", b"\xed\xa0\x80", b"\\ud83d", b"\xc3", b"\\udfff\\ud800"])
        return "/v1/chat/completions", good.replace(b"upon", b"up" + bad + b"on"), {}
    if kind == 4:  # random bytes
        return "/v1/chat/completions", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))), {}
    if kind in (5, 6):  # byte mutations of a valid request
        body = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(body))
            action = rng.randrange(3)
            if action == 0:
                body[at] = rng.randrange(256)
            elif action == 1:
                del body[at]
            else:
                body.insert(at, rng.choice(b'{}[]",:0123456789eE-+.\\ntfu'))
        return "/v1/chat/completions", bytes(body), {}
    if kind == 7:  # wrong headers and paths
        return rng.choice([("/v1/chat/completions", good, {"Content-Type": "text/plain"}),
                           ("/v1/chat/completions", good, {"Host": "evil.example"}),
                           ("/v1/nothing", good, {}),
                           ("/v1/completions", json.dumps({"prompt": ["a", "b"]}).encode(), {})])
    if kind == 8:  # completions with odd fields
        return "/v1/completions", json.dumps({"prompt": "Once", "max_tokens": rng.choice(ODD_VALUES)}).encode(), {}
    if kind == 9:  # a stream, cancelled after its first event (marked for the caller)
        return "cancel", json.dumps({**GOOD, "max_tokens": 50, "stream": True}).encode(), {}
    return "/v1/chat/completions", json.dumps({**GOOD, "temperature": rng.uniform(0, 2),
                                               "top_p": rng.uniform(0, 1)}).encode(), {}


def _send(port: int, path: str, body: bytes, headers: dict) -> tuple[int, bytes]:
    if path == "cancel":
        cancel_request(port, json.loads(body))
        return 200, b""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json", **headers})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _fuzz(port: int, seed: int, count: int, stop_at: float) -> tuple[int, dict[int, int]]:
    """Send up to `count` random requests, checking each answer; returns (sent, count per status)."""
    rng, statuses, sent = random.Random(seed), {}, 0
    while sent < count and time.time() < stop_at:
        path, body, headers = _body(rng)
        try:
            status, payload = _send(port, path, body, headers)
        except (ConnectionError, http.client.HTTPException) as exc:
            raise AssertionError(f"seed {seed} request {sent} ({body[:80]!r}) got no answer: {exc!r}") from None
        statuses[status] = statuses.get(status, 0) + 1
        assert 200 <= status < 300 or 400 <= status < 500 or status == 503, (status, body[:80], payload[:200])
        if status >= 400:
            error = json.loads(payload)["error"]
            assert error["message"] and error["type"], payload
        sent += 1
    return sent, statuses


def test_2000_hostile_requests_leave_the_server_well(model_dir):
    process, port = _start_serve(model_dir)
    try:
        normal = json.dumps({**GOOD, "max_tokens": 8, "max_completion_tokens": 8}).encode()
        status, expected = _send(port, "/v1/chat/completions", normal, {})
        assert status == 200
        expected_text = json.loads(expected)["choices"][0]["message"]["content"]
        # warm up: the sampler's one compile, and a baseline for resident memory
        assert _send(port, "/v1/chat/completions", json.dumps({**GOOD, "temperature": 0.5}).encode(), {})[0] == 200
        before = _rss_kb(process.pid)
        stop_at, per_client = time.time() + DEADLINE_S, REQUESTS // CLIENTS
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(lambda seed: _fuzz(port, seed, per_client, stop_at), range(CLIENTS)))
        sent = sum(count for count, _ in results)
        statuses: dict[int, int] = {}
        for _, counts in results:
            for status, count in counts.items():
                statuses[status] = statuses.get(status, 0) + count
        assert sent >= REQUESTS, f"only {sent} requests in {DEADLINE_S} s: {statuses}"
        assert statuses.get(400, 0) > 500 and statuses.get(200, 0) > 100, statuses
        status, again = _send(port, "/v1/chat/completions", normal, {})
        assert status == 200 and json.loads(again)["choices"][0]["message"]["content"] == expected_text
        if before is not None:  # Linux: resident memory before and after the 2,000
            after = _rss_kb(process.pid)
            assert after - before < 64 * 1024, f"resident memory grew from {before} to {after} kB"
            print(f"fuzz: {sent} requests {statuses}; resident memory {before} -> {after} kB")
        assert process.poll() is None
    finally:
        process.terminate()
        process.wait(timeout=30)
