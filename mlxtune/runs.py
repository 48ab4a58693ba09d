"""The run directory: the one place that knows its layout, and how to open a run (or a model) for inference.

    runs/<name>/
      config.yaml              the settings the run was started with (CONFIG_FILE)
      run.json                 data facts: kind, template origin, example counts, adapter config (RUN_FILE)
      chat_template.jinja      the template training rendered with, when it was not the model's own (TEMPLATE_FILE)
      adapters.safetensors     the latest adapter, mlx-lm layout (ADAPTER_FILE + ADAPTER_CONFIG_FILE)
      adapter_config.json
      best/                    the adapter with the lowest validation loss so far (BEST_DIR)
      checkpoints/step-NNNNNNN/ resumable checkpoints; checkpoints/latest names the newest (CHECKPOINTS_DIR);
                               each holds the adapter, OPTIMIZER_FILE, STATE_FILE and MANIFEST_FILE
      metrics.jsonl, loss.png, result.json
      verify.json              what `mlxtune verify` found, hop by hop (VERIFY_FILE)
      eval.json, report.html   what `mlxtune eval` found: base vs tuned (EVAL_FILE, EVAL_REPORT_FILE; --out elsewhere)
      .mlxtune-run             written when mlxtune creates the directory (RUN_MARKER): only a marked directory
                               is ever reset, and then only of the files above
      .lock                    the writer's lock (LOCK_FILE; train/recovery.py)
    a dpo/orpo run adds:
      preference.yaml          the objective's own settings (PREFERENCE_FILE); config.yaml stays a LoRA config
      reference_logps.npz      precomputed reference log-probs per pair (REFERENCE_FILE)
      sft-merged/              with --from: the supervised run's adapter merged into its base (MERGED_BASE)
"""

from __future__ import annotations

import json
import re
import os
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from mlxtune.errors import UsageError
from mlxtune.settings import LoraSettings, load_run_settings

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
TEMPLATE_FILE = "chat_template.jinja"
ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
RESULT_FILE = "result.json"
FUSE_REPORT_FILE = "mlxtune_fuse.json"  # in a fused model's folder: its run, checkpoint, data kind and fuse check
PREFERENCE_FILE = "preference.yaml"  # a dpo/orpo run's objective settings (config.yaml stays a plain LoRA config)
GRPO_FILE = "grpo.yaml"  # a grpo run's objective settings (rewards, group size, loss type, …)
SAMPLES_FILE = "samples.jsonl"  # a grpo run's completions with their rewards, every --sample-every steps
VERIFY_FILE = "verify.json"
EVAL_FILE = "eval.json"
EVAL_REPORT_FILE = "report.html"  # `mlxtune eval`'s self-contained page (FUSE_REPORT_FILE is fuse's JSON)
BEST_DIR = "best"
CHECKPOINTS_DIR = "checkpoints"
LATEST_POINTER = "latest"  # a file in CHECKPOINTS_DIR holding the newest checkpoint's directory name
REFERENCE_FILE = "reference_logps.npz"
MERGED_BASE = "sft-merged"
LOCK_FILE = ".lock"  # the PID of the process writing the run (train/recovery.py takes and releases it)
# A checkpoint directory's own files, beside the adapter (train/checkpoint.py writes them).
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"  # sizes and SHA-256 of the checkpoint's other files; written last
RUN_MARKER = ".mlxtune-run"  # proof that mlxtune created the directory (a folder of the user's is never reset)
# What each entry of the layout must be when present: anything else is a one-line error, not a traceback.
LAYOUT_FILES = (CONFIG_FILE, RUN_FILE, METRICS_FILE, RESULT_FILE, ADAPTER_FILE, ADAPTER_CONFIG_FILE, TEMPLATE_FILE,
                f"{CHECKPOINTS_DIR}/{LATEST_POINTER}")
LAYOUT_DIRS = (BEST_DIR, CHECKPOINTS_DIR)


def default_run_dir(model_name: str, objective: str | None = None) -> Path:
    """runs/<model>[-<objective>]-<date>-<time>: where a run goes without --out."""
    kind = f"-{objective}" if objective else ""
    return Path("runs") / f"{model_name}{kind}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def follow_up_run_dir(from_run: str | Path, objective: str) -> Path:
    """runs/<supervised run>-<objective>: a preference run started --from a supervised one, without --out."""
    return Path("runs") / f"{Path(from_run).name}-{objective}"


def checkpoint_name(step: int) -> str:
    """`step-NNNNNNN`: zero-padded so that names sort in step order."""
    return f"step-{step:07d}"


@dataclass
class Run:
    path: Path
    settings: LoraSettings
    info: dict

    @property
    def base_model(self) -> Path:
        return Path(self.settings.model)

    @property
    def data_kind(self) -> str:
        return self.info.get("data_kind", "text")

    @property
    def chat_template(self) -> str | None:
        """The template training used when it was not the model's own (fallback or --chat-template file)."""
        path = self.path / TEMPLATE_FILE
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def adapter_dir(self, checkpoint: str = "last") -> Path:
        if checkpoint == "last":
            folder = self.path
        elif checkpoint == "best":
            folder = self.path / BEST_DIR
        else:
            try:
                folder = self.path / CHECKPOINTS_DIR / checkpoint_name(int(checkpoint))
            except ValueError:
                raise UsageError(f"unknown checkpoint {checkpoint!r}", "use best, last or a step number") from None
        if not (folder / ADAPTER_FILE).is_file():
            available = sorted(p.name for p in (self.path / CHECKPOINTS_DIR).glob("step-*"))
            raise UsageError(f"no adapter for checkpoint {checkpoint!r} in {self.path}",
                             f"available: best, last{', ' if available else ''}{', '.join(available)}")
        for name in (ADAPTER_FILE, ADAPTER_CONFIG_FILE):  # a run's files are its own: never read through a link out
            if (folder / name).is_symlink() and not (folder / name).resolve().is_relative_to(self.path.resolve()):
                raise UsageError(f"{folder / name} is a link to {(folder / name).resolve()}, outside the run",
                                 "replace the link with a copy of the file")
        return folder


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / RUN_FILE).is_file()


def mark_run_dir(path: Path) -> None:
    """Say that mlxtune created `path` (a new file: a link or file planted under the marker's name is an error)."""
    from mlxtune.storage import create_file  # storage reads this layout for its disk-full hint

    try:
        create_file(Path(path) / RUN_MARKER, "created by mlxtune: this folder may be reset while nothing is trained\n")
    except FileExistsError:
        if not is_marked(path):  # a link or folder planted under the marker's name: not ours
            raise UsageError(f"{Path(path) / RUN_MARKER} is not mlxtune's marker (a link or a folder)",
                             "choose a new or empty --out folder") from None


def is_marked(path: Path) -> bool:
    """Whether mlxtune created `path`: its marker is a plain file (not a link someone planted)."""
    try:
        return stat.S_ISREG(os.lstat(Path(path) / RUN_MARKER).st_mode)
    except OSError:
        return False


def check_layout(path: Path) -> None:
    """A UsageError (one line, with what to do) when an entry of the run's layout is the wrong kind of thing:
    a folder named metrics.jsonl, a file named checkpoints, config.yaml as a link out of the run..."""
    path = Path(path)
    for name in LAYOUT_FILES + LAYOUT_DIRS:
        entry = path / name
        if not (entry.exists() or entry.is_symlink()):
            continue
        want_dir = name in LAYOUT_DIRS
        if entry.is_symlink() and not entry.resolve().is_relative_to(path.resolve()):
            problem = f"a link to {entry.resolve()}, outside the run"
        elif want_dir and not entry.is_dir():
            problem = "not a folder"
        elif not want_dir and not entry.is_file():
            problem = "not a file" if entry.exists() else "a broken link"
        else:
            continue
        raise UsageError(f"{entry} is {problem}: this run directory is damaged",
                         f"move {entry} away (mlxtune writes it{' as a folder' if want_dir else ''}), then run again")


def read_run_settings(path: Path, cls=LoraSettings):
    """The run's config.yaml as settings; a file that isn't text is a one-line error, not a traceback."""
    try:
        return load_run_settings(path, cls)
    except (UnicodeDecodeError, IsADirectoryError) as exc:
        raise UsageError(f"{path} is not a readable settings file ({type(exc).__name__})",
                         "restore it from a backup, or start a new run with --out") from None


def open_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"run directory not found: {path}", "give the directory `mlxtune lora` wrote (runs/<name>)")
    check_layout(path)
    if not is_run_dir(path):
        raise UsageError(f"{path} is not an mlxtune run (no {CONFIG_FILE}/{RUN_FILE})",
                         "give the directory `mlxtune lora` wrote")
    try:
        info = json.loads((path / RUN_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path / RUN_FILE} is damaged ({type(exc).__name__})",
                         "restore it from a backup; the checkpoints and config.yaml are unaffected") from None
    if not isinstance(info, dict):
        raise UsageError(f"{path / RUN_FILE} is damaged (not a JSON object)", "restore it from a backup")
    return Run(path.resolve(), read_run_settings(path / CONFIG_FILE), info)


def check_output(out: str | Path, *, run: str | Path | None = None, base_model: str | Path | None = None,
                 library_entries=()) -> None:
    """Refuse an output that is, contains or lies inside what the command reads: the run, its base model, or a
    library model in use. With --overwrite such an output would delete its own input (or every run beside it)."""
    target = Path(out).expanduser().resolve()
    protected = [("the run", run), ("its base model", base_model)]
    protected += [("the library model", entry) for entry in library_entries]
    for what, path in protected:
        if path is None:
            continue
        path = Path(path).expanduser().resolve()
        if target == path:
            relation = "is"
        elif path.is_relative_to(target):
            relation = "contains"
        elif target.is_relative_to(path):
            relation = "lies inside"
        else:
            continue
        raise UsageError(f"--out {out} {relation} {what} {path}: writing it would destroy what it is made from",
                         "choose an --out outside it, e.g. --out fused/NAME")


@dataclass
class LoadedModel:
    """A model ready for inference, with the facts that decide how its prompts are rendered (which template:
    data/template.py's `choose_template`, through inference.prompt_format — not decided here)."""

    model: object
    tokenizer: object  # mlx-lm TokenizerWrapper
    config: dict
    own_template: str | None  # the model's own chat template (a model folder's chat_template.jinja, else the tokenizer's)
    trained_template: Path | None  # a run's copy of the template it trained with, when not the model's own
    source: str  # what to tell the user was loaded
    path: Path  # the model directory (a run's base model)
    run: Run | None = None
    data_kind: str | None = None  # what the run (or the run a fused model came from) trained on: text | completion | chat


def open_for_inference(model_or_run: str | Path, checkpoint: str = "last", *, adapter: bool = True,
                       console=None, float32_on_cpu: bool = False) -> LoadedModel:
    """Load a run (its base model + the `checkpoint` adapter, unless `adapter` is False) or a model reference, with
    what the template choice needs: the run's saved template, the model's own (a model directory's
    chat_template.jinja, as fuse writes it, wins over its tokenizer's) and the data kind trained on.

    `float32_on_cpu`: on the CPU backend, compute a half-precision model in float32 where it fits
    (`models.compute_in_float32`: MLX has no fast float16 matmul there, ~10× slower) — for the commands that only
    compute (chat, generate, serve, eval, verify), never for those that write the weights (fuse, export)."""
    from mlxtune.models import compute_in_float32, load_model, resolve_model  # loading sits above this layout

    if is_run_dir(model_or_run):
        run = open_run(model_or_run)
        adapter_dir = run.adapter_dir(checkpoint) if adapter else None
        model, tokenizer, config = load_model(run.base_model, adapter_dir)
        saved = run.path / TEMPLATE_FILE
        model.eval()
        if float32_on_cpu:
            compute_in_float32(model)
        source = f"{run.base_model} + {run.path}" if adapter else str(run.base_model)
        return LoadedModel(model, tokenizer, config, getattr(tokenizer, "chat_template", None),
                           saved if saved.is_file() else None, source, run.base_model, run, run.data_kind)
    path = resolve_model(model_or_run, console=console)
    model, tokenizer, config = load_model(path)
    template = getattr(tokenizer, "chat_template", None)
    if (path / TEMPLATE_FILE).is_file():
        template = (path / TEMPLATE_FILE).read_text(encoding="utf-8")
    model.eval()
    if float32_on_cpu:
        compute_in_float32(model)
    # fused_data_kind: a model fused from a run trained on plain text continues raw text, as the run itself does
    return LoadedModel(model, tokenizer, config, template, None, str(path), path, data_kind=fused_data_kind(path))


def fused_data_kind(path: Path) -> str | None:
    """The data kind of the run a fused model folder came from (its FUSE_REPORT_FILE), or None."""
    try:
        kind = json.loads((Path(path) / FUSE_REPORT_FILE).read_text(encoding="utf-8")).get("data_kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def runs_using(path: Path, runs_dir: Path = Path("runs")) -> list[Path]:
    """The run directories in `runs_dir` (./runs, where runs go by default) trained on the model at `path`."""
    target = Path(path).resolve()
    found = []
    for run in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        try:
            base = json.loads((run / RUN_FILE).read_text(encoding="utf-8")).get("base_model")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(base, str) and Path(base).resolve() == target:
            found.append(run)
    return found


def remove_unused_model(name: str, force: bool = False):
    """`models rm`: delete a library entry unless a run trains on it or (without `force`) runs in ./runs use it."""
    from mlxtune.library import library_dir, remove_model

    return remove_model(name, force=force, used_by=runs_using(library_dir() / name))


def resume_command(where: Path) -> str | None:
    """How to continue the run `where` is (or lies in) once its settings are saved: after a full disk the same
    command would be refused ("run directory already exists"), --resume continues from the last checkpoint."""
    for folder in [Path(where), *Path(where).parents][:4]:
        if (folder / CONFIG_FILE).is_file() and any((folder / name).is_file() for name in (RUN_MARKER, RUN_FILE)):
            if (folder / GRPO_FILE).is_file():
                return f"mlxtune grpo --resume {folder}"
            preference = folder / PREFERENCE_FILE
            found = re.search(r"^objective:\s*(\w+)", preference.read_text("utf-8", "replace"), re.M) if (
                preference.is_file()) else None
            return f"mlxtune {found[1] if found else 'lora'} --resume {folder}"
    return None


def explain_disk_full(error):
    """A `storage.DiskFull` inside a run: its hint names the run's `--resume` command instead of "run it again"."""
    from mlxtune.storage import DiskFull

    resume = resume_command(error.where) if isinstance(error, DiskFull) else None
    return error.then(f"continue the run: {resume}") if resume else error
