# Shared by quickstart.sh and test.sh: create/update .venv with mlxtune installed (plus extras given as "$1").
# On Linux, also point out (or, as root on Debian/Ubuntu, install) OpenBLAS: MLX's CPU wheel is ~40x slower without it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "mlxtune needs Python 3.10 or newer")'
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  echo "==> creating $ROOT/.venv"
  "$PYTHON" -m venv "$ROOT/.venv"
fi
VENV_PY="$ROOT/.venv/bin/python"
extras="${1:-}"
echo "==> installing mlxtune${extras:+[$extras]} into .venv"
# setuptools' "Editable installation" notice (a boxed warning about import shadowing) reads like an error; it is not.
PIP_QUIET_WARNINGS="ignore:Editable installation:UserWarning"
PYTHONWARNINGS="$PIP_QUIET_WARNINGS" "$VENV_PY" -m pip install --quiet --upgrade pip 2>&1 \
  | grep -v '^WARNING: Location' || true
PYTHONWARNINGS="$PIP_QUIET_WARNINGS" "$VENV_PY" -m pip install --quiet -e "$ROOT${extras:+[$extras]}" 2>&1 \
  | grep -v '^WARNING: Location' || true
"$VENV_PY" -c 'import mlxtune, mlx.core' || { echo "installation failed" >&2; exit 1; }
if [ "$(uname -s)" = "Linux" ]; then
  # mlxtune's own search decides whether a usable OpenBLAS/BLIS is present.
  if ! "$VENV_PY" -c 'import sys; from mlxtune.backend import find_blas; sys.exit(0 if find_blas() else 1)'; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1 && [ "${MLXTUNE_NO_APT:-}" != "1" ]; then
      echo "==> installing OpenBLAS (libopenblas0-pthread) so MLX's CPU matmuls are fast"
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread) >/dev/null 2>&1 \
        || echo "note: could not install libopenblas0-pthread; training still works, only slower" >&2
    else
      echo "note: install OpenBLAS for ~40x faster MLX on the CPU: sudo apt-get install libopenblas0-pthread" >&2
    fi
  fi
fi
