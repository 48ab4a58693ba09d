"""Training methods and options end to end on the real model: full finetuning, and DoRA with --pack and
--chat-template through the CLI, fused into a model that still carries the template."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm import load

from conftest import MODEL, WIKISQL, run_cli
from mlxtune import LoraSettings, finetune
from mlxtune.ui import make_console

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_full_finetuning_trains_every_block_weight(tmp_path):
    run_dir = tmp_path / "full"
    result = finetune(LoraSettings(model=str(MODEL), data=str(WIKISQL), out=str(run_dir), method="full", iters=2,
                                   batch_size=2, max_seq_length=64, learning_rate=1e-3, val_batches=1,
                                   eval_every=100), console=make_console(quiet=True))
    base, _ = load(str(MODEL))
    block_weights = {k: v for k, v in tree_flatten(base.parameters()) if k.startswith("model.layers.")}
    assert result.trainable_parameters == sum(v.size for v in block_weights.values())
    saved = mx.load(str(run_dir / "adapters.safetensors"))
    assert saved.keys() == block_weights.keys()  # every block weight, and nothing else (embeddings stay frozen)
    changed = [k for k in saved if not np.array_equal(np.array(saved[k]), np.array(block_weights[k]))]
    assert len(changed) == len(saved)
    tuned, _ = load(str(MODEL), adapter_path=str(run_dir))  # mlx-lm loads a full finetune's weights too
    np.testing.assert_array_equal(np.array(dict(tree_flatten(tuned.parameters()))[changed[0]]),
                                  np.array(saved[changed[0]]))


def test_dora_with_packing_and_a_chat_template_file_then_fuse(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    records = [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."} for i in range(12)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:10]))
    (data / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[10:]))
    template_file = tmp_path / "template.jinja"
    template_file.write_text(TEMPLATE)
    run_dir = tmp_path / "run"
    result = run_cli("lora", "--model", MODEL, "--data", data, "--out", run_dir, "--method", "dora", "--pack",
                     "--chat-template", template_file, "--iters", 2, "--batch-size", 4, "--learning-rate", "1e-2",
                     "--max-seq-length", 128, "--val-batches", 1, "--eval-every", 100, "--json")
    assert result.returncode == 0, result.stderr
    assert "packed:" in result.stderr  # --pack reached the batch plan
    assert json.loads(result.stdout)["steps"] == 2

    adapter_config = json.loads((run_dir / "adapter_config.json").read_text())
    assert adapter_config["fine_tune_type"] == "dora"
    weights = mx.load(str(run_dir / "adapters.safetensors"))
    assert any(k.endswith(".m") for k in weights)  # DoRA's magnitude vectors
    info = json.loads((run_dir / "run.json").read_text())
    assert info["template_origin"].startswith("file:") and (run_dir / "chat_template.jinja").read_text() == TEMPLATE

    fused = tmp_path / "fused"
    result = run_cli("fuse", run_dir, "--out", fused, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["max_abs_diff"] < 1e-4
    assert (fused / "chat_template.jinja").read_text() == TEMPLATE
    _, tokenizer = load(str(fused))
    assert tokenizer.chat_template == TEMPLATE  # what mlx_lm.generate / chat render with
