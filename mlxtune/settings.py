"""One settings object per command, filled from defaults ← YAML (`--config`) ← flags.

YAML keys and flag names are the same words (`learning_rate` ↔ `--learning-rate`). The resolved settings are
saved in the run directory as `config.yaml`, so a run can always be repeated or resumed.

Each training command's settings hold only what it uses, in layers: `TrainSettings` (model, data, optimizer,
schedule, cadence, memory: every training run) ← `AdapterSettings` (what is trained: method, rank, ...) ←
`LoraSettings` (`mlxtune lora`/`plan`: how examples become batches — packing, token budget, prompt keys) and
`FollowUpSettings` (`--from` a supervised run) ← `PreferenceSettings` (`mlxtune dpo`/`orpo`: the objective's own)
and `GrpoSettings` (`mlxtune grpo`: its prompts' field and the objective's own).
Each field carries its command-line form in its metadata (`setting()`), from which `mlxtune.cli_options` makes the
flags: a flag, its help and its shown default are written once, here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlxtune.errors import UsageError

METHODS = ("lora", "dora", "full")
SCHEDULES = ("cosine", "linear", "constant")
REPORT_TARGETS = ("wandb",)
PREFERENCE_OBJECTIVES = ("dpo", "orpo")
STOP_ON = ("loss", "accuracy")
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")  # train/grpo/losses.py's PRESETS
GRPO_PLAN_KEYS = ("group_size", "max_completion_tokens")  # what `plan --objective grpo` takes besides lora's flags

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


def setting(default: Any = None, help: str = "", **cli: Any) -> Any:
    """A settings field with its command-line form in the field's metadata (read by `cli_options.settings_options`).

    `help`: one sentence, no default in it (the default is shown from `default`, or from `shown`). Optional, in
    `cli`: `flag` (the flag when not `--field-name`, e.g. "--from"), `aliases` (e.g. ("--lr",)), `off` (a boolean's
    off switch, e.g. "--full-loss"; default `--no-NAME`; None for a switch that is only ever turned on), `choices`,
    `path` (the value is a file path), `multiple` (a list given by repeating the flag), `shown` (the default in
    words, for a default decided at run time: "min(2048, the model's context)"), `help_for` ({command: help} where
    one command means something else by it), `commands` (only these commands take the flag) and `flag=None` (a
    setting no command takes as a flag).
    """
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class TrainSettings:
    """What every training run needs: the model and data, the optimizer and its schedule, the run's length, the
    evaluation/saving cadence, the seed and the machine's memory and threads."""

    model: str | None = setting(help="Base model: a library name, a local directory or a hub id (pulled on first "
                                     "use).")
    data: str | None = setting(help="Directory with train/valid(/test) files, or one file: .jsonl, .json, .csv or "
                                    ".parquet; or a Hugging Face dataset id (org/name or hf:org/name).")
    out: str | None = setting(help="Run directory.", shown="runs/<model>-<time>")
    learning_rate: float = setting(2e-4, "Peak learning rate.", aliases=("--lr",))
    schedule: str = setting("cosine", "LR schedule after warmup.", choices=SCHEDULES)
    warmup_steps: int | None = setting(help="Linear warmup steps.", shown="5% of steps")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    grad_clip: float = setting(1.0, "Clip the gradient norm; 0 = off.")
    iters: int | None = setting(help="Optimizer steps (overrides --epochs).")  # None = derived from epochs
    epochs: float = setting(1.0, "Passes over the training data.")
    batch_size: int = setting(4, "Examples per micro-batch.", help_for={"dpo": "Pairs per micro-batch.",
                                                                        "orpo": "Pairs per micro-batch.",
                                                                        "grpo": "Prompts per micro-batch."})
    grad_accumulation: int = setting(1, "Micro-batches per optimizer step.")
    grad_checkpoint: bool = setting(False, "Recompute activations in the backward pass to save memory.")
    selective_loss: bool = setting(True, "Loss on supervised positions only, never materialising full logits "
                                         "(falls back where unsupported).", off="--full-loss")
    max_seq_length: int | None = setting(help="Truncate longer examples (reported).",
                                         shown="min(2048, the model's context)")  # resolved by fit_model
    chat_template: str | None = setting(help="Jinja chat template file overriding the model's.", path=True)
    eval_every: int = setting(50, "Validation every N steps.")
    val_batches: int = setting(25, "Validation batches per evaluation; -1 = all.")
    patience: int | None = setting(help="Early stop after N evaluations without a better validation result.",
                                   shown="off")
    min_delta: float = setting(0.0, "Smallest validation gain that counts for --patience.")
    save_every: int = setting(100, "Checkpoint every N steps.")
    report_every: int = setting(10, "Log training metrics every N steps.")
    seed: int = setting(0, "Seed for data order and initialisation.")
    report_to: str | None = setting(help="Also log metrics to Weights & Biases (needs wandb).", choices=REPORT_TARGETS)
    threads: int | None = setting(help="BLAS threads on the CPU backend.", shown="one per core")
    memory: str | None = setting(help="Memory budget, e.g. 16GB (GB = 10^9 bytes).",
                                 shown="what this machine can give; see `mlxtune plan`")
    # MLX's buffer cache; None = MLX's default (measured: a bigger one only costs RSS)
    cache_limit_gb: float | None = setting(help="MLX buffer cache size in GB (10^9 bytes).", shown="MLX's own")

    def validate(self):
        """Types, then this part's bounds; each part's `validate` adds its own (cooperatively, via super())."""
        _check_types(self)
        positive = {"batch_size": self.batch_size, "grad_accumulation": self.grad_accumulation,
                    "eval_every": self.eval_every, "save_every": self.save_every, "report_every": self.report_every}
        if self.max_seq_length is not None:  # None: resolved from the model (fit_model)
            positive["max_seq_length"] = self.max_seq_length
        _check_at_least_one(positive)
        if self.iters is not None and self.iters < 1:
            raise UsageError(f"iters must be at least 1, got {self.iters}", "set --iters or use --epochs")
        _check_finite(self, ("learning_rate", "weight_decay", "grad_clip", "epochs", "min_delta", "cache_limit_gb"))
        if self.epochs <= 0:
            raise UsageError(f"epochs must be positive, got {self.epochs}", "set --epochs")
        for name in ("weight_decay", "grad_clip", "min_delta"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} can't be negative, got {getattr(self, name)}",
                                 f"set --{name.replace('_', '-')} to 0 or more")
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
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r}", f"use one of {', '.join(SCHEDULES)}")
        if self.patience is not None and self.patience < 1:
            raise UsageError(f"patience must be at least 1, got {self.patience}", "omit --patience to never stop early")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads must be at least 1, got {self.threads}", "omit --threads to use every core")
        if self.cache_limit_gb is not None and self.cache_limit_gb < 0:
            raise UsageError(f"cache_limit_gb can't be negative, got {self.cache_limit_gb}", "set --cache-limit-gb")
        if self.learning_rate <= 0:
            raise UsageError(f"learning_rate must be positive, got {self.learning_rate}", "set --learning-rate")
        if self.learning_rate > 1:
            raise UsageError(f"learning_rate {self.learning_rate:g} is far too large (above 1)",
                             "LoRA learning rates are around 1e-4 to 1e-3: set --learning-rate 2e-4")
        return self

    def fit_model(self, model_path: str | Path):
        """The settings that depend on the model, from its files before anything loads: max_seq_length (when not
        given) becomes min(2048, its context window), and its config.json must describe its weights."""
        from mlxtune.model_config import check_weights_match, max_seq_length_for, read_config

        config = read_config(Path(model_path))
        check_weights_match(Path(model_path), config)
        if self.max_seq_length is None:
            self.max_seq_length = max_seq_length_for(config)
        self._fit_config(config)
        return self

    def _fit_config(self, config: dict) -> None:
        """A part's own checks against the model's config.json (AdapterSettings: rank ≤ hidden size)."""

    def refuse_unused(self, given) -> None:
        """Refuse settings the user gave (`given`: names from the flags and the YAML) that these settings' other
        values make do nothing."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class AdapterSettings(TrainSettings):
    """What is trained: LoRA/DoRA adapters on some blocks and modules, or (`full`) the last blocks themselves.
    LoRA scale is `alpha / rank` (the PEFT meaning)."""

    method: str = setting("lora", "Adapter type.", choices=METHODS)
    layers: int | None = setting(help="Adapt the last N blocks.", shown="all")
    target_modules: list[str] | None = setting(help="Comma-separated modules to adapt, e.g. "
                                                    "self_attn.q_proj,self_attn.v_proj.", shown="every linear layer")
    rank: int = setting(8, "LoRA rank.")
    alpha: float = setting(16.0, "LoRA alpha; scale = alpha / rank.")
    dropout: float = setting(0.0, "LoRA dropout.")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self):
        super().validate()
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}", f"use one of {', '.join(METHODS)}")
        _check_at_least_one({"rank": self.rank})
        _check_finite(self, ("alpha", "dropout"))
        if self.alpha <= 0:
            raise UsageError(f"alpha must be positive, got {self.alpha}", "set --alpha (scale = alpha / rank)")
        if isinstance(self.target_modules, str):
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        if self.layers is not None and self.layers < 1:
            raise UsageError(f"layers must be at least 1, got {self.layers}", "omit --layers to adapt every block")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1), got {self.dropout}", "set --dropout")
        return self

    def refuse_unused(self, given) -> None:
        super().refuse_unused(given)
        unused = [name for name in ("rank", "alpha", "dropout", "target_modules") if name in given]
        if self.method == "full" and unused:
            raise UsageError(f"{', '.join('--' + n.replace('_', '-') for n in unused)} "
                             f"{'does' if len(unused) == 1 else 'do'} nothing with --method full (it trains whole "
                             "blocks, no adapter)",
                             "drop it, or use --method lora or dora; --layers chooses the blocks")

    def _fit_config(self, config: dict) -> None:
        from mlxtune.model_config import text_config

        super()._fit_config(config)
        hidden = text_config(config).get("hidden_size")
        if self.method != "full" and isinstance(hidden, int) and self.rank > hidden:
            raise UsageError(f"rank {self.rank} is larger than the model's hidden size ({hidden})",
                             f"set --rank {min(hidden, 8)} or less (a rank past the width adds nothing; 8 to 64 "
                             "is usual)")


@dataclass
class LoraSettings(AdapterSettings):
    """Everything `mlxtune lora` (and `plan`) needs: a training run, its adapter, and how its examples (prompt and
    completion, chat, text) become batches."""

    batch_tokens: int | None = setting(help="Token budget per micro-batch, filled with examples of similar length.",
                                       shown="batch size × mean length")  # rounded up to 64
    pack: bool | None = setting(help="--pack: several examples per row, isolated by the attention mask; --no-pack: "
                                     "fixed batches of --batch-size.", shown="length-bucketed token budget")
    train_on_prompt: bool = setting(False, "Also train on prompt tokens.")
    drop_long: bool = setting(False, "Drop examples over --max-seq-length instead of truncating them.")
    prompt_key: str | None = setting(help="Field holding the prompt, e.g. question.", shown="auto-detected")
    completion_key: str | None = setting(help="Field holding the completion, e.g. answer.", shown="auto-detected")

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
        super().validate()
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise UsageError(f"batch_tokens must be at least 1, got {self.batch_tokens}", "set --batch-tokens")
        _check_upper_bounds(self)
        return self


@dataclass
class FollowUpSettings(AdapterSettings):
    """A run that may start from a supervised run (`--from`: its adapter merged into its base, which is then also
    the reference): dpo, orpo and grpo."""

    from_run: str | None = setting(help="Start from this supervised run: its adapter is merged into its base, which "
                                        "is also the reference.", flag="--from", path=True)
    from_checkpoint: str = setting("last", "Adapter of --from to merge: last, best or a step number.")


@dataclass
class PreferenceSettings(FollowUpSettings):
    """Everything `mlxtune dpo`/`orpo` need: a training run and its adapter (pairs come in fixed batches of
    --batch-size pairs and only the answers are trained on, so lora's batching and prompt flags are not here) plus
    the objective's own settings, saved apart in preference.yaml."""

    objective: str = setting("dpo", flag=None)  # dpo | orpo: chosen by the command
    beta: float = setting(0.1, help_for={
        "dpo": "How strongly the policy is held to the reference (higher = closer).",
        "orpo": "Weight of the odds-ratio term against the chosen answers' NLL."})
    label_smoothing: float = setting(0.0, "Assumed share of mislabelled pairs (conservative DPO).", commands=("dpo",))
    precompute_reference: bool = setting(False, "Compute the reference log-probs once before training and cache "
                                                "them per pair (no reference pass per step); always on for --method "
                                                "full.", commands=("dpo",))
    stop_on: str = setting("loss", "What --patience watches: validation loss or validation preference accuracy.",
                           choices=STOP_ON)
    skip_invalid: bool = setting(False, "Train without bad records (each named in a note) instead of refusing the "
                                        "data.", off=None)

    def validate(self) -> "PreferenceSettings":
        super().validate()
        if self.objective not in PREFERENCE_OBJECTIVES:
            raise UsageError(f"unknown objective {self.objective!r}", f"use one of {', '.join(PREFERENCE_OBJECTIVES)}")
        if not self.beta > 0:
            raise UsageError(f"beta must be positive, got {self.beta}", "set --beta (0.1 is usual)")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise UsageError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}",
                             "set --label-smoothing (0 = plain DPO)")
        if self.stop_on not in STOP_ON:
            raise UsageError(f"unknown stop_on {self.stop_on!r}", f"use one of {', '.join(STOP_ON)}")
        if self.objective == "orpo" and (self.precompute_reference or self.label_smoothing):
            raise UsageError("ORPO uses no reference model and no label smoothing",
                             "drop --precompute-reference/--label-smoothing, or use mlxtune dpo")
        _check_upper_bounds(self)
        return self



@dataclass
class GrpoSettings(FollowUpSettings):
    """Everything `mlxtune grpo` needs: a training run and its adapter (--batch-size prompts per micro-batch), the
    prompts' field, and GRPO's own settings, saved apart in grpo.yaml.

    Defaults follow TRL's GRPOConfig where it has one: β = 0 (no reference pass; TRL's default since v0.19),
    temperature 1, top-p 1, ε 0.2 (DAPO's preset: 0.28 above), μ = 1 (`num_iterations`); G = 8
    (`num_generations`), and completions of up to 256 tokens (`max_completion_length`)."""

    prompt_key: str | None = setting(help="Field holding the prompt, e.g. question.", shown="prompt")
    reward: list[str] | None = setting(help="A reward spec (repeatable; summed with their weights).", multiple=True)
    group_size: int = setting(8, "Samples per prompt (G).")
    max_completion_tokens: int = setting(256, "Longest completion sampled.")
    temperature: float = setting(1.0, "Sampling temperature.")
    top_p: float = setting(1.0, "Nucleus sampling; 1 = off.")
    beta: float = setting(0.0, "Weight of the KL to the reference (the adapter switched off); 0 = no reference pass "
                               "(as TRL).")
    loss_type: str = setting("grpo", "grpo: sequence mean; dr_grpo: no length or std normalisation; dapo: token "
                                     "mean, clip-higher.", choices=GRPO_LOSS_TYPES)
    epsilon_low: float | None = setting(help="Clip the ratio below at 1 − ε.", shown="the preset's, 0.2")
    epsilon_high: float | None = setting(help="Clip the ratio above at 1 + ε.", shown="the preset's, 0.2; dapo 0.28")
    updates_per_batch: int = setting(1, "Optimizer updates per rollout batch (μ).")
    sample_every: int = setting(10, "Write the step's completions and rewards to samples.jsonl every N steps; 0 = "
                                    "never.")

    def validate(self) -> "GrpoSettings":
        super().validate()
        if isinstance(self.reward, str):
            self.reward = [self.reward]
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise UsageError(f"unknown loss type {self.loss_type!r}", f"use one of {', '.join(GRPO_LOSS_TYPES)}")
        for name in ("group_size", "max_completion_tokens", "updates_per_batch"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1, got {getattr(self, name)}",
                                 f"set --{name.replace('_', '-')}")
        if self.group_size < 2:
            raise UsageError("group_size must be at least 2: a group's advantage compares its samples",
                             "set --group-size (8 is usual)")
        if self.sample_every < 0:
            raise UsageError(f"sample_every can't be negative, got {self.sample_every}", "0 writes no samples")
        for name in ("temperature", "top_p", "beta", "epsilon_low", "epsilon_high"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise UsageError(f"{name} must be a finite number ≥ 0, got {value}",
                                 f"set --{name.replace('_', '-')}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}", "set --top-p (1 = off)")
        if self.epsilon_low is not None and self.epsilon_low >= 1:
            raise UsageError(f"epsilon_low must be below 1, got {self.epsilon_low}", "0.2 is usual")
        _check_upper_bounds(self)
        return self


def _check_at_least_one(values: dict[str, Any]) -> None:
    for name, value in values.items():
        if value is None or value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}", f"set --{name.replace('_', '-')}")


def _check_finite(settings, names) -> None:
    for name in names:
        value = getattr(settings, name)
        if value is not None and not math.isfinite(value):
            raise UsageError(f"{name} must be a finite number, got {value}",
                             f"set --{name.replace('_', '-')} to a real number")


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
        if key in _field_names(LoraSettings) and key not in known:  # a lora run's config.yaml given to dpo, say
            raise UsageError(f"{path}: {key} is a setting of `mlxtune lora`, not of this command",
                             f"remove {key!r} from the file (this command has no --{key.replace('_', '-')})")
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
    settings.validate().refuse_unused(set(values))
    return settings


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
