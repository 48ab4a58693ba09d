"""`mlxtune serve`: an OpenAI-compatible HTTP endpoint for a model or a run (base + adapter, the run's template).

Why not mlx-lm's server: it reads any Content-Length it is given (no body limit), answers errors as
`{"error": "text"}` rather than OpenAI's `{"error": {"message", "type", "param", "code"}}`, treats an unknown
`model` field as a hub id or path to load (a download attempt, not a 404), lists the Hugging Face cache as its models,
and knows neither a run's adapter-with-template pairing nor raw-text runs. Wrapping it would mean patching its
private request handler. So this is a small server on the standard library's ThreadingHTTPServer: handler threads
parse and validate; one worker thread owns the model and generates, requests queue for it in arrival order (MLX
arrays and streams are used from that one thread only, as mlx-lm's server does).

Security model (docs/SERVING.md): bound to a loopback address, the server answers only requests whose Host header
names a loopback host (a web page can't reach it through DNS rebinding) and POSTs whose Content-Type is
application/json (a page can't send one without a CORS preflight, which is refused); `api_key` adds a Bearer token
for servers bound elsewhere. Every request is checked before it reaches the model: non-finite or huge numbers, deep
nesting, lone surrogates and out-of-range sampling values are 400s, and a failed generation resets the worker's
random state so it can't poison the next request.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import os
import queue
import select
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from mlxtune.inference import Conversation, Sampling, context_window, encode_messages, stream_reply
from mlxtune.errors import UsageError
from mlxtune.faults import fault_point

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any chat request a local client sends
DRAIN_BYTES = 16 << 20  # an oversize body up to this size is read and dropped before the 413
MAX_QUEUE = 256  # waiting requests beyond this get 503
LISTEN_BACKLOG = 1024  # connections the kernel holds before accept(): bursts get 503s from us, not resets
RETRY_AFTER_S = 1
MAX_JSON_INT = 2**63 - 1  # a larger JSON integer is refused (and never converted: 5000 digits cost time)
MAX_JSON_DEPTH = 64  # far deeper than any OpenAI request
MAX_SEED = 2**63 - 1
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
API_KEY_ENV = "MLXTUNE_API_KEY"
READ_TIMEOUT_S = 30  # a client that stops sending mid-body is dropped, not waited on forever
DEFAULT_MAX_TOKENS = 256
ROLES = ("system", "user", "assistant", "tool")


class RequestError(Exception):
    """An OpenAI-style error answer."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _field(body: dict, name: str, types, default=None, *, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    # bool is an int in Python; JSON true is not a number for OpenAI either.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise RequestError(400, f"'{name}' must be {_type_name(types)}, got a boolean", name, "invalid_type")
    if not isinstance(value, types):
        raise RequestError(400, f"'{name}' must be {_type_name(types)}, got {type(value).__name__}", name,
                           "invalid_type")
    if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison below
        raise RequestError(400, f"'{name}' must be a finite number", name, "invalid_value")
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(400, f"'{name}' must be between {low} and {high}, got {value}", name, "invalid_value")
    return value


def _type_name(types) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
             dict: "an object"}
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def _sampling(body: dict) -> tuple[Sampling, list[str]]:
    number = (int, float)
    max_tokens = _field(body, "max_completion_tokens", int, None, low=1)
    max_tokens = _field(body, "max_tokens", int, max_tokens or DEFAULT_MAX_TOKENS, low=1)
    sampling = Sampling(
        max_tokens=max_tokens,
        temperature=float(_field(body, "temperature", number, 1.0, low=0, high=2)),
        top_p=float(_field(body, "top_p", number, 1.0, low=0, high=1)),
        min_p=float(_field(body, "min_p", number, 0.0, low=0, high=1)),
        repetition_penalty=_field(body, "repetition_penalty", number, None, low=0.01, high=10),
        seed=_field(body, "seed", int, None, low=0, high=MAX_SEED),
    )
    for name in ("frequency_penalty", "presence_penalty"):  # OpenAI's defaults (0) are accepted; others refused
        if _field(body, name, (int, float), 0, low=-2, high=2) != 0:
            raise RequestError(400, f"'{name}' is not supported; use repetition_penalty", name, "unsupported_value")
    if _field(body, "n", int, 1, low=1) != 1:
        raise RequestError(400, "only n=1 is supported", "n", "unsupported_value")
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = list(stop)
    else:
        raise RequestError(400, "'stop' must be a string or an array of up to 4 strings", "stop", "invalid_type")
    _field(body, "stream", bool, False)
    _refuse_unsupported(body)
    return sampling, [s for s in stops if s]


def _refuse_unsupported(body: dict) -> None:
    """Features a client relies on are refused rather than silently ignored."""
    if body.get("tools") not in (None, []):
        raise RequestError(400, "'tools' (function calling) is not supported by mlxtune serve", "tools",
                           "unsupported_parameter")
    if body.get("tool_choice") not in (None, "none"):
        raise RequestError(400, "'tool_choice' is not supported by mlxtune serve", "tool_choice",
                           "unsupported_parameter")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        raise RequestError(400, "'logprobs' are not supported by mlxtune serve", "logprobs", "unsupported_parameter")
    if body.get("echo") not in (None, False):
        raise RequestError(400, "'echo' is not supported by mlxtune serve", "echo", "unsupported_parameter")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise RequestError(400, "'response_format' other than text is not supported", "response_format",
                           "unsupported_parameter")
    options = body.get("stream_options")
    if options is not None:
        if not body.get("stream"):
            raise RequestError(400, "'stream_options' is only allowed with stream: true", "stream_options",
                               "invalid_value")
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise RequestError(400, "'stream_options' must be an object like {\"include_usage\": true}",
                               "stream_options", "invalid_type")


def _refuse_constant(name: str):
    raise RequestError(400, f"{name} is not a JSON number: send finite numbers only", code="invalid_number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf
        raise RequestError(400, f"the number {text[:40]} is out of range", code="invalid_number")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > 20 or abs(value := int(text)) > MAX_JSON_INT:
        raise RequestError(400, f"the integer {text[:20]}{'…' if len(text) > 20 else ''} is out of range",
                           code="invalid_number")
    return value


def parse_body(raw: bytes):
    """The request body as JSON, refusing what Python's json module accepts but nothing downstream should see:
    NaN/Infinity, numbers out of range, nesting deeper than MAX_JSON_DEPTH and lone surrogates (\\ud800)."""
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float,
                          parse_int=_bounded_int)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise RequestError(400, "the request body is nested too deeply", code="invalid_json") from None
    pending = [(body, 1)]  # iterative: a recursive walk could itself run out of stack
    while pending:
        value, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise RequestError(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels",
                               code="invalid_json")
        if isinstance(value, dict):
            pending.extend((key, depth) for key in value)
            pending.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            pending.extend((item, depth + 1) for item in value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(400, "the request body holds a lone surrogate (\\ud800-\\udfff): not text",
                                   code="invalid_json") from None
    return body


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty array", "messages",
                           "invalid_type" if messages is not None else "missing_required_parameter")
    cleaned = []
    for number, message in enumerate(messages):
        where = f"messages[{number}]"
        if not isinstance(message, dict):
            raise RequestError(400, f"{where} must be an object", where, "invalid_type")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RequestError(400, f"{where}.role must be one of {', '.join(ROLES)}", f"{where}.role",
                               "invalid_value")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(400, f"{where}.content parts must be text parts", f"{where}.content",
                                   "invalid_type")
            content = "".join(p["text"] for p in content)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise RequestError(400, f"{where}.content must be a string", f"{where}.content", "invalid_type")
        cleaned.append({"role": role, "content": content})
    return cleaned


@dataclass
class Job:
    kind: str  # chat | completion
    prompt_ids: list[int]
    sampling: Sampling
    stops: list[str]
    events: queue.Queue  # ("text", str) … then ("done", Reply) or ("error", RequestError)
    cancelled: threading.Event = field(default_factory=threading.Event)  # set when the client went away


class ClientGone(Exception):
    """The client closed its connection: stop answering (and generating)."""


@dataclass
class Counters:
    """What /health reports; updated from the handler threads and the worker."""

    served: int = 0
    failed: int = 0
    cancelled: int = 0
    rejected_busy: int = 0
    generated_tokens: int = 0

    def __post_init__(self):
        self._lock = threading.Lock()

    def add(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def as_dict(self) -> dict:
        with self._lock:
            return asdict(self)


class Engine:
    """The one thread that owns the model: loads it, then answers jobs in arrival order."""

    def __init__(self, model_or_run: str | Path, checkpoint: str = "last", max_queue: int = MAX_QUEUE):
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.counters = Counters()
        self.busy = False
        self.ready = threading.Event()
        self.failure: BaseException | None = None
        self.loaded = None
        self.format = None
        self.chat_format = None
        self._tokenizer_lock = threading.Lock()  # one Rust tokenizer shared by the handler threads
        self._thread = threading.Thread(target=self._run, args=(model_or_run, checkpoint), daemon=True,
                                        name="mlxtune-generate")
        self._thread.start()
        self.ready.wait()
        if self.failure is not None:
            raise self.failure

    def _run(self, model_or_run, checkpoint):
        from mlxtune.runs import open_for_inference
        from mlxtune.ui import quiet_stdout

        try:
            with quiet_stdout():
                self.loaded = open_for_inference(model_or_run, checkpoint, float32_on_cpu=True)
            # Chat requests are rendered in the format the model/run was trained on; a model without a template
            # gets mlxtune's fallback template.
            self.chat_format = Conversation(self.loaded, None, Sampling()).format
            self.context = context_window(self.loaded.config)
        except BaseException as exc:  # reported to the starting thread
            self.failure = exc
            self.ready.set()
            return
        self.ready.set()
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():  # its client left while it waited
                self.counters.add(cancelled=1)
                continue
            self.busy = True
            try:
                self._answer(job)
            except Exception as exc:  # a generation failure answers this request, the server stays up
                self.counters.add(failed=1)
                self._recover()
                job.events.put(("error", RequestError(500, f"generation failed: {exc}", kind="server_error")))
            finally:
                self.busy = False

    def _answer(self, job: Job) -> None:
        reply, tokens = None, 0
        replies = stream_reply(self.loaded, job.prompt_ids, job.sampling, (*self.stops_for(job.kind), *job.stops))
        try:
            for piece, reply in replies:
                self.counters.add(generated_tokens=reply.generation_tokens - tokens)
                tokens = reply.generation_tokens
                if job.cancelled.is_set():  # checked between tokens: a closed client stops its generation
                    self.counters.add(cancelled=1)
                    return
                if piece:
                    job.events.put(("text", piece))
                fault_point("serve.token")
        finally:
            replies.close()
        self.counters.add(served=1)
        job.events.put(("done", reply))

    @staticmethod
    def _recover() -> None:
        """After a failed generation: a fresh random state (a sampler that failed mid-call may leave MLX's global
        key half-updated) and no cached buffers from the failed graph, so the next request starts clean."""
        import mlx.core as mx

        mx.random.seed(int.from_bytes(os.urandom(8), "little") >> 1)
        mx.clear_cache()

    def stops_for(self, kind: str) -> tuple[str, ...]:
        return self.chat_format.stops if kind == "chat" else ()

    def encode_chat(self, messages: list[dict]) -> list[int]:
        try:
            with self._tokenizer_lock:
                return encode_messages(self.loaded, messages, self.chat_format)
        except UsageError as exc:
            raise RequestError(400, exc.message, "messages", "invalid_value") from None

    def encode_text(self, prompt: str) -> list[int]:
        with self._tokenizer_lock:
            return list(self.loaded.tokenizer.encode(prompt))

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            self.counters.add(rejected_busy=1)
            raise RequestError(503, "the server is busy: too many queued requests; retry shortly",
                               code="server_busy", kind="server_error") from None

    def health(self) -> dict:
        return {"queued": self.jobs.qsize(), "max_queue": self.jobs.maxsize, "generating": self.busy,
                **self.counters.as_dict()}

    def stop(self) -> None:
        self.jobs.put(None)


def _host_name(header: str) -> str:
    """The name in a Host header, without its port: 'localhost:8080' → 'localhost', '[::1]:80' → '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]")[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Handler(BaseHTTPRequestHandler):
    server_version = "mlxtune"
    protocol_version = "HTTP/1.1"  # keep-alive: a client's connection serves many requests
    timeout = READ_TIMEOUT_S
    engine: Engine
    model_id: str
    max_body: int = MAX_BODY_BYTES
    allowed_hosts: frozenset[str] | None = None  # None: any Host (the user bound a non-loopback address)
    api_key: str | None = None

    def log_message(self, format, *args):  # one quiet line per request instead of stderr noise
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    # --- responses -------------------------------------------------------------------------------------------
    def _send_json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: RequestError) -> None:
        if not self._body_read:
            self.close_connection = True  # an unread body must not be parsed as the next request
        headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 503 else {}
        if error.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        self._send_json(error.status, error.body(), headers)

    def _check_access(self) -> None:
        """Host (DNS rebinding) and API key, before anything else is read."""
        host = self.headers.get("Host")
        if self.allowed_hosts is not None and host is not None and _host_name(host) not in self.allowed_hosts:
            raise RequestError(403, f"Host {host[:100]!r} is not this server: a loopback server answers only "
                                    "loopback names (bind with --host to serve others)", code="forbidden_host",
                               kind="permission_error")
        if self.api_key is not None:
            given = self.headers.get("Authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                raise RequestError(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                                   code="invalid_api_key", kind="authentication_error")

    def _answer(self, route) -> None:
        """Run one route; every failure becomes a JSON error, never a closed connection or a dead handler."""
        self._body_read = self.command == "GET"
        try:
            self._check_access()
            route()
        except (BrokenPipeError, ConnectionResetError, ClientGone):
            self.close_connection = True  # the client went away; nothing to answer
        except RequestError as error:
            self._send_quietly(error)
        except Exception as exc:  # a bug must cost one request, not the connection
            import traceback

            traceback.print_exc()
            self._send_quietly(RequestError(500, f"internal error: {type(exc).__name__}", code="internal_error",
                                            kind="server_error"))

    def _send_quietly(self, error: RequestError) -> None:
        try:
            self._send_error(error)
        except OSError:
            self.close_connection = True

    # --- routing ---------------------------------------------------------------------------------------------
    def do_GET(self):
        self._answer(self._get)

    def _get(self):
        path = self.path.split("?")[0].rstrip("/")
        if path in ("/v1/models", "/models"):
            self._send_json(200, {"object": "list", "data": [self._model_card()]})
        elif path.startswith("/v1/models/"):
            if path.removeprefix("/v1/models/") == self.model_id:
                self._send_json(200, self._model_card())
            else:
                raise self._unknown_model(path.removeprefix("/v1/models/"))
        elif path in ("/health", "/v1/health"):
            self._send_json(200, {"status": "ok", "model": self.model_id, **self.engine.health()})
        else:
            raise RequestError(404, f"no route GET {path}", code="not_found")

    def do_POST(self):
        self._answer(self._post)

    def _post(self):
        path = self.path.split("?")[0].rstrip("/")
        routes = {"/v1/chat/completions": self._chat, "/chat/completions": self._chat,
                  "/v1/completions": self._completion, "/completions": self._completion}
        if path not in routes:
            raise RequestError(404, f"no route POST {path}", code="not_found")
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            # A web page can POST text/plain anywhere without a CORS preflight; application/json needs one.
            raise RequestError(415, f"Content-Type must be application/json, got {content_type or 'none'!r}",
                               code="unsupported_media_type")
        routes[path](self._read_json())

    def do_PUT(self):
        self._answer(self._not_allowed)

    def _not_allowed(self):
        raise RequestError(405, f"method {self.command} not allowed", code="method_not_allowed")

    do_DELETE = do_PATCH = do_OPTIONS = do_PUT

    def _model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": int(self.server.started), "owned_by": "mlxtune"}

    def _unknown_model(self, name) -> RequestError:
        return RequestError(404, f"the model {name!r} does not exist; this server serves {self.model_id!r}",
                            "model", "model_not_found")

    def _discard(self, length: int) -> None:
        """Read and drop an oversize body (up to DRAIN_BYTES) so the client, still sending, can read our 413
        instead of a connection reset; anything longer is cut off by closing the connection."""
        left = min(length, DRAIN_BYTES)
        try:
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "a Content-Length header is required", code="length_required")
        try:
            length = int(length)
        except ValueError:
            raise RequestError(400, "invalid Content-Length header", code="invalid_header") from None
        if length < 0:
            raise RequestError(400, "invalid Content-Length header", code="invalid_header")
        if length > self.max_body:
            self._discard(length)
            raise RequestError(413, f"request body of {length} bytes is over the {self.max_body}-byte limit",
                               code="request_too_large")
        raw = self.rfile.read(length)
        self._body_read = len(raw) == length
        body = parse_body(raw)
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object", code="invalid_type")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise RequestError(400, "'model' must be a string", "model", "invalid_type")
        if model not in (None, "", self.model_id):
            raise self._unknown_model(model)
        return body

    # --- endpoints -------------------------------------------------------------------------------------------
    def _chat(self, body: dict) -> None:
        messages = _messages(body)
        sampling, stops = _sampling(body)
        ids = self.engine.encode_chat(messages)
        self._generate("chat", ids, sampling, stops, body)

    def _completion(self, body: dict) -> None:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError(400, "'prompt' must be a string", "prompt",
                               "invalid_type" if prompt is not None else "missing_required_parameter")
        sampling, stops = _sampling(body)
        ids = self.engine.encode_text(prompt)
        self._generate("completion", ids, sampling, stops, body)

    def _client_gone(self) -> bool:
        """True when the client closed its end (readable with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _next_event(self, job: Job):
        """The worker's next event for this job; a client that left cancels the job (the worker stops between
        tokens) instead of leaving it to generate for nobody."""
        while True:
            try:
                event = job.events.get(timeout=0.05)
            except queue.Empty:
                event = None
            if self._client_gone():
                job.cancelled.set()
                raise ClientGone
            if event is not None:
                return event

    def _generate(self, kind: str, ids: list[int], sampling: Sampling, stops: list[str], body: dict) -> None:
        if not ids:
            raise RequestError(400, "the prompt is empty", "prompt" if kind == "completion" else "messages",
                               "invalid_value")
        if len(ids) + sampling.max_tokens > self.engine.context:
            raise RequestError(400, f"prompt ({len(ids)} tokens) + max_tokens ({sampling.max_tokens}) exceed the "
                                    f"model's {self.engine.context}-token context", "max_tokens",
                               "context_length_exceeded")
        job = Job(kind, ids, sampling, stops, queue.Queue())
        self.engine.submit(job)
        ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        try:
            if body.get("stream"):
                usage = bool((body.get("stream_options") or {}).get("include_usage"))
                self._stream(kind, job, ident, created, usage)
            else:
                self._whole(kind, job, ident, created)
        except BaseException:
            job.cancelled.set()  # whatever stopped this answer stops the generation too
            raise

    @staticmethod
    def _usage(job: Job, reply) -> dict:
        prompt = len(job.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": reply.generation_tokens,
                "total_tokens": prompt + reply.generation_tokens}

    def _whole(self, kind: str, job: Job, ident: str, created: int) -> None:
        text = ""
        while True:
            event, value = self._next_event(job)
            if event == "text":
                text += value
            elif event == "error":
                raise value
            else:
                reply = value
                break
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": reply.finish_reason, "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": reply.finish_reason, "logprobs": None}
            obj = "text_completion"
        self._send_json(200, {"id": ident, "object": obj, "created": created, "model": self.model_id,
                              "choices": [choice], "usage": self._usage(job, reply)})

    def _stream(self, kind: str, job: Job, ident: str, created: int, include_usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream's end is the connection's end (no Content-Length)
        self.end_headers()
        self.close_connection = True
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def send(payload: dict) -> None:
            self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
            self.wfile.flush()

        def chunk(text: str | None, finish: str | None, first: bool = False) -> None:
            if kind == "chat":
                delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            send({"id": ident, "object": obj, "created": created, "model": self.model_id, "choices": [choice]}
                 | ({"usage": None} if include_usage else {}))

        chunk("" if kind == "chat" else None, None, first=True)
        while True:
            event, value = self._next_event(job)
            if event == "text":
                chunk(value, None)
            elif event == "error":
                send(value.body())
                break
            else:
                chunk(None, value.finish_reason)
                if include_usage:  # OpenAI's last chunk: no choices, the whole request's usage
                    send({"id": ident, "object": obj, "created": created, "model": self.model_id, "choices": [],
                          "usage": self._usage(job, value)})
                break
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def handle_error(self, request, client_address):
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client that hung up between requests: nothing to answer, nothing to log
        super().handle_error(request, client_address)


class Server6(Server):
    address_family = socket.AF_INET6


def model_id_for(model_or_run: str | Path) -> str:
    return Path(model_or_run).expanduser().resolve().name or str(model_or_run)


def make_server(model_or_run: str | Path, host: str = "127.0.0.1", port: int = 8080, *, checkpoint: str = "last",
                max_body: int = MAX_BODY_BYTES, max_queue: int = MAX_QUEUE, api_key: str | None = None,
                verbose: bool = False) -> Server:
    """Bind, then load the model (on its generation thread); call `serve_forever()` on the result.

    Bound to a loopback address, only loopback Host names are answered; `api_key` (or $MLXTUNE_API_KEY) requires
    `Authorization: Bearer KEY` on every request."""
    api_key = api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    allowed = frozenset({*LOOPBACK_NAMES, host.lower()}) if is_loopback(host) else None
    handler = type("BoundHandler", (Handler,), {"model_id": model_id_for(model_or_run), "max_body": max_body,
                                                "allowed_hosts": allowed, "api_key": api_key})
    try:  # bind first: a busy port is refused in a second, before the model is loaded
        server = (Server6 if ":" in host else Server)((host, port), handler)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}",
                         "pick another --port (0 picks a free one)" if exc.errno in (98, 48) else
                         "check --host") from None
    try:
        engine = Engine(model_or_run, checkpoint, max_queue)
    except BaseException:
        server.server_close()
        raise
    handler.engine = engine
    server.started = time.time()
    server.verbose = verbose
    server.engine = engine
    server.model_id = handler.model_id
    server.chat_format = engine.chat_format
    server.source = engine.loaded.source
    server.api_key = api_key
    return server
