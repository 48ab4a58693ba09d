#!/usr/bin/env bash
# Mutation check (not part of CI): mutmut changes one small thing at a time in the modules below (a `<` into `<=`,
# a constant into another, a call removed...) and runs the tests that cover that module. A mutant the tests don't
# notice ("survived") is either a missing test or a harmless change; docs/TESTING.md lists the ones judged harmless.
#
#   scripts/mutation.sh                  # all four modules (an hour or more on 2 cores)
#   scripts/mutation.sh step             # one of: step checkpoint template fuse
#
# mutmut 2.5 runs in a venv of its own (.mutmut-venv, made on first use) and calls the project's .venv for the
# tests as a plain subprocess: mutmut 3's in-process pytest run never saw its own forced failure with this suite
# (docs/TESTING.md). Everything happens in a scratch copy of the repository; the checkout is never mutated.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
MUTMUT_VENV="${MUTMUT_VENV:-$ROOT/.mutmut-venv}"

declare -A MODULE=(
  [step]="mlxtune/train/step.py"
  [checkpoint]="mlxtune/train/checkpoint.py"
  [template]="mlxtune/data/template.py"
  [fuse]="mlxtune/fuse.py"
)
declare -A TESTS=(
  [step]="tests/train/test_step.py"
  [checkpoint]="tests/train/test_resume.py tests/reliability/test_resume_faults.py"
  [template]="tests/data/test_template.py tests/data/test_conventions.py"
  [fuse]="tests/test_fuse.py tests/train/test_methods.py"
)

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(step checkpoint template fuse)
for target in "${targets[@]}"; do
  [ -n "${MODULE[$target]:-}" ] || { echo "unknown target $target (use: ${!MODULE[*]})" >&2; exit 2; }
done

"$PY" -c 'import mlxtune' 2>/dev/null || { echo "no project venv at $PY: run scripts/test.sh first" >&2; exit 2; }
if [ ! -x "$MUTMUT_VENV/bin/python" ]; then
  python3 -m venv "$MUTMUT_VENV"
  "$MUTMUT_VENV/bin/python" -m pip install --quiet "mutmut==2.5.1"
fi

for target in "${targets[@]}"; do
  module="${MODULE[$target]}"
  work="$(mktemp -d "${TMPDIR:-/tmp}/mlxtune-mutation-$target-XXXX")"
  tar -C "$ROOT" --exclude=./.venv --exclude=./.mutmut-venv --exclude=./.git --exclude='*/__pycache__' -cf - . \
    | tar -C "$work" -xf -
  echo "== $target: mutating $module, tests ${TESTS[$target]} (in $work)"
  # The scratch copy first on the path: the tests and the CLI subprocesses they start import the mutated module,
  # not the editable install of the checkout.
  runner="env PYTHONPATH=$work $PY -m pytest -x -q -p no:cacheprovider ${TESTS[$target]}"
  (cd "$work" && "$MUTMUT_VENV/bin/python" -m mutmut run --paths-to-mutate "$module" --tests-dir tests \
    --runner "$runner" || true)  # mutmut exits non-zero whenever a mutant survives
  (cd "$work" && "$MUTMUT_VENV/bin/python" -m mutmut results) | tee "$ROOT/mutation-$target.txt"
  echo "surviving mutants of $target: $ROOT/mutation-$target.txt (one in full: cd $work && $MUTMUT_VENV/bin/python -m mutmut show ID)"
done
