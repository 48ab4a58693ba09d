"""The import graph: no circle, and no module imports one from a higher layer (read from the source, not imported).

Function-level imports count too: a lazy import hides a circle from Python, not from the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mlxtune"

# Lowest first. A module may import modules of its own layer or below. New modules must be placed here.
LAYERS = [
    ("foundation", ["errors", "paths", "ui", "backend", "synthetic", "model_config", "settings", "cli_options", "storage", "faults"]),
    # memory/: the budget, the limits and the estimate sit with the model facts; its planner and guard with the
    # training components; the plans of preference runs and of `mlxtune plan` with the training commands.
    ("model facts", ["memory", "cpu_quantized", "cpu_activations", "library", "hub", "models"]),
    ("run layout", ["runs"]),
    ("data", ["data"]),
    ("training components", ["train", "memory.planner", "memory.guard"]),
    # Training knows nothing of the commands that use its runs: `dpo --from` merges (fuse) before it starts.
    ("training commands", ["train.loop", "train.preference", "train.distributed", "memory.preference",
                           "memory.report", "memory.grpo", "train.grpo.objective", "train.grpo.update", "train.grpo.run"]),
    # Prompt formats, generation and conversations: what chat, serve, eval, verify and export share.
    ("inference", ["inference"]),
    ("commands", ["fuse", "chat", "serve", "export", "importers", "eval", "doctor", "data.check", "verify"]),
    ("entry points", ["cli", "__main__", "__init__"]),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> int:
    """The layer of the longest matching prefix in LAYERS."""
    best, best_len = None, -1
    for number, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = number, len(prefix)
    assert best is not None, f"mlxtune.{module} is in no layer: add it to LAYERS in {__file__}"
    return best


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from mlxtune.data import cache` imports the module mlxtune.data.cache
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            if name.startswith("mlxtune."):
                short = name.removeprefix("mlxtune.")
                while short and short not in known:
                    short = short.rpartition(".")[0]
                if short:
                    found.add(short)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}
    # A submodule always loads its package's __init__; only the explicit edges matter here.
    return {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}


def test_no_import_reaches_up_a_layer():
    upward = [f"mlxtune.{source} ({LAYERS[_layer(source)][0]}) imports mlxtune.{target} ({LAYERS[_layer(target)][0]})"
              for source, targets in _graph().items() for target in targets if _layer(target) > _layer(source)]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_circle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            raise AssertionError("import circle: " + " -> ".join(f"mlxtune.{m}" for m in cycle))


def test_every_layer_entry_names_a_module():
    """No stale entries: each name in LAYERS is a module or package that exists."""
    modules = set(_modules())
    stale = [prefix for _, prefixes in LAYERS for prefix in prefixes
             if not any(m == prefix or m.startswith(prefix + ".") for m in modules)]
    assert not stale, f"LAYERS names modules that no longer exist: {stale}"
