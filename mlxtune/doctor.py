"""`mlxtune doctor`: what this machine gives MLX, measured — the first thing to paste into a bug report."""

from __future__ import annotations

import os
import platform
import time
from importlib import metadata

from mlxtune.backend import blas_status, check_blas, jit_status
from mlxtune.paths import mlxtune_home

LIBRARIES = ("mlx", "mlx-lm", "numpy", "transformers", "huggingface-hub", "click", "rich", "PyYAML")


def _cpu_name() -> str:
    if platform.system() == "Darwin":
        import subprocess

        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return None


def measure_matmul_gflops(size: int = 1024, repeats: int = 3) -> float:
    """float32 matmul throughput on MLX's default device (best of a few runs)."""
    import mlx.core as mx

    a = mx.random.normal((size, size))
    b = mx.random.normal((size, size))
    mx.eval(a @ b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def mlx_cpu_kernels() -> dict:
    """How MLX's compiled CPU kernels are built here (backend.py's `enable_fast_jit`) and whether the blocks' SwiGLU
    goes through the exp form (cpu_activations.py)."""
    from mlxtune.cpu_activations import fast_swiglu_wanted

    jit = jit_status()
    return {"compiler_flags": jit["flags"], "directory": jit["directory"], "status": jit["reason"],
            "fast_swiglu": fast_swiglu_wanted()}


def diagnose(measure: bool = True) -> dict:
    import mlx.core as mx

    check_blas()
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    metal = {"available": bool(mx.metal.is_available())} if hasattr(mx, "metal") else {"available": False}
    if metal["available"]:
        info = mx.metal.device_info()
        metal["device"] = info.get("device_name")
        metal["recommended_working_set_gb"] = info.get("max_recommended_working_set_size", 0) / 1e9
    try:
        from huggingface_hub import constants

        hf_cache = constants.HF_HUB_CACHE
    except ImportError:
        hf_cache = None
    blas = blas_status()
    report = {
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "memory_gb": _memory_gb(),
        "mlx_device": str(mx.default_device()),
        "metal": metal,
        "blas": {"library": blas["library"], "status": blas["reason"], "openblas_coretype": blas["coretype"]
                 or os.environ.get("OPENBLAS_CORETYPE")},
        "mlx_cpu_kernels": mlx_cpu_kernels(),
        "versions": versions,
        "model_library": str(mlxtune_home() / "models"),
        "hf_cache": hf_cache,
        "offline": os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"),
    }
    from mlxtune.memory.budget import machine_budget

    budget, source = machine_budget()
    report["memory_budget_gb"], report["memory_budget_source"] = budget / 1e9, source
    from mlxtune.cpu_quantized import policy

    report["quantized_layers"] = policy(budget)
    if measure:
        report["matmul_gflops"] = measure_matmul_gflops()
    return report
