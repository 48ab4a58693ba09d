"""The `mlxtune` process's entry point: `python -m mlxtune` and the `mlxtune` console script."""

from __future__ import annotations


def run() -> None:
    from mlxtune.backend import hide_torch

    hide_torch()  # before transformers is first imported: a second off every start (backend.py says why)
    from mlxtune.cli import main

    main()


if __name__ == "__main__":
    run()
