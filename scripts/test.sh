#!/usr/bin/env bash
# Install mlxtune with its test extras into .venv and run the test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/_venv.sh "test"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
