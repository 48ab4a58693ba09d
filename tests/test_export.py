"""Exports that need no outside client: the Ollama Modelfile's template (checked against the Jinja template it was
derived from), LM Studio installs, the LoRA GGUF's layout, and clear refusals."""

from __future__ import annotations

import importlib.util
import json
import os

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load

from conftest import MODEL, run_cli
from mlxtune.data.template import FALLBACK_CHAT_TEMPLATE, render_chat
from mlxtune.export.ollama import go_template, modelfile, render_like_ollama, stop_strings, template_pieces

CHATML = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Answer in SQL."}, {"role": "user", "content": "All players?"}],
    [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"}, {"role": "user", "content": "3?"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d\n\ne"}, {"role": "user", "content": "f"}],
]


@pytest.fixture(scope="module")
def tokenizer():
    return load(str(MODEL))[1]


@pytest.mark.parametrize("template", [FALLBACK_CHAT_TEMPLATE, CHATML], ids=["fallback", "chatml"])
def test_ollama_template_renders_like_the_jinja_template(tokenizer, template):
    pieces = template_pieces(tokenizer, template)
    bos = tokenizer.bos_token
    for messages in CONVERSATIONS:
        expected = render_chat(tokenizer, messages, template, add_generation_prompt=True)
        expected = expected[len(bos):] if expected.startswith(bos) else expected
        assert render_like_ollama(pieces, messages) == expected


def test_ollama_go_template_quotes_every_literal(tokenizer):
    text = go_template(template_pieces(tokenizer, FALLBACK_CHAT_TEMPLATE))
    # Literal text outside actions would lose its newlines to the {{- trimming: everything is inside {{ }}.
    outside = "".join(part.split("}}", 1)[-1] for part in text.split("{{")[1:])
    assert outside == ""
    assert '{{ "### User:\\n" }}' in text and '{{ "\\n\\n### Assistant:\\n" }}' in text


def test_modelfile_has_template_stops_and_parameters(tokenizer, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9}))
    text = modelfile("demo-f16.gguf", tokenizer, FALLBACK_CHAT_TEMPLATE, tmp_path, context_length=512)
    lines = text.splitlines()
    assert lines[0] == "FROM ./demo-f16.gguf"
    assert any(line.startswith('TEMPLATE """{{- $prev') for line in lines)
    assert 'PARAMETER stop "</s>"' in lines and 'PARAMETER stop "### User:"' in lines
    assert "PARAMETER temperature 0.6" in lines and "PARAMETER top_p 0.9" in lines
    assert "PARAMETER num_ctx 512" in lines
    assert stop_strings(tokenizer, None) == ["</s>"]


def test_ollama_export_of_a_run(trained_run, tmp_path):
    run_dir, _ = trained_run
    out = tmp_path / "ollama"
    result = run_cli("export", run_dir, "--format", "ollama", "--out", out, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", f"{run_dir.name}-f16.gguf"]
    assert report["next_step"].endswith(f"ollama run {run_dir.name.lower()}")
    # verified by default where llama.cpp's binding is installed: it renders, stops and answers like base + adapter
    if importlib.util.find_spec("llama_cpp") is not None:
        verified = report["verify"]
        assert verified["ok"] and [hop["name"] for hop in verified["hops"]] == ["ollama ollama"], verified
        assert verified["hops"][0]["template"] == "none (Ollama's default)"  # a text run: raw completion
    else:
        assert "verify" not in report
    # a text run has no chat template: the Modelfile is raw completion
    assert "TEMPLATE" not in (out / "Modelfile").read_text()


def test_lmstudio_install_goes_to_its_models_folder(trained_run, tmp_path):
    run_dir, _ = trained_run
    env = dict(os.environ, LMSTUDIO_MODELS_DIR=str(tmp_path / "lms"))
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "mlxtune", "export", str(run_dir), "--format", "lmstudio",
                           "--json", "--no-verify"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    installed = tmp_path / "lms" / "mlxtune" / run_dir.name
    assert json.loads(done.stdout)["path"] == str(installed)
    fused, tok = load(str(installed))
    tuned, _ = load(str(MODEL), adapter_path=str(run_dir))
    ids = mx.array(tok.encode("table: players"))[None]
    assert mx.abs(fused(ids) - tuned(ids)).max().item() < 1e-4


def test_lora_gguf_layout_and_alpha(trained_run, tmp_path):
    import gguf

    run_dir, _ = trained_run
    # Without --out the export goes beside the run (not into the current directory), and the CLI says where.
    result = run_cli("export", run_dir, "--format", "gguf-adapter", cwd=tmp_path)
    path = run_dir.parent / f"{run_dir.name}-lora.gguf"
    assert result.returncode == 0 and f"written: {path}" in " ".join(result.stdout.split()), result.stdout
    assert not list(tmp_path.iterdir())
    reader = gguf.GGUFReader(str(path))
    fields = reader.fields
    assert fields["general.type"].contents() == "adapter"
    assert fields["adapter.type"].contents() == "lora"
    assert fields["general.architecture"].contents() == "llama"
    assert fields["adapter.lora.alpha"].contents() == pytest.approx(16.0)  # scale 2 × rank 8
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 5 * 7 * 2  # 5 blocks × 7 linear layers × (A, B)
    a, b = tensors["blk.0.ffn_down.weight.lora_a"], tensors["blk.0.ffn_down.weight.lora_b"]
    assert a.data.shape == (8, 172) and b.data.shape == (64, 8)  # PEFT order: A rank×in, B out×rank
    weights = mx.load(str(run_dir / "adapters.safetensors"))
    np.testing.assert_allclose(a.data, np.array(weights["model.layers.0.mlp.down_proj.lora_a"]).T, rtol=1e-6)
    np.testing.assert_allclose(b.data, np.array(weights["model.layers.0.mlp.down_proj.lora_b"]).T, rtol=1e-6)
    path.unlink()


def test_exports_refuse_what_they_cannot_do(trained_run, tmp_path):
    run_dir, _ = trained_run
    not_a_run = run_cli("export", MODEL, "--format", "gguf-adapter", "--out", tmp_path / "x.gguf")
    assert not_a_run.returncode == 2 and "not a run directory" in not_a_run.stderr
    (tmp_path / "taken.gguf").write_text("keep")
    taken = run_cli("export", run_dir, "--format", "gguf", "--out", tmp_path / "taken.gguf")
    assert taken.returncode == 2 and "already exists" in taken.stderr
    assert (tmp_path / "taken.gguf").read_text() == "keep"
