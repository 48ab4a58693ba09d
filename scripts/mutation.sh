#!/usr/bin/env bash
# Mutation check (not part of CI): mutmut changes one small thing at a time in the modules below (a `<` into `<=`,
# a constant into another, a call removed...) and runs the tests that cover that module. A mutant the tests don't
# notice ("survived") is either a missing test or a harmless change; docs/TESTING.md lists the ones judged harmless.
#
#   scripts/mutation.sh                  # all four modules (hours on 2 cores)
#   scripts/mutation.sh step             # one of: step checkpoint template fuse
#   PYTHON=/path/to/venv/bin/python MUTMUT_CHILDREN=2 scripts/mutation.sh step
#
# Runs in a scratch copy of the repository (mutmut writes a mutants/ tree there); needs mutmut in the venv:
#   .venv/bin/python -m pip install mutmut==3.3.1
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
CHILDREN="${MUTMUT_CHILDREN:-2}"

declare -A MODULE=(
  [step]="mlxtune/train/step.py"
  [checkpoint]="mlxtune/train/checkpoint.py"
  [template]="mlxtune/data/template.py"
  [fuse]="mlxtune/fuse.py"
)
declare -A TESTS=(
  [step]="tests/train/test_step.py"
  [checkpoint]="tests/train/test_resume.py"
  [template]="tests/data/test_template.py"
  [fuse]="tests/test_fuse.py tests/train/test_methods.py"
)

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(step checkpoint template fuse)

"$PY" -c 'import mutmut' 2>/dev/null || { echo "mutmut is not installed: $PY -m pip install mutmut==3.3.1" >&2; exit 2; }

for target in "${targets[@]}"; do
  module="${MODULE[$target]:-}"
  [ -n "$module" ] || { echo "unknown target $target (use: ${!MODULE[*]})" >&2; exit 2; }
  work="$(mktemp -d "${TMPDIR:-/tmp}/mlxtune-mutation-$target-XXXX")"
  # The repository without its venv, caches and earlier mutants; the package is copied whole so that the
  # unmutated modules import as usual.
  tar -C "$ROOT" --exclude=./.venv --exclude=./.git --exclude=./mutants --exclude='*/__pycache__' -cf - . \
    | tar -C "$work" -xf -
  {
    echo "[mutmut]"
    # The whole package goes through mutmut (so the other modules land in mutants/ beside the mutated one), but
    # only $module is mutated: every other file is listed in do_not_mutate.
    echo "paths_to_mutate=mlxtune/"
    echo "do_not_mutate="
    (cd "$work" && find mlxtune -name '*.py' ! -path "$module" | sort | sed 's/^/    /')
    echo "also_copy="
    echo "    examples/"
    echo "tests_dir="
    for t in ${TESTS[$target]}; do echo "    $t"; done
  } > "$work/setup.cfg"
  echo "== $target: mutating $module, tests ${TESTS[$target]} (in $work)"
  # mutants/ first on the path: the tests (and the CLI subprocesses they start) must import the mutated copy, not
  # an editable install of the checkout. MUTMUT_TIMEOUT stops a long run early; what was checked is kept.
  (cd "$work" && PYTHONPATH="$work/mutants" timeout "${MUTMUT_TIMEOUT:-0}" "$PY" -m mutmut run --max-children "$CHILDREN" \
    || true)
  (cd "$work" && PYTHONPATH="$work/mutants" "$PY" -m mutmut results) | tee "$ROOT/mutation-$target.txt"
  echo "surviving mutants of $target: $ROOT/mutation-$target.txt (inspect one: cd $work && $PY -m mutmut show NAME)"
done
