"""Make MLX fast where it runs: on Linux, bind its matmuls to an optimized BLAS before mlx is imported.

MLX's Linux CPU wheel ships a reference BLAS (≈4 GFLOP/s on 2 cores); a system OpenBLAS loaded with RTLD_GLOBAL
before `mlx.core` is first imported takes its place (≈185 GFLOP/s). `MLXTUNE_BLAS=/path/lib.so` picks the library,
`MLXTUNE_BLAS=none` turns the hook off. The first use checks a matmul against numpy.

Also MLX's CPU kernel compiler: `enable_fast_jit` has it use the CPU's vector instructions. And the command's
start-up: `hide_torch` keeps transformers (which mlx-lm's tokenizer code imports) from importing PyTorch, which no
command uses.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import platform
import shlex
import stat
import sys
import tempfile
import warnings
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------------------------
# MLX's CPU kernel compiler

JIT_ENV = "MLXTUNE_JIT"  # "off": MLX compiles its CPU kernels as it always does
USER_TMPDIR_ENV = "MLXTUNE_USER_TMPDIR"  # the temporary directory the command started with
# what MLX's own command adds when MLX itself was built for AVX2, and no multiply-add fused unless the code says fma
JIT_FLAGS = ("-mavx2", "-mfma", "-mf16c", "-ffp-contract=off")
JIT_CPU_FLAGS = {"avx2", "fma", "f16c"}
_jit = {"flags": None, "directory": None, "reason": "not attempted"}


def switched_off(variable: str) -> bool:
    """True when the environment variable turns a speed-up off (`off`, `none` or `0`)."""
    return os.environ.get(variable, "").strip().lower() in ("off", "none", "0")


SHIM_MARK = "# mlxtune (backend.py, enable_fast_jit): MLX's CPU kernels with vector instructions"


def _shim_script(compiler: str) -> str:
    return f'#!/bin/sh\n{SHIM_MARK}\nexec {shlex.quote(compiler)} {" ".join(JIT_FLAGS)} "$@"\n'


def jit_directory(compiler: str) -> Path:
    """Where the kernels built by `compiler` with the flags are kept: the user's cache (not MLXTUNE_HOME: every model
    library on this machine shares them), apart from MLX's own `$TMPDIR/mlx`, whose kernels were compiled without the
    flags. Named by the whole compiler command: MLX finds a kernel by its name alone, so a directory holds only
    kernels one command built (another compiler or other flags, another directory)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    command = hashlib.sha256(_shim_script(compiler).encode()).hexdigest()[:12]
    return Path(cache) / "mlxtune" / "mlx-jit" / f"avx2-fma-{command}"


def _real_compiler() -> str | None:
    """The first `g++` on PATH that is not one of our shims (a child process inherits the PATH its parent set)."""
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(entry or ".") / "g++"
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        try:
            with open(candidate, "rb") as head:
                if SHIM_MARK.encode() in head.read(256):
                    continue
        except OSError:
            continue
        return str(candidate.resolve())
    return None


def _private_directory(path: Path) -> bool:
    """`path` exists (made if needed) as a real directory of this user that no one else can write to: the compiler
    shim and the kernels MLX loads from it run as this user's code."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.lstat()
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


def enable_fast_jit() -> str | None:
    """Have MLX compile its fused CPU kernels with the CPU's vector instructions. Returns the kernel directory.

    `mx.compile` on the CPU backend writes each fused elementwise kernel as C++ and builds it with
    `g++ -std=c++17 -O3 -fPIC -shared`, adding `-mavx2 -mfma -mf16c` only when MLX itself was built for AVX2 — the
    Linux wheel (0.32.4) is not. Without them every `fma` in the kernels' `exp` is a call into libm: a compiled
    `exp` ran at ≈20 ns an element here, ≈4.5 ns with them, and the SwiGLU of every block (cpu_activations.py)
    with it. `-ffp-contract=off` as well: the compiler then uses FMA only where MLX's code calls `fma` (libm's
    `fmaf` rounds exactly as the instruction does) and never fuses a multiply and an add by itself, so each kernel
    computes bit for bit what MLX's own build computes (tests/test_backend.py) — a run with it resumes exactly a
    run without it. So, for MLX only: a `g++` that adds the flags comes first on PATH, and TMPDIR (where MLX keeps
    its kernels, `$TMPDIR/mlx/<version>/cpu`, looked up at each compile) points at a directory of our own, named by
    the whole compiler command (`jit_directory`). Python's own temporary files stay in the directory the command
    started with, in its child processes too (MLXTUNE_USER_TMPDIR). Only on Linux x86-64 CPUs that have the
    instructions, where g++ is installed; `MLXTUNE_JIT=off` turns it off. Metal and CUDA don't compile CPU kernels:
    nothing changes there. The command's process calls it (`__main__.run`), before MLX compiles anything; child
    processes inherit it. (Other programs the command starts see TMPDIR = this directory: a private one, so
    harmless.)"""
    if _jit["directory"] is not None:
        return _jit["directory"]
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        _jit["reason"] = "not Linux on x86-64 (MLX's own compiler flags)"
        return None
    if switched_off(JIT_ENV):
        _jit["reason"] = f"disabled by {JIT_ENV}"
        return None
    if not JIT_CPU_FLAGS <= _cpu_flags():
        _jit["reason"] = f"this CPU lacks {', '.join(sorted(JIT_CPU_FLAGS - _cpu_flags()))}"
        return None
    compiler = _real_compiler()
    if compiler is None:
        _jit["reason"] = "no g++ (MLX then runs its CPU kernels uncompiled)"
        return None
    try:
        directory = jit_directory(compiler)
    except (RuntimeError, KeyError):  # no home directory to keep them in (Path.home)
        _jit["reason"] = "no home directory for the kernels"
        return None
    shim = directory / "bin" / "g++"
    script = _shim_script(compiler)
    try:
        if not (_private_directory(directory) and _private_directory(shim.parent)):
            _jit["reason"] = f"{directory} is not a private directory of this user"
            return None
        if not shim.is_file() or shim.read_text(encoding="utf-8") != script:
            partial = shim.with_name(f".g++.{os.getpid()}")
            partial.write_text(script, encoding="utf-8")
            partial.chmod(0o700)
            os.replace(partial, shim)
    except OSError as exc:
        _jit["reason"] = f"could not write {shim}: {exc.strerror or exc}"
        return None
    # Python's temporary files stay in the user's directory: decided now, before TMPDIR changes, and handed down to
    # child processes (a distributed rank, a reward's sandbox), which inherit the changed TMPDIR.
    user_tmp = os.environ.get(USER_TMPDIR_ENV) or tempfile.gettempdir()
    tempfile.tempdir = user_tmp
    os.environ[USER_TMPDIR_ENV] = user_tmp
    os.environ["TMPDIR"] = str(directory)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != str(shim.parent):  # a child command inherits it already in place
        os.environ["PATH"] = f"{shim.parent}{os.pathsep}{path}"
    _jit.update(flags=" ".join(JIT_FLAGS), directory=str(directory), reason="enabled")
    return str(directory)


def jit_status() -> dict:
    return dict(_jit)


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
