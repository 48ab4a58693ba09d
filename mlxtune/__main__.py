"""The `mlxtune` process's entry point: `python -m mlxtune` and the `mlxtune` console script."""

from __future__ import annotations


def run() -> None:
    from mlxtune.backend import enable_fast_jit, hide_torch

    hide_torch()  # before transformers is first imported: a second off every start (backend.py says why)
    enable_fast_jit()  # before MLX compiles a kernel: its CPU kernels with vector instructions (backend.py)
    from mlxtune.cli import main

    main()


if __name__ == "__main__":
    run()
