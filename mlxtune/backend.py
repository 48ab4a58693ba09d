"""Make MLX fast where it runs: on Linux, bind its matmuls to an optimized BLAS before mlx is imported.

MLX's Linux CPU wheel ships a reference BLAS (≈4 GFLOP/s on 2 cores); a system OpenBLAS loaded with RTLD_GLOBAL
before `mlx.core` is first imported takes its place (≈185 GFLOP/s). `MLXTUNE_BLAS=/path/lib.so` picks the library,
`MLXTUNE_BLAS=none` turns the hook off. The first use checks a matmul against numpy.
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

_state = {"library": None, "reason": "not attempted", "checked": False}


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
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        _state["reason"] = f"could not load {path}: {exc}"
        return None
    _state["library"], _state["reason"] = path, "loaded"
    return path


def blas_status() -> dict:
    return dict(_state)


def check_blas() -> bool:
    """Compare one MLX matmul with numpy; warn (once) if an injected BLAS gives wrong numbers."""
    if _state["checked"] or _state["library"] is None:
        return True
    _state["checked"] = True
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((64, 48), np.float32), rng.standard_normal((48, 32), np.float32)
    ours = np.array(mx.matmul(mx.array(a), mx.array(b)))
    if np.allclose(ours, a.astype(np.float64) @ b.astype(np.float64), rtol=1e-4, atol=1e-4):
        return True
    _state["reason"] = "loaded but gave wrong results"
    warnings.warn(f"{_state['library']} gives wrong matmul results in MLX; set MLXTUNE_BLAS=none", RuntimeWarning)
    return False
