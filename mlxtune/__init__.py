"""mlxtune: on-device LLM finetuning with MLX.

The command line (`mlxtune ...`) is a thin layer over the functions exported here::

    from mlxtune import LoraSettings, finetune, fuse_run, generate_text

    run = finetune(LoraSettings(model="examples/models/stories260K", data="examples/data/wikisql", iters=50))
    fuse_run(run.run_dir, "fused")
"""

__version__ = "0.1.0"

import os  # noqa: E402

# We report over-long examples ourselves, per split; transformers' per-sequence warning is noise here.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from mlxtune.backend import enable_fast_blas  # noqa: E402

enable_fast_blas()  # must run before anything imports mlx.core

from mlxtune.errors import MlxtuneError, UsageError, RunFailed  # noqa: E402
from mlxtune.settings import LoraSettings  # noqa: E402


def __getattr__(name):
    # Heavy imports (mlx, mlx_lm) only when a function that needs them is used.
    lazy = {
        "finetune": ("mlxtune.train.loop", "finetune"),
        "fuse_run": ("mlxtune.fuse", "fuse_run"),
        "generate_text": ("mlxtune.inference", "generate_text"),
        "chat_session": ("mlxtune.chat", "chat_session"),
        "validation_loss": ("mlxtune.train.validation", "validation_loss"),
        "evaluate_run": ("mlxtune.eval", "evaluate_run"),
        "make_server": ("mlxtune.serve", "make_server"),
    }
    if name in lazy:
        import importlib

        module, attr = lazy[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'mlxtune' has no attribute {name!r}")


__all__ = [
    "__version__",
    "MlxtuneError",
    "UsageError",
    "RunFailed",
    "LoraSettings",
    "finetune",
    "fuse_run",
    "generate_text",
    "chat_session",
    "validation_loss",
    "evaluate_run",
    "make_server",
]
