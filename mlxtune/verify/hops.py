"""Each place a tuned model is handed to, seen the way that place sees it: how it renders a conversation into
tokens, which tokens or strings end a reply, its next-token logits, and its own greedy generation.

- `MlxHop`: an MLX model directory or a run (base + adapter) loaded as `mlxtune chat`/`generate` load it.
- `LlamaCppHop`: a GGUF file in llama.cpp (llama-cpp-python): its embedded Jinja template rendered by llama-cpp-
  python's own formatter (as llama.cpp's chat endpoint uses it), its end-of-generation ids.
- `LmStudioHop`: a model in LM Studio's folder layout (PUBLISHER/NAME/FILE.gguf): the GGUF's embedded template
  rendered by a plain Jinja engine with the variables LM Studio passes, then llama.cpp (LM Studio's GGUF engine).
- `OllamaHop`: an Ollama folder: the Modelfile's Go TEMPLATE rendered as Ollama renders it, its stop parameters,
  and its GGUF in llama.cpp (Ollama's engine).
- `ServeHop`: `mlxtune serve` started for real on a free port: its request-rendering code and its HTTP answers.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlxtune.data.template import FALLBACK_CHAT_TEMPLATE, TEMPLATE_NAMES, render_chat
from mlxtune.errors import UsageError


class Unsupported(Exception):
    """The hop has no way to take a feature probe's tools or switch; the message says what the hop does instead."""


@dataclass
class Rendered:
    text: str | None  # the prompt text (None: the hop only exposes token ids)
    ids: list[int]


@dataclass
class Generation:
    tokens: list[int] | None  # None: the hop answers with text only (an HTTP server)
    text: str
    stopped: bool  # ended on its own (end of turn / stop string), not at the token limit


@dataclass
class StopSet:
    ids: set[int]  # token ids that end generation
    strings: list[str] = field(default_factory=list)  # text that ends generation


def describe_template(template: str | None, own: str) -> str:
    """An exported file's template (GGUF, Modelfile) in the words of data/template.py's TEMPLATE_NAMES."""
    if template is None:
        return TEMPLATE_NAMES["none"]
    return TEMPLATE_NAMES["fallback"] if template == FALLBACK_CHAT_TEMPLATE else own


def with_added_bos(tokenizer, text: str, ids: list[int]) -> str:
    """The text the model is given: a BOS the tokenizer adds in front of a template that doesn't write one counts."""
    bos = tokenizer.bos_token or ""
    if bos and ids and ids[0] == tokenizer.bos_token_id and not text.startswith(bos):
        return bos + text
    return text


class MlxHop:
    """A model directory or run, loaded and prompted as mlxtune's chat, generate and serve do."""

    gives_logits = True  # teacher-forced checks and forced-stop generation apply

    def __init__(self, name: str, model_or_run, checkpoint: str = "last", template_kind: str | None = None):
        from mlxtune.inference import prompt_format
        from mlxtune.runs import open_for_inference
        from mlxtune.ui import quiet_stdout

        with quiet_stdout():
            self.loaded = open_for_inference(model_or_run, checkpoint, float32_on_cpu=True)
        self.name = name
        self.source = self.loaded.source
        self.format = prompt_format(self.loaded)
        self.template_kind = template_kind or self.format.kind
        self.template_name = self.format.name  # the one template rule's choice (inference.prompt_format)
        self.tokenizer = self.loaded.tokenizer

    def render(self, probe) -> Rendered:
        from mlxtune.inference import encode_messages

        if probe.messages is None:
            return Rendered(probe.text, list(self.tokenizer.encode(probe.text)))
        if probe.feature:  # tools and switches: rendered through the tokenizer as chat and serve render
            text = render_chat(self.tokenizer, probe.messages, self.format.template, True, probe.tools,
                               **probe.switches)
            bos = self.tokenizer.bos_token or ""
            ids = list(self.tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos))))
        else:
            text = render_chat(self.tokenizer, probe.messages, self.format.template, add_generation_prompt=True)
            ids = encode_messages(self.loaded, probe.messages, self.format)
        return Rendered(with_added_bos(self.tokenizer, text, ids), ids)

    def stops(self) -> StopSet:
        return StopSet(set(self.tokenizer.eos_token_ids), list(self.format.stops))

    def logits(self, ids: list[int]) -> np.ndarray:
        import mlx.core as mx

        out = self.loaded.model(mx.array(ids)[None])[0].astype(mx.float32)
        return np.array(out)

    def greedy(self, rendered: Rendered, max_tokens: int, force: int | None = None, probe=None) -> Generation:
        """Greedy tokens through mlx-lm's `stream_generate` (what chat and serve run); `force` biases that token
        to come first, to see whether generation really stops on it."""
        import mlx.core as mx
        from mlx_lm.generate import stream_generate
        from mlx_lm.sample_utils import make_sampler

        processors = []
        if force is not None:
            def bias(tokens, logits):
                return logits + mx.where(mx.arange(logits.shape[-1]) == force, 1e4, 0.0)
            processors.append(bias)
        tokens, pieces, stopped = [], [], False
        for response in stream_generate(self.loaded.model, self.tokenizer, rendered.ids, max_tokens=max_tokens,
                                        sampler=make_sampler(temp=0.0), logits_processors=processors):
            pieces.append(response.text)  # the streaming detokenizer's text, as chat and serve show it
            if response.finish_reason == "stop":
                stopped = True
            else:
                tokens.append(response.token)
        text = "".join(pieces)
        for stop in self.format.stops:
            if stop in text:
                text, stopped = text[:text.index(stop)], True
        return Generation(tokens, text, stopped)

    def close(self) -> None:
        del self.loaded


def _gguf_fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    wanted = ("general.file_type", "tokenizer.chat_template", "tokenizer.ggml.eos_token_id",
              "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id", "tokenizer.ggml.bos_token_id",
              "tokenizer.ggml.add_bos_token")
    return {key: reader.fields[key].contents() for key in wanted if key in reader.fields}


GGUF_FILE_TYPES = {0: "f32", 1: "f16", 7: "q8_0", 32: "bf16"}


class LlamaCppHop:
    """A GGUF file in llama.cpp, prompted the way llama.cpp's chat completion prompts it."""

    gives_logits = True

    def __init__(self, name: str, path: Path, n_ctx: int = 1024):
        try:
            import llama_cpp
        except ImportError:
            raise UsageError(f"checking {path} needs llama.cpp's Python binding",
                             "pip install llama-cpp-python (or 'mlxtune[interop]'), or leave out --hops gguf") from None
        self.llama_cpp = llama_cpp
        self.name = name
        self.path = Path(path)
        self.source = str(path)
        self.metadata = _gguf_fields(self.path)
        self.outtype = GGUF_FILE_TYPES.get(self.metadata.get("general.file_type"), "other")
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=1, seed=0,
                                   verbose=False)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.template = self.metadata.get("tokenizer.chat_template")
        self.template_name = describe_template(self.template, "the GGUF's embedded template") \
            if self.template else "none embedded"

    def token_text(self, token: int) -> str:
        return self.llama_cpp.llama_vocab_get_text(self.vocab, token).decode("utf-8", errors="replace") \
            if token >= 0 else ""

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def format_prompt(self, probe, bos: str, eos: str) -> str:
        """The GGUF's Jinja template rendered by llama-cpp-python's formatter (BOS/EOS text from the vocabulary)."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        formatter = Jinja2ChatFormatter(self.template, eos_token=eos, bos_token=bos)
        return formatter(messages=probe.messages, tools=probe.tools, **probe.switches).prompt

    def render(self, probe) -> Rendered:
        if probe.messages is None:
            return Rendered(probe.text, self.tokenize(probe.text, True))
        if not self.template:
            raise UsageError(f"{self.path} has no chat template", "export it again with mlxtune export")
        # Then llama.cpp's server rule (common/chat.cpp): when the vocabulary adds BOS, a BOS the template wrote is
        # cut and the tokenizer adds it, so the prompt starts with exactly one.
        bos = self.token_text(self.llm.token_bos())
        text = self.format_prompt(probe, bos, self.token_text(self.llm.token_eos()))
        if not self.llama_cpp.llama_vocab_get_add_bos(self.vocab):
            return Rendered(text, self.tokenize(text, False))
        text = text[len(bos):] if bos and text.startswith(bos) else text
        return Rendered(bos + text, self.tokenize(text, True))

    def is_eog(self, token: int) -> bool:
        return bool(self.llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def stops(self) -> StopSet:
        declared = {self.metadata.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                                   "tokenizer.ggml.eom_token_id")} - {None}
        # Only the ids the file declares count: llama.cpp guesses some (SentencePiece's 2, "<|im_end|>"-like
        # texts), but Ollama's own engine, LM Studio and other readers take the metadata.
        return StopSet({int(t) for t in declared if self.is_eog(int(t))}, [])

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

    def greedy(self, rendered: Rendered, max_tokens: int, force: int | None = None, probe=None,
               stop_strings: list[str] = ()) -> Generation:
        bias = {force: 1e4} if force is not None else None
        self.llm.reset()
        tokens, stopped = [], False
        for token in self.llm.generate(rendered.ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                       reset=True, logits_processor=_biased(bias) if bias else None):
            if self.is_eog(token):
                stopped = True
                break
            tokens.append(token)
            if len(tokens) == max_tokens:
                break
        text = self.llm.detokenize(tokens).decode("utf-8", errors="replace")
        for stop in stop_strings:
            if stop in text:
                text, stopped = text[:text.index(stop)], True
        return Generation(tokens, text, stopped)

    def close(self) -> None:
        self.llm.close()


def _biased(bias: dict[int, float]):
    from llama_cpp import LogitsProcessorList

    def processor(ids, scores):
        for token, value in bias.items():
            scores[token] += value
        return scores
    return LogitsProcessorList([processor])


_MODELFILE_TEMPLATE = re.compile(r'^TEMPLATE\s+"""(.*?)"""', re.S | re.M)


def read_modelfile(path: Path) -> dict:
    """FROM, TEMPLATE, SYSTEM and the stop parameters of an Ollama Modelfile."""
    text = path.read_text(encoding="utf-8")
    found = _MODELFILE_TEMPLATE.search(text)
    single = re.search(r'^TEMPLATE\s+(?!""")(.+)$', text, re.M)
    template = found.group(1) if found else (json.loads(single.group(1)) if single and single.group(1)
                                             .startswith('"') else single.group(1) if single else None)
    stops = []
    for value in re.findall(r"^PARAMETER\s+stop\s+(.+)$", text, re.M):
        value = value.strip()
        stops.append(json.loads(value) if value.startswith('"') else value)
    source = re.search(r"^FROM\s+(.+)$", text, re.M)
    system = re.search(r'^SYSTEM\s+"""(.*?)"""', text, re.S | re.M)
    return {"from": source.group(1).strip() if source else None, "template": template, "stops": stops,
            "system": system.group(1) if system else None}


class OllamaHop(LlamaCppHop):
    """An Ollama folder: the Modelfile's TEMPLATE executed as Go's text/template does, its stop parameters, its
    GGUF in llama.cpp (the engine Ollama runs)."""

    def __init__(self, name: str, folder: Path, n_ctx: int = 1024):
        folder = Path(folder)
        if not (folder / "Modelfile").is_file():
            raise UsageError(f"no Modelfile in {folder}", "give the folder `mlxtune export --format ollama` wrote")
        self.modelfile = read_modelfile(folder / "Modelfile")
        gguf_file = (folder / (self.modelfile["from"] or "")).resolve()
        if not gguf_file.is_file():
            raise UsageError(f"the Modelfile's FROM {self.modelfile['from']} is not a file in {folder}",
                             "export the folder again")
        super().__init__(name, gguf_file, n_ctx)
        self.source = str(folder)
        self.template_name = ("the Modelfile's Go TEMPLATE" + (f" · GGUF: {self.template_name}" if self.template
                                                                else "") if self.modelfile["template"] is not None
                              else "none (Ollama's default)")

    def render(self, probe) -> Rendered:
        from mlxtune.verify.gotemplate import ollama_data, render

        if probe.messages is None:
            return Rendered(probe.text, self.tokenize(probe.text, True))
        template = self.modelfile["template"]
        if template is None:
            raise UsageError("the Modelfile has no TEMPLATE", "export the folder again")
        # Ollama offers tools and thinking only to a TEMPLATE that reads .Tools / .Think; others are refused with
        # "does not support tools/thinking".
        if probe.tools and ".Tools" not in template:
            raise Unsupported("its TEMPLATE reads no .Tools: Ollama answers 'does not support tools'")
        think = probe.switches.get("enable_thinking")
        if set(probe.switches) - {"enable_thinking"} or think is not None and ".Think" not in template:
            raise Unsupported("its TEMPLATE reads no .Think: Ollama refuses think and renders the default")
        text = render(template, ollama_data(probe.messages, probe.tools, think, self.modelfile["system"]))
        # Ollama tokenizes the rendered prompt with the model's special tokens, BOS first when the GGUF asks.
        add_bos = bool(self.llama_cpp.llama_vocab_get_add_bos(self.vocab))
        bos = self.token_text(self.llm.token_bos()) if add_bos else ""
        return Rendered(bos + text, self.tokenize(text, add_bos))

    def stops(self) -> StopSet:
        return StopSet(super().stops().ids, list(self.modelfile["stops"]))

    def greedy(self, rendered: Rendered, max_tokens: int, force: int | None = None, probe=None,
               stop_strings=()) -> Generation:
        return super().greedy(rendered, max_tokens, force, probe, self.modelfile["stops"])


def lmstudio_target(target) -> tuple[Path, str]:
    """A model as LM Studio keeps it: PUBLISHER/NAME/FILE.gguf (the folder, the file, or PUBLISHER/NAME inside LM
    Studio's models folder) or an MLX model folder (what `mlxtune export --format lmstudio` installs).
    Returns (path, "gguf" | "mlx")."""
    from mlxtune.export import lmstudio_models_dir

    path = Path(target)
    if not path.exists() and len(Path(target).parts) in (2, 3):
        path = lmstudio_models_dir() / target
    if path.is_file() and path.suffix == ".gguf":
        return path, "gguf"
    if (path / "config.json").is_file():
        return path, "mlx"
    # mmproj files are vision projectors beside the language model, not models (as `mlxtune pull lmstudio:` reads)
    files = sorted(p for p in path.glob("*.gguf") if not p.name.lower().startswith("mmproj")) if path.is_dir() else []
    if len(files) != 1:
        raise UsageError(f"{target}: {'several' if files else 'no'} model GGUF files in LM Studio's folder {path}",
                         "give PUBLISHER/NAME/FILE.gguf, or a folder holding one model (.gguf or MLX)")
    return files[0], "gguf"


def jinja_environment():
    """A Jinja environment set up as chat templates expect it (Hugging Face's and @huggingface/jinja's settings:
    blocks trimmed, loop controls, `tojson` keeping non-ASCII)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    return environment


class LmStudioHop(LlamaCppHop):
    """A GGUF in LM Studio's layout, prompted as LM Studio prompts it: the embedded Jinja template rendered by a
    Jinja engine (LM Studio's own is @huggingface/jinja; jinja2 with the same settings here) with the vocabulary's
    BOS/EOS text, the tools and the switches (its thinking toggle sets enable_thinking); then llama.cpp."""

    def __init__(self, name: str, gguf_file: Path, n_ctx: int = 1024, source: str | None = None):
        super().__init__(name, gguf_file, n_ctx)
        self.source = source or str(gguf_file)
        if self.template:
            self.template_name = describe_template(self.template, "the GGUF's embedded template") + " (Jinja)"

    def format_prompt(self, probe, bos: str, eos: str) -> str:
        def raise_exception(message):
            raise UsageError(f"chat template failed: {message}", "check the GGUF's embedded template")

        variables = {"messages": probe.messages, "add_generation_prompt": True, "bos_token": bos,
                     "eos_token": eos, "raise_exception": raise_exception, **probe.switches}
        if probe.tools:
            variables["tools"] = probe.tools
        return jinja_environment().from_string(self.template).render(**variables)


class ServeHop:
    """`mlxtune serve MODEL_OR_RUN` on a free local port: prompts rendered by its request code, answers over HTTP."""

    gives_logits = False  # an HTTP server gives no logits and takes no logit bias; its weights are the run's own

    def __init__(self, name: str, model_or_run, checkpoint: str = "last"):
        from mlxtune.serve import make_server
        from mlxtune.ui import quiet_stdout

        with quiet_stdout():
            self.server = make_server(model_or_run, "127.0.0.1", 0, checkpoint=checkpoint)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="mlxtune-verify-serve")
        self.thread.start()
        self.name = name
        self.source = f"http://127.0.0.1:{self.server.server_address[1]}/v1 ({self.server.source})"
        self.engine = self.server.engine
        self.format = self.server.chat_format
        self.template_name = self.format.name

    def render(self, probe) -> Rendered:
        if probe.messages is None:
            return Rendered(probe.text, self.engine.encode_text(probe.text))
        if probe.tools:
            raise Unsupported("mlxtune serve refuses 'tools' with a 400 error")
        if probe.switches:
            raise Unsupported("mlxtune serve takes no template switches: it renders the template's default")
        ids = self.engine.encode_chat(probe.messages)  # the server's own request path
        if self.format.kind != "template":
            return Rendered(None, ids)
        text = render_chat(self.engine.loaded.tokenizer, probe.messages, self.format.template, True)
        return Rendered(with_added_bos(self.engine.loaded.tokenizer, text, ids), ids)

    def stops(self) -> StopSet:
        return StopSet(set(self.engine.loaded.tokenizer.eos_token_ids), list(self.format.stops))

    def greedy(self, rendered: Rendered, max_tokens: int, force: int | None = None, probe=None) -> Generation:
        port = self.server.server_address[1]
        if probe.messages is None:
            route, body = "completions", {"prompt": probe.text}
        else:
            route, body = "chat/completions", {"messages": probe.messages}
        body.update({"model": self.server.model_id, "temperature": 0, "max_tokens": max_tokens})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/{route}", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.loads(response.read())
        choice = answer["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        return Generation(None, text, choice["finish_reason"] == "stop")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.engine.stop()
