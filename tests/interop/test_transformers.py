"""The `hf` export loads in transformers (PyTorch) and, from the same text, writes the same text as the MLX model."""

from __future__ import annotations

import json

import pytest
from mlx_lm.utils import load

from conftest import MODEL, mlx_greedy, run_cli

torch = pytest.importorskip("torch", reason="interop suite: pip install -e '.[interop]'")
transformers = pytest.importorskip("transformers")

PROMPTS = ["Once upon a time", "The little dog was", "table: players Q:"]
TEXTS = PROMPTS + ["Hello\nworld  with  spaces", "émigré 123 4567", "emoji 😀 🚀", "中文 日本語"]


def test_hf_export_of_a_run_matches_mlx_greedy(trained_run, tmp_path):
    run_dir, _ = trained_run
    out = tmp_path / "hf"
    result = run_cli("export", run_dir, "--format", "hf", "--out", out, "--json")
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and config["torch_dtype"] == "float32"

    model = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    model.eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    fused_dir = tmp_path / "fused"
    assert run_cli("fuse", run_dir, "--out", fused_dir).returncode == 0
    mlx_model, tokenizer = load(str(fused_dir))
    for text in TEXTS:
        assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text), text
    for prompt in PROMPTS:
        inputs = hf_tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=24, do_sample=False,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
        ids = tokenizer.encode(prompt)
        expected = tokenizer.decode(ids + mlx_greedy(mlx_model, ids, 24, eos=tokenizer.eos_token_id),
                                    skip_special_tokens=True)
        assert hf_tokenizer.decode(generated[0], skip_special_tokens=True) == expected, prompt
    # Every tokenizer file of the base travels with the export (llama.cpp's converter reads tokenizer.model).
    assert (out / "tokenizer.model").read_bytes() == (MODEL / "tokenizer.model").read_bytes()
