"""`mlxtune verify`: after a short real LoRA run on stories260K (no chat template: mlxtune's fallback template), every
hop — fused, re-quantized, a GGUF in llama.cpp, the Ollama folder, `mlxtune serve` — renders, stops and answers like
base + adapter; and each hop broken on purpose is caught and named."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import MODEL, run_cli
from ollama_store import PARAMS, TEMPLATE, make_ollama_store
from mlxtune.verify.gotemplate import ollama_data, render

PROBE_OPTIONS = {"samples": 1, "max_tokens": 12}
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Qwen3's shape, small: tools in a system block, tool calls and responses, and an enable_thinking switch that writes
# an empty <think> block when thinking is off.
THINKING = """{%- if tools %}<|im_start|>system
# Tools
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}<|im_start|>assistant
{% if message.tool_calls %}{% for call in message.tool_calls %}<tool_call>{{ call.function | tojson }}</tool_call>\
{% endfor %}{% else %}{{ message.content }}{% endif %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>{{ message.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif %}{% endif %}"""


def _chat_records(count: int) -> list[dict]:
    names, things = ["Tom", "Lily", "Ben", "Mia"], ["ball", "cat", "cake", "boat"]
    records = []
    for i in range(count):
        name, thing = names[i % 4], things[(i // 4) % 4]
        messages = [{"role": "system", "content": "You tell tiny stories."}] if i % 3 == 0 else []
        if i % 4 == 1:
            messages += [{"role": "user", "content": f"Who is {name}?"},
                         {"role": "assistant", "content": f"{name} is a child."}]
        messages += [{"role": "user", "content": f"Tell me about {name} and the {thing}."},
                     {"role": "assistant", "content": f"{name} had a {thing}. {name} was happy."}]
        records.append({"messages": messages})
    return records


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A real LoRA run on chat data with the bundled story model (fallback template), and its exports beside it."""
    from mlxtune.settings import LoraSettings
    from mlxtune.train.loop import finetune

    root = tmp_path_factory.mktemp("verify")
    data = root / "data"
    data.mkdir()
    records = _chat_records(40)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:34]))
    (data / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[34:]))
    run_dir = root / "runs" / "demo"
    finetune(LoraSettings(model=str(MODEL), data=str(data), out=str(run_dir), iters=12, learning_rate=1e-2,
                          batch_size=4, max_seq_length=96, eval_every=12, save_every=12, val_batches=1))
    return run_dir


@pytest.fixture(scope="module")
def exports(chat_run):
    pytest.importorskip("llama_cpp", reason="interop suite: pip install -e '.[interop]'")
    from mlxtune.export import export

    return {"gguf": Path(export(chat_run, "gguf", outtype="f32").path),
            "ollama": Path(export(chat_run, "ollama").path)}


@pytest.fixture(scope="module")
def fused(chat_run, tmp_path_factory):
    from mlxtune.fuse import fuse_run

    out = tmp_path_factory.mktemp("fused") / "fused"
    fuse_run(chat_run, out)
    return out


def test_every_hop_passes_with_the_fallback_template_named(chat_run, exports):
    from mlxtune.eval import evaluate_run

    evaluate_run(chat_run, samples=0, max_tokens=4)  # the run's report.html, which verify adds its section to
    result = run_cli("verify", chat_run, "--samples", 1, "--max-tokens", 12, "--requantize", "8,4", "--json")
    assert result.returncode == 0, result.stderr + result.stdout
    report = json.loads(result.stdout)
    assert report["ok"] and report["end_of_turn"] == {"text": "</s>", "ids": [2]}
    names = [hop["name"] for hop in report["hops"]]
    assert names == ["fused", "fused-q8", "fused-q4", "gguf demo-f32.gguf", "ollama demo-ollama", "serve"]
    assert len(report["probes"]) == 5  # one held-out record + the four fixed probes
    for hop in report["hops"]:
        assert "mlxtune's fallback template" in hop["template"], hop
        assert hop["rendering"]["ok"] and hop["stopping"]["ok"], hop
    by_name = {hop["name"]: hop for hop in report["hops"]}
    assert by_name["fused"]["teacher_forced"]["agreement"] == 1.0  # float32 fuse: exact
    assert by_name["fused"]["greedy"]["same"] == 5
    assert by_name["fused-q4"]["teacher_forced"]["loss_delta"] > by_name["fused-q8"]["teacher_forced"]["loss_delta"]
    assert by_name["fused-q4"]["thresholds"] == {"kept": 0.75} and by_name["fused-q4"]["teacher_forced"]["kept"] > 0.75
    # The fallback template reads `tools`: the tool call renders the same through the fused model and llama.cpp;
    # Ollama's derived TEMPLATE and the server don't take tools, and say so.
    assert [by_name[name]["features"]["tool call"]["status"] for name in names] == [
        "same", "same", "same", "same", "unsupported", "unsupported"]
    assert json.loads((chat_run / "verify.json").read_text())["ok"]
    html = (chat_run / "report.html").read_text()
    section = html[html.index("<h2 id=verify>"):]
    assert "every hop renders, stops and answers like base + adapter" in section
    assert section.count("<span class=pass>pass</span>") == len(names) and "demo-ollama" in section


def _skip_layer_adapter(fused: Path, out: Path, layer: int) -> Path:
    """A fuse that forgot one layer's adapter: that layer's weights put back to the base's."""
    import mlx.core as mx

    shutil.copytree(fused, out)
    weights = mx.load(str(out / "model.safetensors"))
    base = mx.load(str(MODEL / "model.safetensors"))
    prefix = f"model.layers.{layer}."
    changed = [k for k in weights if k.startswith(prefix) and k in base and not mx.array_equal(weights[k], base[k])]
    assert changed, "the adapter must have changed that layer"
    mx.save_safetensors(str(out / "model.safetensors"), {**weights, **{k: base[k] for k in changed}},
                        metadata={"format": "mlx"})
    return out


def _other_template(fused: Path, out: Path) -> Path:
    shutil.copytree(fused, out)
    (out / "chat_template.jinja").write_text(CHATML)
    return out


def _problems(result, name: str) -> str:
    hop = next(h for h in result.hops if h.name == name)
    return " | ".join(hop.problems)


def test_broken_fuse_and_server_are_caught(chat_run, fused, tmp_path):
    from mlxtune.verify import verify_run

    skipped = _skip_layer_adapter(fused, tmp_path / "skipped", layer=1)
    result = verify_run(chat_run, hops=["fused"], fused=skipped, **PROBE_OPTIONS)
    problems = _problems(result, "fused")
    assert not result.ok and ("teacher-forced agreement" in problems or "loss differs" in problems), problems
    assert result.hops[0].rendering["ok"]  # the template is intact: only the numbers say it

    templated = _other_template(fused, tmp_path / "chatml")
    result = verify_run(chat_run, hops=["fused", "serve"], fused=templated, serve=templated, **PROBE_OPTIONS)
    for name in ("fused", "serve"):
        assert _problems(result, name).startswith("rendering: "), _problems(result, name)
        difference = next(h for h in result.hops if h.name == name).rendering["difference"]
        assert "<|im_start|>" in difference["hop"] and "### User:" in difference["training"]
    # The CLI says which hop broke what, with the first difference, and exits 1.
    cli = run_cli("verify", chat_run, "--hops", "serve", "--serve", templated, "--samples", 1, "--max-tokens", 4)
    assert cli.returncode == 1, cli.stderr
    assert "serve: rendering: 5 of 5 prompts differ" in cli.stdout, cli.stdout
    assert "first difference at character 3" in cli.stdout, cli.stdout  # <s>### User: vs <s><|im_start|>


def test_broken_gguf_and_ollama_are_caught(chat_run, exports, tmp_path):
    import gguf

    from mlxtune.verify import verify_run

    no_eos = tmp_path / "no-eos.gguf"
    shutil.copy(exports["gguf"], no_eos)
    reader = gguf.GGUFReader(str(no_eos), "r+")
    key = reader.fields["tokenizer.ggml.eos_token_id"].parts[1]  # the key's bytes, renamed in place: gone
    key[:] = list(b"tokenizer.ggml.xxx_token_id")
    reader.data.flush()
    del reader

    stopless, changed = tmp_path / "stopless", tmp_path / "changed"
    for folder in (stopless, changed):
        shutil.copytree(exports["ollama"], folder)
    modelfile = (stopless / "Modelfile").read_text()
    (stopless / "Modelfile").write_text(modelfile.replace('PARAMETER stop "</s>"\n', ""))
    modelfile = (changed / "Modelfile").read_text()
    assert '"\\n\\n### Assistant:\\n"' in modelfile
    (changed / "Modelfile").write_text(modelfile.replace('"\\n\\n### Assistant:\\n"', '"\\n### Assistant: "'))

    result = verify_run(chat_run, hops=["gguf", "ollama"], gguf=[no_eos], ollama=[stopless, changed],
                        **PROBE_OPTIONS)
    assert [h.ok for h in result.hops] == [False, False, False]
    assert _problems(result, "gguf no-eos.gguf") == \
        "stopping: end of turn '</s>' (id 2) is not in the stop set (stop ids [])"
    assert _problems(result, "ollama stopless").startswith("stopping: end of turn '</s>'")
    assert _problems(result, "ollama changed").startswith("rendering: 5 of 5 prompts differ")


def _chatml_model(out: Path, template: str = CHATML, thinking: bool = False) -> Path:
    """A random-weight llama whose tokenizer has ChatML's markers as special tokens and <|im_end|> as EOS, like
    SmolLM2-Instruct; its tokenizer adds a BOS that the template doesn't write. `thinking`: <think> and </think>
    are added (not special) tokens, as in Qwen3 (mlx-lm then renders with enable_thinking=True by default)."""
    from mlxtune.synthetic import build_random_model

    added = [("<|im_start|>", True), ("<|im_end|>", True)] + ([("<think>", False), ("</think>", False)]
                                                              if thinking else [])
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 512 + len(added), "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 512,
              "tie_word_embeddings": False}
    build_random_model(config, out, seed=3, chat_template=template)
    tokenizer_json = json.loads((out / "tokenizer.json").read_text())
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    for offset, (token, special) in enumerate(added):
        info = {"content": token, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                "special": special}
        tokenizer_json["added_tokens"].append({"id": 512 + offset, **info})
        tokenizer_config.setdefault("added_tokens_decoder", {})[str(512 + offset)] = info
    tokenizer_config["eos_token"] = "<|im_end|>"
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return out


# Ollama's own ChatML TEMPLATE: renders every conversation as CHATML does (the legacy TEMPLATE keeps only the last
# user message, so a multi-turn chat renders otherwise).
GO_CHATML = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"


def test_export_keeps_an_ollama_template_only_where_it_renders_as_trained(tmp_path, monkeypatch):
    """A model pulled from an Ollama store keeps its TEMPLATE at `export --format ollama` where that TEMPLATE renders
    the probes as the chat template training uses (verbatim, its stops plus the end of turn); a legacy one that
    drops earlier turns is replaced by a derived TEMPLATE, with one line saying why; `--keep-template` writes the
    original, and the export of a run on it — verified by default — exits 1 naming the hop."""
    pytest.importorskip("llama_cpp", reason="interop suite: pip install -e '.[interop]'")
    from mlxtune.errors import UsageError
    from mlxtune.export import export
    from mlxtune.importers import pull_gguf
    from mlxtune.settings import LoraSettings
    from mlxtune.train.loop import finetune

    model = _chatml_model(tmp_path / "chatml")
    gguf_file = export(model, "gguf", tmp_path / "cm.gguf", outtype="f32").path
    store = tmp_path / "ollama"
    make_ollama_store(store, Path(gguf_file), "cm", "chatml", GO_CHATML, {"stop": ["<|im_start|>"], "num_ctx": 256})
    make_ollama_store(store, Path(gguf_file), "cm", "legacy", TEMPLATE, PARAMS)
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    same, legacy = (pull_gguf(f"ollama:cm:{tag}", name=f"cm-{tag}").path for tag in ("chatml", "legacy"))

    kept = export(same, "ollama", tmp_path / "same")
    assert kept.warnings == []
    text = (tmp_path / "same" / "Modelfile").read_text()
    assert 'TEMPLATE """' + GO_CHATML + '"""' in text
    assert [line for line in text.splitlines() if line.startswith("PARAMETER")] == [
        'PARAMETER stop "<|im_start|>"', 'PARAMETER stop "<|im_end|>"', "PARAMETER num_ctx 256"]  # + end of turn
    with pytest.raises(UsageError, match="--keep-template is for --format ollama"):
        export(same, "gguf", keep_template=True)
    with pytest.raises(UsageError, match="no Ollama TEMPLATE to keep"):
        export(model, "ollama", tmp_path / "none", keep_template=True)

    exported = export(legacy, "ollama", tmp_path / "derived")
    assert exported.warnings == [
        "Ollama's TEMPLATE from the import was not kept: it renders the 'multi-turn' probe otherwise than the chat "
        "template the model was trained with; wrote one derived from the chat template instead (--keep-template "
        "writes the original)"], exported.warnings
    derived = (tmp_path / "derived" / "Modelfile").read_text()
    assert TEMPLATE not in derived and "PARAMETER temperature 0.2" in derived  # the import's parameters stay
    # (a derived TEMPLATE passing verify: test_chatml_thinking_and_tools_reach_every_hop and the SmolLM2 test)

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _chat_records(12)))
    run_dir = tmp_path / "runs" / "cm"
    finetune(LoraSettings(model=legacy, data=str(data), out=str(run_dir), iters=2, learning_rate=1e-2, batch_size=4,
                          max_seq_length=96, eval_every=2, save_every=2, val_batches=1))
    result = run_cli("export", run_dir, "--format", "ollama", "--out", tmp_path / "kept", "--keep-template")
    assert result.returncode == 1, result.stderr + result.stdout
    assert "ollama kept: rendering: 2 of 5 prompts differ" in result.stdout, result.stdout
    assert 'TEMPLATE """' + TEMPLATE + '"""' in (tmp_path / "kept" / "Modelfile").read_text()


def _edit_gguf_template(source: Path, out: Path, old: str, new: str) -> Path:
    """A copy of `source` whose embedded chat template has `old` replaced by `new` (same length, in place)."""
    import gguf

    assert len(old) == len(new)
    shutil.copy(source, out)
    reader = gguf.GGUFReader(str(out), "r+")
    value = reader.fields["tokenizer.chat_template"].parts[-1]
    text = bytes(value).decode()
    assert old in text
    value[:] = list(text.replace(old, new).encode())
    reader.data.flush()
    del reader
    return out


def test_chatml_thinking_and_tools_reach_every_hop(tmp_path, monkeypatch):
    """A ChatML template with tools and an enable_thinking switch (Qwen3's shape): the end of turn is <|im_end|>,
    the BOS the tokenizer adds in front of the template reaches llama.cpp, LM Studio and Ollama (llama.cpp's server
    rule; Ollama's tokenizer); the tool call and both thinking settings render byte for byte in the fused model,
    llama.cpp and LM Studio, and Ollama and serve say they don't take them. A GGUF whose embedded template writes
    the thinking-off block differently is caught in LM Studio, by the switch's probe alone."""
    pytest.importorskip("llama_cpp", reason="interop suite: pip install -e '.[interop]'")
    from mlxtune.export import export
    from mlxtune.settings import LoraSettings
    from mlxtune.train.loop import finetune
    from mlxtune.verify import verify_run

    model = _chatml_model(tmp_path / "chatml", THINKING, thinking=True)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _chat_records(20)))
    run_dir = tmp_path / "runs" / "cm"
    finetune(LoraSettings(model=str(model), data=str(data), out=str(run_dir), iters=3, learning_rate=1e-2,
                          batch_size=4, max_seq_length=96, eval_every=3, save_every=3, val_batches=1))
    gguf_file = Path(export(run_dir, "gguf", outtype="f32").path)
    export(run_dir, "ollama")
    # LM Studio's layout: PUBLISHER/NAME/FILE.gguf in its models folder, named as `mlxtune pull lmstudio:` names it
    lms = tmp_path / "lms"
    (lms / "someone" / "cm").mkdir(parents=True)
    (lms / "someone" / "cm" / gguf_file.name).hardlink_to(gguf_file)
    (lms / "someone" / "cm-thonk").mkdir()
    _edit_gguf_template(gguf_file, lms / "someone" / "cm-thonk" / "cm.gguf", "</think>", "</thonk>")
    monkeypatch.setenv("LMSTUDIO_MODELS_DIR", str(lms))
    result = verify_run(run_dir, hops=["fused", "gguf", "ollama", "lmstudio", "serve"],
                        lmstudio=["someone/cm", lms / "someone" / "cm-thonk"], **PROBE_OPTIONS)
    assert result.end_of_turn == {"text": "<|im_end|>", "ids": [513]}
    assert [h.name for h in result.hops] == ["fused", "gguf cm-f32.gguf", "ollama cm-ollama",
                                              "lmstudio someone/cm", "lmstudio someone/cm-thonk", "serve"]
    hops = {h.name: h for h in result.hops}
    assert [name for name, hop in hops.items() if not hop.ok] == ["lmstudio someone/cm-thonk"], [(n, h.problems) for n, h in hops.items()]
    assert hops["lmstudio someone/cm-thonk"].problems == ["thinking off: renders differently from training's template"]
    assert hops["lmstudio someone/cm-thonk"].rendering["ok"]  # the template's default path is untouched
    for name in ("fused", "gguf cm-f32.gguf", "lmstudio someone/cm"):
        assert {k: f["status"] for k, f in hops[name].features.items()} == {
            "tool call": "same", "thinking on": "same", "thinking off": "same"}, (name, hops[name].features)
    assert {k: f["status"] for k, f in hops["ollama cm-ollama"].features.items()} == dict.fromkeys(
        ["tool call", "thinking on", "thinking off"], "unsupported")
    assert "reads no .Think" in hops["ollama cm-ollama"].features["thinking off"]["detail"]
    assert "refuses 'tools'" in hops["serve"].features["tool call"]["detail"]
    assert "renders the template's default" in hops["serve"].features["thinking off"]["detail"]
    assert "(Jinja)" in hops["lmstudio someone/cm"].template
    for hop in result.hops:
        assert "513" in hop.stopping["detail"] or "<|im_end|>" in hop.stopping["detail"], hop.stopping
    modelfile = (run_dir.parent / "cm-ollama" / "Modelfile").read_text()
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


GO_PROGRAM = """package main
import ("encoding/json"; "os"; "text/template")
func main() {
    var data map[string]any
    json.Unmarshal([]byte(os.Args[2]), &data)
    template.Must(template.New("t").Parse(os.Args[1])).Execute(os.Stdout, data)
}
"""
# Templates in the style Ollama ships (ChatML with $last, legacy .System/.Prompt) and mlxtune's derived one.
GO_TEMPLATES = [
    '{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n'
    '<|im_start|>{{ .Role }}\n{{ .Content }}{{ if not $last }}<|im_end|>\n{{ end }}'
    '{{- if and $last (ne .Role "assistant") }}<|im_end|>\n<|im_start|>assistant\n{{ end }}{{- end }}',
    '{{ if .System }}<|system|>\n{{ .System }}</s>\n{{ end }}{{ if .Prompt }}<|user|>\n{{ .Prompt }}</s>\n{{ end }}'
    '<|assistant|>\n{{ .Response }}',
    '{{- $prev := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{ "S:" }}{{ .Content }}'
    '{{- else if eq .Role "user" }}{{- if eq $prev "assistant" }}{{ "</s>\\n" }}{{- else }}{{ "U:" }}{{- end }}'
    '{{ .Content }}{{ "\\n\\nA:\\n" }}{{- else if eq .Role "assistant" }}{{ .Content }}{{- end }}'
    '{{- $prev = .Role }}{{- end }}',
    '{{ with .System }}[{{ . }}]{{ else }}none{{ end }} {{ len .Messages }} {{ index .Messages 0 | print }}',
]
GO_MESSAGES = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ünï 中文 😀"},
     {"role": "assistant", "content": "ok"}, {"role": "user", "content": ""}],
]


@pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed (apt-get install golang-go)")
def test_go_template_renderer_matches_go(tmp_path):
    program = tmp_path / "render.go"
    program.write_text(GO_PROGRAM)
    binary = tmp_path / "render"
    build = subprocess.run(["go", "build", "-o", str(binary), str(program)], capture_output=True, text=True,
                           env={**__import__("os").environ, "GOCACHE": str(tmp_path / "cache"), "GO111MODULE": "off"})
    assert build.returncode == 0, build.stderr
    for template in GO_TEMPLATES:
        for messages in GO_MESSAGES:
            data = ollama_data(messages)
            expected = subprocess.run([str(binary), template, json.dumps(data)], capture_output=True,
                                      text=True).stdout
            ours = render(template, data)
            # Go prints a message map as map[Content:… Role:…]; ours too, keys sorted
            assert ours == expected, (template, messages)


def test_unknown_hop_is_a_usage_error(chat_run):
    result = run_cli("verify", chat_run, "--hops", "fused,vllm")
    assert result.returncode == 2 and "unknown hop 'vllm'" in result.stderr
    assert re.search(r"hint: choose from fused, fused-q8", result.stderr)
    result = run_cli("verify", chat_run, "--requantize", "8,3")
    assert result.returncode == 2 and "--requantize 3: not a bit width" in result.stderr, result.stderr
    result = run_cli("verify", chat_run, "--hops", "gguf", "--gguf", chat_run.parent / "missing.gguf")
    assert result.returncode == 2 and "not found: " in result.stderr and "missing.gguf" in result.stderr
    bogus = chat_run.parent / "bogus.gguf"
    bogus.write_text("not a GGUF")
    result = run_cli("verify", chat_run, "--hops", "gguf", "--gguf", bogus, "--json")
    bogus.unlink()
    report = json.loads(result.stdout)
    assert result.returncode == 1 and report["hops"][0]["problems"][0].startswith("could not load: "), report
