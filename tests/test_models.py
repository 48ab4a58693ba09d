"""The model library: real conversions of stories260K (float16, 4- and 8-bit), the hub path through a real local
Hugging Face cache with HF_HUB_OFFLINE=1, and QLoRA on a quantized conversion."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import generate
from mlx_lm.utils import load
from rich.console import Console

from conftest import MODEL, WIKISQL, run_cli
from mlxtune import LoraSettings, UsageError, finetune
from mlxtune.hub import pull
from mlxtune.library import list_models, model_info, remove_model
from mlxtune.models import resolve_model
from mlxtune.ui import make_console

# Two TinyStories-style sentences: the text stories260K was trained on.
SENTENCES = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sunshine.",
    "One day, a big dog came to the park. The dog was very happy and wanted to play with the ball.",
]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Every conversion the tests compare, made once into a throwaway library."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLXTUNE_HOME", str(home))
        quiet = make_console(quiet=True)
        entries = {
            "f16": pull(str(MODEL), quantize="none", dtype="f16", console=quiet),
            "q8g32": pull(str(MODEL), quantize="8", group_size=32, console=quiet),
            "q8g64": pull(str(MODEL), quantize="8", group_size=64, console=quiet),
            "q4g32": pull(str(MODEL), quantize="4", group_size=32, console=quiet),
            "q4g64": pull(str(MODEL), quantize="4", group_size=64, console=quiet),
        }
        yield home, entries


def _log_probs(model, tokenizer) -> list[mx.array]:
    out = []
    for text in SENTENCES:
        ids = mx.array(tokenizer.encode(text))[None]
        logits = model(ids).astype(mx.float32)[0]
        out.append(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    return out


def _mean_kl(reference: list[mx.array], other: list[mx.array]) -> float:
    kls = [(mx.exp(p) * (p - q)).sum(axis=-1) for p, q in zip(reference, other)]
    return mx.concatenate(kls).mean().item()


def test_library_names_sizes_and_metadata(library):
    home, entries = library
    assert {e.name for e in entries.values()} == {
        "stories260K-f16", "stories260K-8bit-g32", "stories260K-8bit", "stories260K-4bit-g32", "stories260K-4bit"}
    assert entries["f16"].dtype == "float16" and entries["f16"].quantization is None
    assert entries["q4g32"].quantization == {"bits": 4, "group_size": 32}
    assert all(e.parameters == 260032 for e in entries.values())  # quantized weights counted unpacked
    assert entries["q4g64"].size_bytes < entries["q8g64"].size_bytes < entries["f16"].size_bytes
    for entry in entries.values():
        assert Path(entry.path).parent == home / "models"
        assert json.loads((Path(entry.path) / "config.json").read_text())["model_type"] == "llama"
    assert not list((home / "models").glob(".*")), "no staging directories left behind"


def test_float16_conversion_generates_like_the_original(library):
    _, entries = library
    original, tokenizer = load(str(MODEL))
    converted, _ = load(entries["f16"].path)
    for prompt in ("Once upon a time", "The little dog"):
        expected = generate(original, tokenizer, prompt, max_tokens=32)
        assert generate(converted, tokenizer, prompt, max_tokens=32) == expected


def test_quantized_next_token_distributions_stay_close(library):
    _, entries = library
    original, tokenizer = load(str(MODEL))
    reference = _log_probs(original, tokenizer)
    kl = {key: _mean_kl(reference, _log_probs(load(entries[key].path)[0], tokenizer))
          for key in ("f16", "q8g32", "q8g64", "q4g32", "q4g64")}
    print("mean KL (nats):", {k: round(v, 5) for k, v in kl.items()})
    assert kl["f16"] < 1e-4
    assert kl["q8g32"] < 0.01 and kl["q8g64"] < 0.01
    assert kl["q4g32"] < 0.1
    assert kl["q4g64"] < 0.2
    assert kl["q8g64"] < kl["q4g64"] and kl["q4g32"] < kl["q4g64"]  # more bits / smaller groups: closer


def test_pulling_again_reuses_the_entry(library):
    home, entries = library
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLXTUNE_HOME", str(home))
        before = os.stat(Path(entries["q4g64"].path) / "model.safetensors").st_mtime_ns
        again = pull(str(MODEL), quantize="4", console=make_console(quiet=True))
        assert again.name == entries["q4g64"].name
        assert os.stat(Path(again.path) / "model.safetensors").st_mtime_ns == before
        assert resolve_model("stories260K-4bit") == Path(entries["q4g64"].path)


def test_qlora_trains_on_the_4bit_model(library, tmp_path):
    home, entries = library
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLXTUNE_HOME", str(home))
        settings = LoraSettings(model="stories260K-4bit-g32", data=str(WIKISQL), out=str(tmp_path / "run"),
                                iters=12, learning_rate=3e-3, batch_size=4, max_seq_length=128, eval_every=12,
                                val_batches=2, report_every=4, save_every=12)
        output = io.StringIO()
        result = finetune(settings, console=Console(file=output, width=200))
    assert "QLORA on a 4-bit base" in output.getvalue()
    assert result.final_val_loss < result.initial_val_loss - 0.1
    run_info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_info["base_model"] == entries["q4g32"].path


def test_info_and_remove(library, tmp_path):
    home, entries = library
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLXTUNE_HOME", str(home))
        info = model_info("stories260K-8bit-g32")
        assert info["layers"] == 5 and info["quantization"]["bits"] == 8
        assert info["has_chat_template"] is False
        assert 0 < info["memory"]["inference_bytes"] < info["memory"]["lora_bytes"]
        copy = pull(str(MODEL), quantize="8", name="scratch", console=make_console(quiet=True))
        assert "scratch" in {e.name for e in list_models()}
        remove_model("scratch")
        assert not Path(copy.path).exists()
        with pytest.raises(UsageError, match="no model named 'scratch'"):
            remove_model("scratch")


# ------------------------------------------------------------------------------------- the hub, offline


def _populate_hf_cache(hf_home: Path, repo_id: str, source: Path) -> Path:
    """Lay `source` out exactly as huggingface_hub stores a downloaded snapshot (blobs, refs, snapshots)."""
    storage = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    for file in source.iterdir():
        if file.suffix not in (".json", ".safetensors", ".model"):
            continue
        data = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def _offline_env(tmp_path: Path) -> dict:
    return {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "MLXTUNE_HOME": str(tmp_path / "home")}


def _run_with(env: dict, *args):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return run_cli(*args)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


def test_cached_hub_model_is_pulled_offline_and_used_on_demand(tmp_path):
    _populate_hf_cache(tmp_path / "hf", "karpathy-test/stories260K", MODEL)
    env = _offline_env(tmp_path)

    # A hub id as --model: pulled (4-bit by default) into the library on first use, then generation runs.
    result = _run_with(env, "generate", "karpathy-test/stories260K", "-p", "Once upon a time", "-m", 8, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["text"].strip()
    listed = json.loads(_run_with(env, "models", "--json").stdout)["models"]
    assert [(m["name"], m["source"], m["quantization"]) for m in listed] == [
        ("stories260K-4bit", "karpathy-test/stories260K", {"bits": 4, "group_size": 64})]

    # An explicit pull of another quantization from the same cached snapshot.
    pulled = _run_with(env, "pull", "karpathy-test/stories260K", "-q", "8", "--json")
    assert pulled.returncode == 0, pulled.stderr
    assert json.loads(pulled.stdout)["name"] == "stories260K-8bit"


def test_missing_hub_model_offline_gives_one_line_error(tmp_path):
    (tmp_path / "hf").mkdir()
    result = _run_with(_offline_env(tmp_path), "pull", "nobody/not-cached")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == ("error: nobody/not-cached is not in the local Hugging Face cache "
                        "and the hub can't be reached")
    assert "mlxtune pull nobody/not-cached" in lines[1] and "local model directory" in lines[1]
    assert "Traceback" not in result.stderr


def test_remote_code_is_refused_unless_trusted(tmp_path):
    model = tmp_path / "custom"
    shutil.copytree(MODEL, model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_custom.py").write_text("# code a model repo could ship\n")
    env = {"MLXTUNE_HOME": str(tmp_path / "home")}
    refused = _run_with(env, "pull", model)
    assert refused.returncode == 2
    assert "modeling_custom.py" in refused.stderr and "--trust-remote-code" in refused.stderr
    assert _run_with(env, "pull", model, "--trust-remote-code", "-q", "none").returncode == 0


def test_unsupported_architecture_names_close_supported_ones(tmp_path):
    model = tmp_path / "typo"
    shutil.copytree(MODEL, model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "lama"
    (model / "config.json").write_text(json.dumps(config))
    result = _run_with({"MLXTUNE_HOME": str(tmp_path / "home")}, "pull", model)
    assert result.returncode == 2
    assert "architecture 'lama' is not supported by mlx-lm" in result.stderr
    assert "llama" in result.stderr.split("hint:")[1]


def test_lora_without_model_uses_the_default_base_and_says_how_to_get_it_offline(tmp_path):
    (tmp_path / "hf").mkdir()
    result = _run_with(_offline_env(tmp_path), "lora", "--data", WIKISQL, "--out", tmp_path / "run", "--iters", 1)
    assert result.returncode == 2
    assert "default base model Qwen/Qwen2.5-1.5B-Instruct" in " ".join(result.stdout.split())
    assert "error: Qwen/Qwen2.5-1.5B-Instruct is not in the local Hugging Face cache" in result.stderr
    assert not (tmp_path / "run").exists()


def test_models_info_and_rm_of_an_unknown_name_say_what_the_library_holds(tmp_path):
    env = _offline_env(tmp_path)
    for command in (("models", "info", "no-such-model"), ("models", "rm", "no-such-model")):
        result = _run_with(env, *command)
        assert result.returncode == 2
        assert "error: no model named 'no-such-model' in the library" in result.stderr
        assert "Traceback" not in result.stderr
