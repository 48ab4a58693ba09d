"""`mlxtune serve`: an OpenAI-compatible HTTP endpoint for a model or a run (base + adapter, the run's template).

Why not mlx-lm's server: it reads any Content-Length it is given (no body limit), answers errors as
`{"error": "text"}` rather than OpenAI's `{"error": {"message", "type", "param", "code"}}`, treats an unknown
`model` field as a hub id or path to load (a download attempt, not a 404), lists the Hugging Face cache as its models,
and knows neither a run's adapter-with-template pairing nor raw-text runs. Wrapping it would mean patching its
private request handler. So this is a small server on the standard library's ThreadingHTTPServer: handler threads
parse and validate; one worker thread owns the model and generates, requests queue for it in arrival order (MLX
arrays and streams are used from that one thread only, as mlx-lm's server does).
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from mlxtune.chat import Conversation, Sampling, context_window, encode_messages, stream_reply
from mlxtune.errors import UsageError

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any chat request a local client sends
DRAIN_BYTES = 16 << 20  # an oversize body up to this size is read and dropped before the 413
MAX_QUEUE = 256  # waiting requests beyond this get 503
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
        seed=_field(body, "seed", int, None),
    )
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
    return sampling, [s for s in stops if s]


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


class Engine:
    """The one thread that owns the model: loads it, then answers jobs in arrival order."""

    def __init__(self, model_or_run: str | Path, checkpoint: str = "last"):
        self.jobs: queue.Queue = queue.Queue(maxsize=MAX_QUEUE)
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
                self.loaded = open_for_inference(model_or_run, checkpoint)
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
            try:
                reply = None
                for piece, reply in stream_reply(self.loaded, job.prompt_ids, job.sampling,
                                                 (*self.stops_for(job.kind), *job.stops)):
                    if piece:
                        job.events.put(("text", piece))
                job.events.put(("done", reply))
            except Exception as exc:  # a generation failure answers this request, the server stays up
                job.events.put(("error", RequestError(500, f"generation failed: {exc}", kind="server_error")))

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
            raise RequestError(503, "the server is busy: too many queued requests", code="server_busy",
                               kind="server_error") from None

    def stop(self) -> None:
        self.jobs.put(None)


class Handler(BaseHTTPRequestHandler):
    server_version = "mlxtune"
    timeout = READ_TIMEOUT_S
    engine: Engine
    model_id: str
    max_body: int = MAX_BODY_BYTES

    def log_message(self, format, *args):  # one quiet line per request instead of stderr noise
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    # --- responses -------------------------------------------------------------------------------------------
    def _send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: RequestError) -> None:
        if error.status == 413:
            self.close_connection = True  # the unread body must not be parsed as the next request
        self._send_json(error.status, error.body())

    # --- routing ---------------------------------------------------------------------------------------------
    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path in ("/v1/models", "/models"):
            self._send_json(200, {"object": "list", "data": [self._model_card()]})
        elif path.startswith("/v1/models/"):
            if path.removeprefix("/v1/models/") == self.model_id:
                self._send_json(200, self._model_card())
            else:
                self._send_error(self._unknown_model(path.removeprefix("/v1/models/")))
        elif path in ("/health", "/v1/health"):
            self._send_json(200, {"status": "ok", "model": self.model_id, "queued": self.engine.jobs.qsize()})
        else:
            self._send_error(RequestError(404, f"no route GET {path}", code="not_found"))

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        routes = {"/v1/chat/completions": self._chat, "/chat/completions": self._chat,
                  "/v1/completions": self._completion, "/completions": self._completion}
        try:
            if path not in routes:
                raise RequestError(404, f"no route POST {path}", code="not_found")
            body = self._read_json()
            routes[path](body)
        except RequestError as error:
            self._send_error(error)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; nothing to answer

    def do_PUT(self):
        self._send_error(RequestError(405, "method not allowed", code="method_not_allowed"))

    do_DELETE = do_PATCH = do_PUT

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
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
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
        self._generate("chat", ids, sampling, stops, bool(body.get("stream")))

    def _completion(self, body: dict) -> None:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError(400, "'prompt' must be a string", "prompt",
                               "invalid_type" if prompt is not None else "missing_required_parameter")
        sampling, stops = _sampling(body)
        ids = self.engine.encode_text(prompt)
        self._generate("completion", ids, sampling, stops, bool(body.get("stream")))

    def _generate(self, kind: str, ids: list[int], sampling: Sampling, stops: list[str], stream: bool) -> None:
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
        if stream:
            self._stream(kind, job, ident, created)
            return
        text, reply = "", None
        while True:
            event, value = job.events.get()
            if event == "text":
                text += value
            elif event == "error":
                raise value
            else:
                reply = value
                break
        usage = {"prompt_tokens": len(ids), "completion_tokens": reply.generation_tokens,
                 "total_tokens": len(ids) + reply.generation_tokens}
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": reply.finish_reason, "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": reply.finish_reason, "logprobs": None}
            obj = "text_completion"
        self._send_json(200, {"id": ident, "object": obj, "created": created, "model": self.model_id,
                              "choices": [choice], "usage": usage})

    def _stream(self, kind: str, job: Job, ident: str, created: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.close_connection = True
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(text: str | None, finish: str | None, first: bool = False) -> None:
            if kind == "chat":
                delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            payload = {"id": ident, "object": obj, "created": created, "model": self.model_id, "choices": [choice]}
            self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
            self.wfile.flush()

        try:
            chunk("" if kind == "chat" else None, None, first=True)
            while True:
                event, value = job.events.get()
                if event == "text":
                    chunk(value, None)
                elif event == "error":
                    self.wfile.write(f"data: {json.dumps(value.body())}\n\n".encode())
                    break
                else:
                    chunk(None, value.finish_reason)
                    break
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            # The client left: drain so the worker's queue entries are dropped with the job.
            pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def model_id_for(model_or_run: str | Path) -> str:
    return Path(model_or_run).expanduser().resolve().name or str(model_or_run)


def make_server(model_or_run: str | Path, host: str = "127.0.0.1", port: int = 8080, *, checkpoint: str = "last",
                max_body: int = MAX_BODY_BYTES, verbose: bool = False) -> Server:
    """Load the model (on its generation thread) and bind; call `serve_forever()` on the result."""
    engine = Engine(model_or_run, checkpoint)
    handler = type("BoundHandler", (Handler,), {"engine": engine, "model_id": model_id_for(model_or_run),
                                                "max_body": max_body})
    try:
        server = Server((host, port), handler)
    except OSError as exc:
        engine.stop()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}",
                         "pick another --port (0 picks a free one)" if exc.errno in (98, 48) else
                         "check --host") from None
    server.started = time.time()
    server.verbose = verbose
    server.engine = engine
    server.model_id = handler.model_id
    server.chat_format = engine.chat_format
    server.source = engine.loaded.source
    return server
