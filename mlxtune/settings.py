"""One settings object per command, filled from defaults ← YAML (`--config`) ← flags.

YAML keys and flag names are the same words (`learning_rate` ↔ `--learning-rate`). The resolved settings are
saved in the run directory as `config.yaml`, so a run can always be repeated or resumed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mlxtune.errors import UsageError

METHODS = ("lora", "dora", "full")
SCHEDULES = ("cosine", "linear", "constant")
REPORT_TARGETS = ("wandb",)

# The largest value each setting can sensibly take. Past these a run never finishes (a step of 10^14
# micro-batches), overflows MLX's integers (`std::bad_cast` at --iters 1e21) or asks for more than any machine has;
# each is refused with its flag named. rank is also bounded by the model's hidden size (`fit_model`).
UPPER_BOUNDS = {
    "iters": 10**7,
    "warmup_steps": 10**7,
    "epochs": 10**4,
    "rank": 4096,
    "alpha": 10**6,
    "layers": 10**4,
    "batch_size": 2**16,
    "batch_tokens": 2**24,
    "grad_accumulation": 1024,
    "max_seq_length": 2**20,
    "eval_every": 10**7,
    "save_every": 10**7,
    "report_every": 10**7,
    "val_batches": 10**7,
    "patience": 10**6,
    "weight_decay": 10.0,
    "grad_clip": 10**6,
    "min_delta": 10**6,
    "threads": 4096,
    "cache_limit_gb": 10**4,  # 10 TB
    "beta": 10**4,  # dpo/orpo/grpo
    "group_size": 4096,  # grpo
    "max_completion_tokens": 2**20,
    "temperature": 100.0,
    "epsilon_low": 1.0,
    "epsilon_high": 100.0,
    "updates_per_batch": 1024,
    "sample_every": 10**7,
}


@dataclass
class LoraSettings:
    """Everything `mlxtune lora` needs. LoRA scale is `alpha / rank` (the PEFT meaning)."""

    model: str | None = None
    data: str | None = None
    out: str | None = None  # run directory; default runs/<model>-<timestamp>
    method: str = "lora"
    layers: int | None = None  # adapt the last N blocks; None = all blocks
    target_modules: list[str] | None = None  # e.g. [self_attn.q_proj, self_attn.v_proj]; None = every linear layer
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    learning_rate: float = 2e-4
    schedule: str = "cosine"
    warmup_steps: int | None = None  # None = 5% of the optimizer steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    iters: int | None = None  # optimizer steps; None = derived from epochs
    epochs: float = 1.0
    batch_size: int = 4
    batch_tokens: int | None = None  # token budget per micro-batch; default = batch_size × mean length (rounded up to 64)
    pack: bool | None = None  # True: several examples per row, isolated by the mask; None: length-bucketed budget; False + no budget: fixed batches
    grad_accumulation: int = 1
    grad_checkpoint: bool = False
    selective_loss: bool = True  # head + cross-entropy on supervised positions only (falls back when unsupported)
    max_seq_length: int | None = None  # None = min(2048, the model's context window), resolved by fit_model
    train_on_prompt: bool = False
    drop_long: bool = False  # drop (instead of truncate) examples over max_seq_length
    prompt_key: str | None = None  # custom prompt/completion field names, e.g. question/answer
    completion_key: str | None = None
    chat_template: str | None = None  # a Jinja file that overrides the model's template
    eval_every: int = 50
    val_batches: int = 25  # -1 = the whole validation set
    patience: int | None = None  # stop after this many evaluations without a better validation loss
    min_delta: float = 0.0  # an improvement smaller than this doesn't count
    save_every: int = 100
    report_every: int = 10
    seed: int = 0
    report_to: str | None = None  # "wandb" to also log metrics to Weights & Biases
    threads: int | None = None  # BLAS threads on the CPU backend; None = one per core (the library's default)
    memory: str | None = None  # memory budget, e.g. "16GB" (GB = 10^9 bytes); None = what this machine can give
    cache_limit_gb: float | None = None  # MLX buffer cache; None = MLX's default (measured: a bigger one only costs RSS)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def record_keys(self) -> tuple[str, str] | None:
        if self.prompt_key is None and self.completion_key is None:
            return None
        return (self.prompt_key or "prompt", self.completion_key or "completion")

    def dataset_options(self) -> dict:
        """The keyword arguments of `load_datasets` these settings imply."""
        assert self.max_seq_length is not None, "max_seq_length is resolved from the model: call fit_model first"
        return {"max_seq_length": self.max_seq_length, "train_on_prompt": self.train_on_prompt,
                "chat_template": self.chat_template, "seed": self.seed, "drop_long": self.drop_long,
                "keys": self.record_keys}

    def validate(self) -> "LoraSettings":
        _check_types(self)
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}", f"use one of {', '.join(METHODS)}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r}", f"use one of {', '.join(SCHEDULES)}")
        positive = {
            "rank": self.rank,
            "batch_size": self.batch_size,
            "grad_accumulation": self.grad_accumulation,
            "eval_every": self.eval_every,
            "save_every": self.save_every,
            "report_every": self.report_every,
        }
        if self.max_seq_length is not None:  # None: resolved from the model (fit_model)
            positive["max_seq_length"] = self.max_seq_length
        for name, value in positive.items():
            if value is None or value < 1:
                raise UsageError(f"{name} must be at least 1, got {value}", f"set --{name.replace('_', '-')}")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise UsageError(f"batch_tokens must be at least 1, got {self.batch_tokens}", "set --batch-tokens")
        if self.iters is not None and self.iters < 1:
            raise UsageError(f"iters must be at least 1, got {self.iters}", "set --iters or use --epochs")
        for name in ("learning_rate", "alpha", "dropout", "weight_decay", "grad_clip", "epochs", "min_delta",
                     "cache_limit_gb"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise UsageError(f"{name} must be a finite number, got {value}",
                                 f"set --{name.replace('_', '-')} to a real number")
        if self.epochs <= 0:
            raise UsageError(f"epochs must be positive, got {self.epochs}", "set --epochs")
        for name in ("weight_decay", "grad_clip", "min_delta"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} can't be negative, got {getattr(self, name)}",
                                 f"set --{name.replace('_', '-')} to 0 or more")
        if self.alpha <= 0:
            raise UsageError(f"alpha must be positive, got {self.alpha}", "set --alpha (scale = alpha / rank)")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise UsageError(f"warmup_steps can't be negative, got {self.warmup_steps}",
                             "set --warmup-steps to 0 or more, or omit it for 5% of the steps")
        if self.val_batches == 0 or self.val_batches < -1:
            raise UsageError(f"val_batches must be at least 1 (or -1 for all), got {self.val_batches}",
                             "set --val-batches; a run without validation data skips evaluation by itself")
        if not 0 <= self.seed < 2**32:
            raise UsageError(f"seed must be in [0, 2^32), got {self.seed}", "set --seed to e.g. 0")
        if self.report_to is not None and self.report_to not in REPORT_TARGETS:
            raise UsageError(f"unknown report target {self.report_to!r}", "use --report-to wandb")
        if isinstance(self.target_modules, str):
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        if self.patience is not None and self.patience < 1:
            raise UsageError(f"patience must be at least 1, got {self.patience}", "omit --patience to never stop early")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads must be at least 1, got {self.threads}", "omit --threads to use every core")
        if self.cache_limit_gb is not None and self.cache_limit_gb < 0:
            raise UsageError(f"cache_limit_gb can't be negative, got {self.cache_limit_gb}", "set --cache-limit-gb")
        if self.layers is not None and self.layers < 1:
            raise UsageError(f"layers must be at least 1, got {self.layers}", "omit --layers to adapt every block")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1), got {self.dropout}", "set --dropout")
        if self.learning_rate <= 0:
            raise UsageError(f"learning_rate must be positive, got {self.learning_rate}", "set --learning-rate")
        if self.learning_rate > 1:
            raise UsageError(f"learning_rate {self.learning_rate:g} is far too large (above 1)",
                             "LoRA learning rates are around 1e-4 to 1e-3: set --learning-rate 2e-4")
        _check_upper_bounds(self)
        return self

    def fit_model(self, model_path: str | Path) -> "LoraSettings":
        """The settings that depend on the model, from its files before anything loads: max_seq_length (when not
        given) becomes min(2048, its context window), rank may not pass its hidden size, and its config.json must
        describe its weights."""
        from mlxtune.model_config import check_weights_match, max_seq_length_for, read_config, text_config

        config = read_config(Path(model_path))
        check_weights_match(Path(model_path), config)
        if self.max_seq_length is None:
            self.max_seq_length = max_seq_length_for(config)
        hidden = text_config(config).get("hidden_size")
        if self.method != "full" and isinstance(hidden, int) and self.rank > hidden:
            raise UsageError(f"rank {self.rank} is larger than the model's hidden size ({hidden})",
                             f"set --rank {min(hidden, 8)} or less (a rank past the width adds nothing; 8 to 64 "
                             "is usual)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_upper_bounds(settings) -> None:
    """Every bounded setting at most its UPPER_BOUNDS value (the types and lower bounds were checked before)."""
    for name, bound in UPPER_BOUNDS.items():
        value = getattr(settings, name, None)
        if value is not None and value > bound:
            shown = f"{value:,}" if isinstance(value, int) else f"{value:g}"
            raise UsageError(f"{name} {shown} is too large (at most {bound:,})",
                             f"set --{name.replace('_', '-')} to {bound:,} or less")


def _check_types(settings) -> None:
    """Every setting has the type its field says (a YAML `rank: 2.9` or `target_modules: 5` is an error)."""
    for f in dataclasses.fields(settings):
        value, kind = getattr(settings, f.name), str(f.type)
        if value is None:
            if value is None and "None" not in kind:
                raise UsageError(f"{f.name} needs a value", f"set it in the config file or with --{f.name.replace('_', '-')}")
            continue
        if kind.startswith("bool"):
            ok = isinstance(value, bool)
        elif kind.startswith("int"):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind.startswith("float"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif kind.startswith("list"):
            ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        elif kind.startswith("str"):
            ok = isinstance(value, str)
        else:
            ok = True
        if not ok:
            expected = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text",
                        "list[str]": "a list of names"}.get(kind.split(" |")[0], kind)
            raise UsageError(f"{f.name} must be {expected}, got {value!r}",
                             f"fix {f.name} in the config file (or pass --{f.name.replace('_', '-')})")


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def read_yaml_config(path: str | Path, cls=LoraSettings) -> dict[str, Any]:
    """Read a YAML settings file, rejecting unknown keys with a suggestion."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a directory, not a settings file", "give the path of a YAML file")
    if not path.is_file():
        raise UsageError(f"config file not found: {path}", "give the path of a YAML file with --config")
    try:
        values = yaml.safe_load(_read_text(path)) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UsageError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})", "fix the YAML syntax") from None
    except RecursionError:
        raise UsageError(f"{path}: nested too deeply to read", "settings are flat `key: value` lines") from None
    if not isinstance(values, dict):
        raise UsageError(f"{path}: expected a mapping of settings, got {type(values).__name__}", "write `key: value` lines")
    known = _field_names(cls)
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
            raise UsageError(f"{path}: unknown setting {key!r}", hint)
    return _coerce(cls, values, str(path))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line}: not UTF-8 text (byte {exc.object[exc.start]:#04x})",
                         "save the file as UTF-8") from None


def _coerce(cls, values: dict[str, Any], source: str) -> dict[str, Any]:
    """YAML reads `1e-4` as a string (it wants `1.0e-4`): convert numbers by the field's type, or say what's wrong."""
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    coerced = {}
    for key, value in values.items():
        kind = types.get(key, "")
        if value is not None and kind.startswith(("float", "int")) and not isinstance(value, bool):
            number = float if kind.startswith("float") else int
            try:
                converted = number(value) if number is float else int(float(value)) if not isinstance(value, int) else value
                if number is int and float(value) != converted:  # rank: 2.9 is not silently rank 2
                    raise ValueError
                value = converted
            except (TypeError, ValueError, OverflowError):
                raise UsageError(f"{source}: {key} must be {'a whole number' if number is int else 'a number'}, "
                                 f"got {value!r}", f"e.g. {key}: 1") from None
        elif value is not None and kind.startswith("bool") and not isinstance(value, bool):
            raise UsageError(f"{source}: {key} must be true or false, got {value!r}", f"e.g. {key}: true")
        coerced[key] = value
    return coerced


def resolve_settings(config_path: str | Path | None, overrides: dict[str, Any], cls=LoraSettings):
    """defaults ← YAML ← flags. `overrides` holds only the flags the user actually gave (None = not given)."""
    values: dict[str, Any] = {}
    if config_path:
        values.update(read_yaml_config(config_path, cls))
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        settings = cls(**values)
    except TypeError as exc:
        raise UsageError(f"invalid settings: {exc}", "check the keys in your config file") from None
    return settings.validate()


# The last line of a run's config.yaml: a file cut short (a crash mid-write, a bad copy) lacks it and is refused
# instead of silently filling the missing settings with defaults.
END_MARK = "# end of mlxtune settings"


def save_settings(settings, path: str | Path) -> None:
    """Write the settings atomically (temporary file, fsync, rename), ending with END_MARK."""
    from mlxtune.storage import atomic_write_text

    data = settings.to_dict()
    atomic_write_text(Path(path), yaml.safe_dump(data, sort_keys=False) + END_MARK + "\n")


def load_run_settings(path: str | Path, cls=LoraSettings):
    """A run's saved settings, refused unless the file is whole (END_MARK, or every setting present)."""
    path = Path(path)
    values = read_yaml_config(path, cls)
    text = _read_text(path)
    missing = [name for name in _field_names(cls) if name not in values]
    if END_MARK not in text and missing:
        raise UsageError(f"{path} is incomplete (no {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}; "
                         "cut short?)", "restore it from a backup, or start a new run with --out")
    return cls(**values)
