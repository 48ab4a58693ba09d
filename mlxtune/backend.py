"""Make MLX fast where it runs: on Linux, bind its matmuls to an optimized BLAS before mlx is imported.

MLX's Linux CPU wheel ships a reference BLAS (≈4 GFLOP/s on 2 cores); a system OpenBLAS loaded with RTLD_GLOBAL
before `mlx.core` is first imported takes its place (≈185 GFLOP/s). `MLXTUNE_BLAS=/path/lib.so` picks the library,
`MLXTUNE_BLAS=none` turns the hook off. The first use checks a matmul against numpy.

Also the command's start-up: `hide_torch` keeps transformers (which mlx-lm's tokenizer code imports) from importing
PyTorch, which no command uses.
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform
import sys
import warnings

CANDIDATES = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/blis-pthread/libblis.so.4",
    "/usr/lib/*-linux-gnu/libblis.so.4",
)

_state = {"library": None, "reason": "not attempted", "checked": False, "coretype": None}
_handle: list = []  # the loaded library, for thread settings

# Debian's OpenBLAS 0.3.21 falls back to its slowest (Prescott) kernels on CPUs it doesn't recognise, such as
# virtualised Xeons: ≈35 GFLOP/s instead of ≈200. The kernel is picked from the CPU's own flags, so it only uses
# instructions the CPU has, and the first-use check below still compares results with numpy.
CORETYPE_BY_FLAGS = (
    ({"avx512f", "avx512bw", "avx512dq", "avx512vl"}, "SkylakeX"),
    ({"avx2", "fma"}, "Haswell"),
)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _choose_coretype(path: str) -> None:
    if "openblas" not in os.path.basename(path).lower() or os.environ.get("OPENBLAS_CORETYPE"):
        return
    flags = _cpu_flags()
    for needed, coretype in CORETYPE_BY_FLAGS:
        if needed <= flags:
            os.environ["OPENBLAS_CORETYPE"] = coretype  # read by OpenBLAS when it loads, just below
            _state["coretype"] = coretype
            return


def find_blas() -> str | None:
    for pattern in CANDIDATES:
        for path in sorted(glob.glob(pattern)):
            if os.path.isfile(path):
                return path
    return None


def enable_fast_blas() -> str | None:
    """Load an optimized BLAS globally if we are on Linux and mlx is not imported yet. Returns its path."""
    choice = os.environ.get("MLXTUNE_BLAS", "").strip()
    if platform.system() != "Linux":
        _state["reason"] = "not Linux (MLX uses Accelerate/Metal)"
        return None
    if choice.lower() in ("none", "off", "0"):
        _state["reason"] = "disabled by MLXTUNE_BLAS"
        return None
    if "mlx.core" in sys.modules and _state["library"] is None:
        _state["reason"] = "mlx was imported before mlxtune"
        return None
    path = choice or find_blas()
    if not path:
        _state["reason"] = "no OpenBLAS/BLIS found (install libopenblas0-pthread)"
        return None
    _choose_coretype(path)
    try:
        _handle.append(ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL))
    except OSError as exc:
        _state["reason"] = f"could not load {path}: {exc}"
        return None
    _state["library"], _state["reason"] = path, "loaded"
    return path


def set_blas_threads(threads: int) -> bool:
    """Use `threads` BLAS threads from now on (OpenBLAS or BLIS); False when no library of ours is loaded."""
    if not _handle:
        return False
    library = _handle[0]
    for setter in ("openblas_set_num_threads", "bli_thread_set_num_threads"):
        function = getattr(library, setter, None)
        if function is not None:
            function(ctypes.c_int(int(threads)))
            _state["threads"] = int(threads)
            return True
    return False


def blas_status() -> dict:
    return dict(_state)


IMPORT_TORCH = "MLXTUNE_IMPORT_TORCH"


def hide_torch() -> bool:
    """Mark torch absent for this process (`sys.modules["torch"] = None`: `importlib.util.find_spec` then answers
    None and `import torch` fails). Transformers imports all of PyTorch whenever `find_spec("torch")` finds it —
    1.2–1.5 s of CPU at every command's start, about half of it, for a library no command uses; marked absent,
    it settles on "no torch" (tests/test_backend.py checks it still asks that way). Only the command's process
    does this (`python -m mlxtune`, the console script); `MLXTUNE_IMPORT_TORCH=1` turns it off. True when marked."""
    if "torch" in sys.modules or os.environ.get(IMPORT_TORCH) == "1":
        return False
    sys.modules["torch"] = None
    return True


def unhide_torch() -> None:
    """Let user code loaded into the command (a reward function) import torch after all."""
    if "torch" in sys.modules and sys.modules["torch"] is None:
        del sys.modules["torch"]


def torch_was_hidden(exc: BaseException) -> bool:
    """True for the ImportError `hide_torch` causes: a library imported torch without asking `find_spec` first (a
    transformers upgrade, say); the command then starts again with `MLXTUNE_IMPORT_TORCH=1`."""
    return isinstance(exc, ImportError) and sys.modules.get("torch", 0) is None and "torch" in str(exc)


class BlasMismatch(RuntimeError):
    """The injected BLAS computed a wrong matmul: the process must restart without it (MLXTUNE_BLAS=none)."""


def check_blas() -> None:
    """Compare MLX matmuls (both transpose cases) with float64 numpy once; raise BlasMismatch if they differ."""
    if _state["checked"] or _state["library"] is None:
        return
    _state["checked"] = True
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((67, 129), np.float32), rng.standard_normal((129, 45), np.float32)
    expected = a.astype(np.float64) @ b.astype(np.float64)
    plain = np.array(mx.matmul(mx.array(a), mx.array(b)))
    transposed = np.array(mx.matmul(mx.array(a), mx.array(np.ascontiguousarray(b.T)).T))
    if all(np.allclose(result, expected, rtol=1e-4, atol=1e-4) for result in (plain, transposed)):
        return
    _state["reason"] = "loaded but gave wrong results"
    warnings.warn(f"{_state['library']} gives wrong matmul results in MLX; not using it", RuntimeWarning)
    raise BlasMismatch(_state["library"])
