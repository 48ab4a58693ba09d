"""The `mlxtune` command: parse options, call one library function, print its result.

Errors: our own exceptions become `error: … / hint: …` and exit code 2 (bad input) or 1 (run failed), here and
nowhere else; tracebacks only with `--debug`.
"""

from __future__ import annotations

import os
import sys
import traceback

import click

from mlxtune import __version__
from mlxtune.backend import IMPORT_TORCH, BlasMismatch, torch_was_hidden
from mlxtune.errors import MlxtuneError, UsageError
from mlxtune.export import FORMATS, OUTTYPES
from mlxtune.model_config import DEFAULT_GROUP_SIZE, DEFAULT_QUANTIZE, DTYPES, GROUP_SIZES, QUANTIZE_CHOICES
from mlxtune.models import DEFAULT_BASE_MODEL
from mlxtune.cli_options import settings_options
from mlxtune.settings import GRPO_PLAN_KEYS, GrpoSettings, LoraSettings, PreferenceSettings
from mlxtune.serve import MAX_QUEUE as SERVE_MAX_QUEUE
from mlxtune.storage import environment_error, redact
from mlxtune.train.distributed import BACKENDS, DEFAULT_TIMEOUT
from mlxtune.verify.run import DEFAULT_HOPS, HOPS, MAX_NEW_TOKENS, REQUANTIZED, SAMPLES

EXIT_INTERRUPTED = 130
MAX_RANK_TIMEOUT = 86_400  # a day: longer than any step; past it a hung rank would never be noticed


class MlxtuneGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MlxtuneError as exc:
            _report(ctx, exc)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except BlasMismatch as exc:
            # The system BLAS gave wrong numbers: start again without it (it can't be unloaded in-process).
            click.echo(f"warning: {exc} gave wrong matmul results; restarting without it (MLXTUNE_BLAS=none)",
                       err=True)
            _restart_with("MLXTUNE_BLAS", "none")
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:  # a bug of ours: say so briefly, keep the details behind --debug
            if torch_was_hidden(exc):  # a library imported torch without asking if it is there (backend.py)
                _restart_with(IMPORT_TORCH, "1")
            environmental = environment_error(exc)  # disk full, read-only, out of memory: not a bug
            if environmental is not None:
                _report(ctx, environmental)
            if ctx.meta.get("mlxtune.debug"):
                _print_traceback()
            click.echo(redact(f"internal error: {type(exc).__name__}: {exc}"), err=True)
            click.echo("hint: rerun with `mlxtune --debug ...` and report the traceback", err=True)
            ctx.exit(1)


def _restart_with(variable: str, value: str) -> None:
    """Run this same command again in a fresh process with one environment variable set."""
    os.execve(sys.executable, [sys.executable, "-m", "mlxtune", *sys.argv[1:]], {**os.environ, variable: value})


def _print_traceback() -> None:
    """--debug's traceback, with credentials redacted like every other line we print (a token in a URL or an
    argument would otherwise reach a bug report)."""
    click.echo(redact(traceback.format_exc()).rstrip("\n"), err=True)


def _report(ctx, exc: MlxtuneError) -> None:
    from mlxtune.runs import explain_disk_full

    exc = explain_disk_full(exc)
    if ctx.meta.get("mlxtune.debug"):
        _print_traceback()
    click.echo(redact(f"error: {exc.message}"), err=True)
    if exc.hint:
        click.echo(redact(f"hint: {exc.hint}"), err=True)
    ctx.exit(exc.exit_code)


@click.group(cls=MlxtuneGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="mlxtune")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def main(ctx, debug):
    """On-device LLM finetuning with MLX: LoRA/DoRA/full finetunes, fuse, generate, chat.

    \b
    Example (the bundled model and data):
      mlxtune lora --model examples/models/stories260K --data examples/data/wikisql --iters 100 --out runs/demo
      mlxtune fuse runs/demo --out fused/demo
      mlxtune generate fused/demo --prompt "table: players"
    """
    ctx.meta["mlxtune.debug"] = debug


def _json_option(f):
    return click.option("--json", "json_mode", is_flag=True, help="Print the result as JSON on stdout.")(f)


# The default of --model is the models' (resolved when a run starts), not a settings field's.
_SHOWN = {"model": f"{DEFAULT_BASE_MODEL}, {DEFAULT_QUANTIZE}-bit"}


def _config_option(f):
    return click.option("--config", "config_path", type=click.Path(),
                        help="YAML file with any of these settings (flags given too take precedence).")(f)


def _resume_option(f):
    return click.option("--resume", "resume_dir", type=click.Path(),
                        help="Continue the run in this directory from its last checkpoint; length, evaluation/saving "
                             "cadence and optimizer step sizes may change, flags that would train a different "
                             "adapter are refused.")(f)


def _force_option(f):
    return click.option("--force", is_flag=True, default=None,
                        help="Train even when the plan says the settings won't fit the memory budget.")(f)


def _launcher_options(f):
    """The data-parallel launcher's flags (lora, dpo, orpo, grpo)."""
    for option in reversed((
        click.option("--nproc", type=int, help="Data-parallel: N ranks on this machine (with --hosts: N per host), started by mlx.launch."),
        click.option("--hosts", help="Data-parallel across Macs: SSH names/IPs (mac1,mac2) or an mlx.launch hostfile (.json); this machine first."),
        click.option("--backend", type=click.Choice(BACKENDS), default="ring", show_default=True, help="MLX distributed backend; falls back to ring with a note when unusable."),
        click.option("--rank-timeout", type=float, default=DEFAULT_TIMEOUT, show_default=True, help="Seconds a rank waits for the others before the run fails."),
        click.option("--check", is_flag=True, help="With --nproc/--hosts: check SSH, versions, model, data, backend and the world size, then exit."),
    )):
        f = option(f)
    return f


@main.command(context_settings={"show_default": True})
@settings_options(LoraSettings, "lora", _SHOWN)
@_config_option
@_resume_option
@_launcher_options
@_force_option
@_json_option
def lora(config_path, resume_dir, json_mode, nproc, hosts, backend, rank_timeout, check, force, **flags):
    """Finetune a model with LoRA (or DoRA / full) on your data.

    \b
    Writes a run directory with config.yaml, adapters.safetensors + adapter_config.json
    (loadable by `mlx_lm.generate --adapter-path`), metrics.jsonl and checkpoints/.

    \b
    Examples:
      mlxtune lora --model examples/models/stories260K --data examples/data/wikisql --iters 100
      mlxtune lora --config configs/quickstart.yaml --out runs/demo
      mlxtune lora --resume runs/demo --iters 200     # continue (or extend) a stopped run
      mlxtune lora --config configs/quickstart.yaml --nproc 2             # two ranks on this machine
      mlxtune lora --config configs/quickstart.yaml --hosts mac1,mac2     # one rank per Mac (docs/DISTRIBUTED.md)
    """
    from mlxtune.settings import resolve_settings
    from mlxtune.memory.planner import sizes_given
    from mlxtune.ui import make_console

    console = make_console(json_mode)
    launch = _launch_options(nproc, hosts, backend, rank_timeout, check)
    if resume_dir:
        if config_path:
            raise UsageError("--config and --resume don't go together", "a resumed run keeps its own config.yaml")
        from mlxtune.train.loop import resume_settings

        settings = resume_settings(resume_dir, flags)
    else:
        settings = resolve_settings(config_path, flags)
    if launch:
        result = _train_data_parallel(settings, bool(resume_dir), launch, console, json_mode)
    else:
        from mlxtune.train.loop import finetune

        result = finetune(settings, resume=bool(resume_dir), console=console,
                          choose_sizes=not resume_dir and not sizes_given(config_path, flags),
                          force=bool(force)).to_dict()
    _end_of_run(result, json_mode)


def _end_of_run(result: dict, json_mode: bool) -> None:
    """A training command's ending: the result as JSON with --json, exit code 130 when it was interrupted."""
    from mlxtune.ui import print_json

    if json_mode:
        print_json(result)
    if result.get("stopped") == "interrupted":
        sys.exit(EXIT_INTERRUPTED)


# `plan` takes every setting `lora` takes, so a plan is for the same run; a data-parallel run is planned per rank, so
# the launcher's flags are not among them.
@main.command("plan", context_settings={"show_default": True})
@settings_options(LoraSettings, "plan", _SHOWN)
@click.option("--objective", type=click.Choice(("lora", "grpo")), default="lora",
              help="The run to plan: `mlxtune lora`'s, or `mlxtune grpo`'s (its rollout and its update).")
@settings_options(GrpoSettings, "plan", names=GRPO_PLAN_KEYS)
@_config_option
@click.option("--time", "timed", is_flag=True, help="Also time a few warm-up steps and give the expected duration.")
@_json_option
def plan_command(timed, json_mode, config_path, objective, **flags):
    """Will a finetune fit in memory? The estimated peak for these settings against the memory budget, and
    when it doesn't fit, the settings that do (cheapest change for quality first), each with its reason.

    Takes every setting of `mlxtune lora`; with --objective grpo, a `mlxtune grpo` run's (--group-size,
    --max-completion-tokens, a grpo --config): its rollout and its update, each estimated. Reads the weight files'
    headers and tokenizes the data; loads no weights (except with --time).

    \b
    Examples:
      mlxtune plan --model Qwen2.5-0.5B-Instruct-4bit --data ./data
      mlxtune plan --model ./my-model --data ./data --memory 8GB --batch-tokens 8192 --json
      mlxtune plan --objective grpo --model SmolLM2-135M-Instruct --data ./arith --group-size 8 --batch-size 4
    """
    from mlxtune.memory.report import plan_report, plan_settings
    from mlxtune.ui import make_console, print_json, print_memory_plan

    console = make_console(json_mode)
    report = plan_report(plan_settings(objective, config_path, flags), timed=timed, console=console)
    if json_mode:
        print_json(report)
    else:
        print_memory_plan(console, report)
    sys.exit(0 if report["fits"] else 3)


def _launch_options(nproc, hosts, backend, rank_timeout, check) -> dict | None:
    """The data-parallel launcher's flags (lora, dpo, orpo, grpo), checked; None for a single-process run."""
    if not 1 <= rank_timeout <= MAX_RANK_TIMEOUT:  # NaN fails both comparisons
        raise UsageError(f"--rank-timeout {rank_timeout:g} is not a number of seconds from 1 to {MAX_RANK_TIMEOUT:,}",
                         f"give --rank-timeout in seconds, e.g. --rank-timeout {DEFAULT_TIMEOUT:g}")
    if not (check or hosts or (nproc or 1) > 1):
        return None
    return dict(hosts=hosts, nproc=nproc, backend=backend, timeout=rank_timeout,
                check=check)


def _train_data_parallel(settings, resume: bool, launch: dict, console, json_mode: bool) -> dict:
    """--nproc/--hosts: the run started by mlx.launch (train/distributed.py); --check: the preflight, then exit."""
    from mlxtune.train.distributed import check_hosts, preflight_rows, train_distributed
    from mlxtune.ui import print_json, summary_table

    launch = dict(launch)
    if launch.pop("check"):
        report = check_hosts(settings, **launch, console=console)
        if json_mode:
            print_json(report.to_dict())
        else:
            console.print(summary_table("preflight", preflight_rows(report)))
        sys.exit(0 if report.ok else 2)
    return train_distributed(settings, resume=resume, **launch, console=console, json_mode=json_mode)


def _preference_command(objective: str, summary: str, extra_help: str, extra_options: tuple = ()):
    """`mlxtune dpo`/`orpo`: PreferenceSettings' flags for `objective`, --config/--resume/--force/--json, and
    the launcher's flags, and `extra_options` (click decorators)."""
    def command(config_path, resume_dir, json_mode, force, nproc, hosts, backend, rank_timeout, check, **flags):
        from mlxtune.settings import PreferenceSettings, resolve_settings
        from mlxtune.train.preference.run import resume_preference_settings, train_preference
        from mlxtune.ui import make_console

        console = make_console(json_mode)
        launch = _launch_options(nproc, hosts, backend, rank_timeout, check)
        if resume_dir:
            if config_path:
                raise UsageError("--config and --resume don't go together", "a resumed run keeps its own config.yaml")
            settings = resume_preference_settings(resume_dir, flags, objective)
        else:
            settings = resolve_settings(config_path, {**flags, "objective": objective}, cls=PreferenceSettings)
        if launch:  # data-parallel, through the same launcher as lora
            _end_of_run(_train_data_parallel(settings, bool(resume_dir), launch, console, json_mode), json_mode)
            return
        from mlxtune.fuse import merge_sft_run

        def start_from(run_dir):  # --from: merging is fuse's job, done before the training engine starts
            return merge_sft_run(settings.from_run, run_dir, settings.from_checkpoint, console)

        result = train_preference(settings, resume=bool(resume_dir), force=bool(force), console=console,
                                  start_from=start_from)
        _end_of_run(result.to_dict(), json_mode)

    for decorate in reversed((settings_options(PreferenceSettings, objective, _SHOWN), _config_option,
                              _resume_option, _launcher_options, *extra_options, _force_option, _json_option)):
        command = decorate(command)
    return click.command(objective, help=summary + extra_help, short_help=summary.split("\n")[0],
                         context_settings={"show_default": True})(command)


main.add_command(_preference_command(
    "dpo",
    "Train on preference pairs with DPO (the reference is the model with its adapter switched off).",
    """

    \b
    Data: one pair per line — {"prompt", "chosen", "rejected"} strings; chosen/rejected message lists with or
    without a shared "prompt" (TRL); Anthropic HH transcripts; LLaMA-Factory ranking records.
    Reports loss, chosen/rejected rewards, their margin and preference accuracy (train and validation).

    \b
    Examples:
      mlxtune dpo --model Qwen2.5-0.5B-Instruct-4bit --data ./pairs --beta 0.1 --iters 200
      mlxtune dpo --from runs/sft --data ./pairs --precompute-reference
      mlxtune dpo --resume runs/sft-dpo --iters 400
      mlxtune dpo --model ./my-model --data ./pairs --nproc 2   # data-parallel (docs/DISTRIBUTED.md)
    """,
))
main.add_command(_preference_command(
    "orpo",
    "Train on preference pairs with ORPO (supervised loss + odds ratio; no reference model).",
    """

    \b
    Same data shapes as `mlxtune dpo`; its flags but DPO's reference ones (--label-smoothing, --precompute-reference).

    \b
    Examples:
      mlxtune orpo --model Qwen2.5-0.5B-Instruct-4bit --data ./pairs --beta 0.1 --iters 200
      mlxtune orpo --from runs/sft --data ./pairs
    """,
))


# `mlxtune grpo`: reinforcement learning with verifiable rewards, the engine's third objective (docs/RL.md).
@main.command("grpo", context_settings={"show_default": True},
              short_help="Reinforcement learning with verifiable rewards (GRPO, Dr. GRPO, DAPO) on prompts.")
@settings_options(GrpoSettings, "grpo", _SHOWN)
@_config_option
@_resume_option
@_launcher_options
@_force_option
@_json_option
def grpo(config_path, resume_dir, json_mode, force, nproc, hosts, backend, rank_timeout, check, **flags):
    """Reinforcement learning with verifiable rewards (GRPO, Dr. GRPO, DAPO) on prompts.

    \b
    Data: one prompt per line, {"prompt": "…", "answer": "…"} (or a message list as the prompt); every other
    field is passed to the rewards. Each step samples --group-size completions of --batch-size prompts, scores
    them, and moves the adapter towards the completions that beat their group (docs/RL.md).

    \b
    Rewards (--reward, repeatable, summed; a weight in front: 0.5*format): exact[:FIELD], contains[:FIELD],
    number[:FIELD], regex:PATTERN, json[:SCHEMA], format, format:think, or FILE.py:NAME (TRL's convention).

    \b
    Examples:
      mlxtune grpo --model SmolLM2-135M-Instruct --data ./arith --reward number --reward 0.5*format --iters 100
      mlxtune grpo --from runs/sft --data ./prompts --reward rewards.py:brevity --beta 0.04
      mlxtune grpo --resume runs/smollm-grpo --iters 200
      mlxtune grpo --model ./my-model --data ./arith --reward number --nproc 2   # data-parallel (docs/DISTRIBUTED.md)
    """
    from mlxtune.fuse import merge_sft_run
    from mlxtune.settings import resolve_settings
    from mlxtune.train.grpo.run import resume_grpo_settings, train_grpo
    from mlxtune.ui import make_console

    console = make_console(json_mode)
    launch = _launch_options(nproc, hosts, backend, rank_timeout, check)
    if resume_dir:
        if config_path:
            raise UsageError("--config and --resume don't go together", "a resumed run keeps its own config.yaml")
        settings = resume_grpo_settings(resume_dir, flags)
    else:
        settings = resolve_settings(config_path, flags, cls=GrpoSettings)
    if launch:  # data-parallel, through the same launcher as lora and dpo
        _end_of_run(_train_data_parallel(settings, bool(resume_dir), launch, console, json_mode), json_mode)
        return
    result = train_grpo(settings, resume=bool(resume_dir), force=bool(force), console=console,
                        start_from=lambda run_dir: merge_sft_run(settings.from_run, run_dir,
                                                                 settings.from_checkpoint, console))
    _end_of_run(result.to_dict(), json_mode)


@main.command("rank-worker", hidden=True)
@click.argument("spec")
@click.option("--hello", is_flag=True, help="Only form the world and time one all_sum (for --check).")
@click.pass_context
def rank_worker(ctx, spec, hello):
    """One rank of a data-parallel run, started by mlx.launch (`mlxtune lora --nproc/--hosts` makes the SPEC)."""
    from mlxtune.train.distributed import run_rank

    sys.exit(run_rank(spec, hello=hello, debug=ctx.meta.get("mlxtune.debug", False)))


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Directory for the fused model.")
@click.option("--checkpoint", default="last", show_default=True, help="Adapter to fuse: last, best or a step number.")
@click.option("--quantize", "-q", type=click.Choice(QUANTIZE_CHOICES), default="none", show_default=True,
              help="Re-quantize the merged model (the merge itself is always done at full precision).")
@click.option("--group-size", type=click.Choice([str(g) for g in GROUP_SIZES]),
              help=f"Quantization group size [default: the base's, else {DEFAULT_GROUP_SIZE}].")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@_json_option
def fuse(run_dir, out, checkpoint, quantize, group_size, overwrite, json_mode):
    """Merge a run's adapter into its base model: a standalone MLX model directory.

    A quantized base is dequantized before the merge. The fused model is reloaded from disk and
    compared with base + adapter on the run's validation data (logits, KL, loss). An unquantized
    fuse that does not match is not kept; a re-quantized one reports how much of the finetune's
    loss gain survives and warns below 90%.

    \b
    Examples:
      mlxtune fuse runs/demo --out fused/demo
      mlxtune fuse runs/demo --out fused/demo-q8 --quantize 8 --checkpoint best
    """
    from mlxtune.fuse import fuse_run
    from mlxtune.ui import make_console, print_fuse_result, print_json

    console = make_console(json_mode)
    with console.status("fusing and verifying"):
        result = fuse_run(run_dir, out, checkpoint=checkpoint, quantize=quantize,
                          group_size=int(group_size) if group_size else None, overwrite=overwrite)
    if json_mode:
        print_json(result.to_dict())
    else:
        print_fuse_result(console, result)


def _template_flag(f):
    return click.option("--template/--no-template", "use_template", default=None,
                        help="Render the prompt with the chat template [default: when the model or run has one].")(f)


@main.command("export")
@click.argument("run_or_model", type=click.Path())
@click.option("--format", "fmt", required=True, type=click.Choice(FORMATS),
              help="gguf: whole model for llama.cpp; gguf-adapter: the LoRA alone; ollama: GGUF + Modelfile; "
                   "lmstudio: install into LM Studio; hf: safetensors for transformers.")
@click.option("--out", type=click.Path(), help="Output file (.gguf) or directory [default: beside the run, named "
              "after it (runs/demo → runs/demo-f16.gguf); for a model, in the current directory; LM Studio's models "
              "folder for lmstudio].")
@click.option("--outtype", type=click.Choice(OUTTYPES), default=OUTTYPES[0], show_default=True,
              help="GGUF tensor type (norms always stay f32).")
@click.option("--checkpoint", default="last", show_default=True, help="For a run: last, best or a step number.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--verify/--no-verify", default=None, help="Check the export against base + adapter as `mlxtune "
              "verify` does; exit 1 if it breaks [default: on for a run's gguf, ollama and lmstudio exports].")
@click.option("--keep-template", is_flag=True, help="ollama, for a model pulled from Ollama: write its original "
              "TEMPLATE even where it renders prompts otherwise than the chat template training used [default: "
              "kept only where it renders the same].")
@_json_option
def export_command(run_or_model, fmt, out, outtype, checkpoint, overwrite, verify, keep_template, json_mode):
    """Export a run (fused first, verified) or a model for other tools.

    \b
    Examples:
      mlxtune export runs/demo --format gguf          # writes runs/demo-f16.gguf
      mlxtune export runs/demo --format gguf-adapter --out demo-lora.gguf
      mlxtune export runs/demo --format ollama --out ollama/demo
      mlxtune export runs/demo --format hf --out hf/demo
      mlxtune export runs/demo --format lmstudio
    """
    from mlxtune.export import export
    from mlxtune.ui import make_console, print_json

    from mlxtune.verify import print_verify, verify_by_default, verify_export

    console = make_console(json_mode)
    with console.status(f"exporting ({fmt})"):
        result = export(run_or_model, fmt, out, outtype=outtype, checkpoint=checkpoint, overwrite=overwrite,
                        keep_template=keep_template, console=console)
    checked = None
    if verify or verify is None and verify_by_default(run_or_model, fmt):
        checked = verify_export(run_or_model, fmt, result.path, checkpoint, console=console)
    if json_mode:
        print_json({**result.to_dict(), **({"verify": checked.to_dict()} if checked else {})})
    else:
        console.print(f"[green]written:[/] {result.path}")
        for warning in result.warnings:
            console.print(f"[yellow]warning:[/] {warning}")
        if checked:
            print_verify(console, checked)
        if result.next_step:
            console.print(f"next: {result.next_step}")
    if checked and not checked.ok:
        sys.exit(1)


def _sampling_flags(temp_default: float, top_p_default: float, max_tokens_default: int):
    def decorate(f):
        for option in reversed([
            click.option("--max-tokens", "-m", default=max_tokens_default, show_default=True, type=int,
                         help="Most tokens per reply."),
            click.option("--temp", default=temp_default, show_default=True, type=float,
                         help="Sampling temperature; 0 = greedy."),
            click.option("--top-p", default=top_p_default, show_default=True, type=float,
                         help="Nucleus sampling: keep the most likely tokens up to this probability mass."),
            click.option("--min-p", default=0.0, show_default=True, type=float,
                         help="Drop tokens less likely than this fraction of the most likely one."),
            click.option("--repetition-penalty", type=float, help="Penalise recently generated tokens, e.g. 1.1 [default: off]."),
            click.option("--seed", type=int, help="Random seed for sampling (reproducible replies)."),
        ]):
            f = option(f)
        return f
    return decorate


def _sampling(max_tokens, temp, top_p, min_p, repetition_penalty, seed):
    from mlxtune.inference import Sampling

    return Sampling(max_tokens, temp, top_p, min_p, repetition_penalty, seed).check()


@main.command()
@click.argument("model_or_run", type=click.Path())
@click.option("--prompt", "-p", required=True, help="Prompt text.")
@_sampling_flags(0.0, 1.0, 100)
@click.option("--checkpoint", default="last", show_default=True, help="For a run: last, best or a step number.")
@_template_flag
@_json_option
def generate(model_or_run, prompt, max_tokens, temp, top_p, min_p, repetition_penalty, seed, checkpoint,
             use_template, json_mode):
    """Generate one completion from a model directory or a run (base + adapter).

    A run trained on plain text continues the prompt as text; one trained on prompt/completion or chat data
    renders it as a user turn with the run's template (the format it was trained on).

    \b
    Examples:
      mlxtune generate runs/demo --prompt "table: players"
      mlxtune generate fused/demo --prompt "Once upon a time" --max-tokens 50 --temp 0.8 --seed 1
    """
    from mlxtune.inference import generate_text, prompt_format
    from mlxtune.runs import open_for_inference
    from mlxtune.ui import print_json

    sampling = _sampling(max_tokens, temp, top_p, min_p, repetition_penalty, seed)
    loaded = open_for_inference(model_or_run, checkpoint, float32_on_cpu=True)
    stream = None if json_mode else (lambda text: click.echo(text, nl=False))
    text = generate_text(loaded, prompt, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                         top_p=sampling.top_p, min_p=sampling.min_p, repetition_penalty=sampling.repetition_penalty,
                         seed=sampling.seed, use_template=use_template, on_text=stream)
    if json_mode:
        print_json({"prompt": prompt, "text": text, "model": loaded.source,
                    "format": prompt_format(loaded, use_template).kind})
    else:
        click.echo()


@main.command()
@click.argument("model_or_run", type=click.Path())
@click.option("--system", help="System prompt.")
@_sampling_flags(0.7, 0.95, 200)
@click.option("--checkpoint", default="last", show_default=True, help="For a run: last, best or a step number.")
@click.option("--compare", is_flag=True, help="Base and tuned model answer side by side (MODEL_OR_RUN must be a run).")
def chat(model_or_run, system, max_tokens, temp, top_p, min_p, repetition_penalty, seed, checkpoint, compare):
    """Chat with a model or a run in the terminal; replies stream as they are generated.

    Type a message and press Enter. /system TEXT sets the system prompt, /save FILE writes the
    conversation (JSON lines, mlxtune's chat data format), /reset clears it, /exit (or Ctrl-D) quits.
    The history is trimmed to the model's context window; speed is shown after each reply.
    Reads messages from standard input, so it can be scripted too.

    \b
    Examples:
      mlxtune chat fused/demo --system "You answer in SQL."
      mlxtune chat runs/demo --compare --temp 0      # base vs tuned, two columns
    """
    from mlxtune.chat import chat_session, compare_session
    from mlxtune.ui import make_console

    sampling = _sampling(max_tokens, temp, top_p, min_p, repetition_penalty, seed)
    interactive = sys.stdin.isatty()

    def read_line():
        if interactive:
            click.echo(click.style(">>> ", bold=True), nl=False)
        line = sys.stdin.readline()
        return line if line else None

    if compare:
        console = make_console()
        if interactive:
            console.print("[dim]/system, /save FILE, /reset, /exit or Ctrl-D[/]")
        compare_session(model_or_run, read_line, console, checkpoint=checkpoint, system=system, sampling=sampling)
        return

    from mlxtune.runs import open_for_inference

    loaded = open_for_inference(model_or_run, checkpoint, float32_on_cpu=True)
    if interactive:
        click.echo(f"chatting with {loaded.source} — /system, /save FILE, /reset, /exit or Ctrl-D", err=True)

    def write(text):
        click.echo(text, nl=False)
        sys.stdout.flush()

    chat_session(loaded, read_line, write, system=system, sampling=sampling,
                 on_notice=lambda msg: click.echo(f"note: {msg}", err=True))


@main.command("verify")
@click.argument("run_dir", type=click.Path())
@click.option("--hops", help=f"Comma-separated hops to check: {', '.join(HOPS)} [default: "
              f"{', '.join(DEFAULT_HOPS)}: the fused model, the exports found, serve].")
@click.option("--requantize", help=f"Also check the fused model re-quantized to these bit widths "
              f"(comma-separated: {','.join(REQUANTIZED)}), as `fuse --quantize` would make it.")
@click.option("--checkpoint", default="last", show_default=True, help="Adapter the reference uses: last, best or a step number.")
@click.option("--fused", type=click.Path(), help="A fused model directory to check [default: fuse into a temporary directory].")
@click.option("--gguf", multiple=True, type=click.Path(), help="GGUF file to check (repeatable) [default: RUN-*.gguf beside the run].")
@click.option("--ollama", multiple=True, type=click.Path(), help="Ollama folder to check (repeatable) [default: RUN-ollama beside the run].")
@click.option("--lmstudio", multiple=True, help="LM Studio model to check (repeatable): PUBLISHER/NAME in its models folder, a folder or a .gguf [default: mlxtune/RUN there].")
@click.option("--serve", "serve_target", type=click.Path(), help="What the serve hop serves [default: the run].")
@click.option("--samples", default=SAMPLES, show_default=True, type=int, help="Held-out records used as probes (besides the fixed probes).")
@click.option("--max-tokens", default=MAX_NEW_TOKENS, show_default=True, type=int, help="Greedy tokens generated per probe.")
@_json_option
def verify_command(run_dir, hops, requantize, checkpoint, fused, gguf, ollama, lmstudio, serve_target, samples,
                   max_tokens, json_mode):
    """Does the model you ship behave like the one you evaluated? Every hop you have (fused, GGUF in llama.cpp,
    the Ollama folder, LM Studio, mlxtune serve; re-quantized copies with --requantize) against base + adapter:
    prompt rendering byte for byte, the end-of-turn stop, teacher-forced agreement and loss, greedy replies.
    Writes verify.json; exits 1 when a hop breaks rendering or stopping or falls below its threshold
    (docs/VERIFY.md).

    \b
    Examples:
      mlxtune verify runs/demo
      mlxtune verify runs/demo --hops fused,gguf --gguf runs/demo-q8_0.gguf --json
      mlxtune verify runs/demo --lmstudio someone/demo-GGUF
      mlxtune verify runs/demo --requantize 8,4
    """
    from mlxtune.ui import make_console, print_json
    from mlxtune.verify import print_verify, verify_run

    console = make_console(json_mode)
    result = verify_run(run_dir, hops=[h.strip() for h in hops.split(",") if h.strip()] if hops else None,
                        requantize=[b.strip() for b in requantize.split(",") if b.strip()] if requantize else [],
                        checkpoint=checkpoint, fused=fused, gguf=list(gguf), ollama=list(ollama),
                        lmstudio=list(lmstudio),
                        serve=serve_target, samples=samples, max_tokens=max_tokens, console=console)
    if json_mode:
        print_json(result.to_dict())
    else:
        print_verify(console, result)
    sys.exit(0 if result.ok else 1)


@main.command("eval")
@click.argument("run_dir", type=click.Path())
@click.option("--data", help="A data file, or a directory (its test split, else valid) [default: the run's data].")
@click.option("--checkpoint", default="last", show_default=True, help="Adapter to evaluate: last, best or a step number.")
@click.option("--samples", default=5, show_default=True, type=int, help="Sample generations shown base vs tuned vs reference.")
@click.option("--metric", default="exact", show_default=True,
              help="Task metric on greedy generations: exact (after normalising whitespace), contains, or "
                   "regex:PATTERN (its first group is the answer, e.g. 'regex:####\\s*(-?[\\d.,]+)').")
@click.option("--max-tokens", type=int, help="Most generated tokens per example [default: longest reference + 16, at most 256].")
@click.option("--limit", type=int, help="Evaluate only the first N examples.")
@click.option("--generations", default=1, show_default=True, type=int,
              help="GRPO runs: sampled completions per prompt; a prompt's reward is their mean (a narrower interval).")
@click.option("--out", type=click.Path(), help="Directory for eval.json and report.html [default: the run directory].")
@_json_option
def eval_command(run_dir, data, checkpoint, samples, metric, max_tokens, limit, generations, out, json_mode):
    """Did it help? Base model vs tuned model on held-out data.

    Loss and perplexity on the supervised tokens with 95% bootstrap intervals and the paired
    difference; a task metric on greedy generations (batched, KV cache) where the data has
    references (completions, last assistant turns, or the last line of a text record). Writes
    eval.json and a self-contained report.html (charts and samples inline).

    \b
    Examples:
      mlxtune eval runs/demo
      mlxtune eval runs/math --data data/test.jsonl --metric 'regex:####\\s*(-?[\\d.,]+)' --samples 10
      mlxtune eval runs/arith-grpo --generations 4        # GRPO: 4 sampled completions per prompt
    """
    from mlxtune.eval import evaluate_run, print_summary
    from mlxtune.ui import make_console, print_json

    console = make_console(json_mode)
    result = evaluate_run(run_dir, data=data, checkpoint=checkpoint, samples=samples, metric=metric,
                          max_tokens=max_tokens, limit=limit, out=out, console=console, generations=generations)
    if json_mode:
        print_json(result.to_dict())
    else:
        print_summary(console, result)


@main.command()
@click.argument("model_or_run", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (127.0.0.1: this machine only).")
@click.option("--port", default=8080, show_default=True, type=int, help="Port; 0 picks a free one.")
@click.option("--checkpoint", default="last", show_default=True, help="For a run: last, best or a step number.")
@click.option("--api-key", envvar="MLXTUNE_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every request (for a --host other than loopback).")
@click.option("--max-queue", default=SERVE_MAX_QUEUE, show_default=True, type=click.IntRange(1, 100_000),
              help="Requests waiting for the model beyond this get 503 + Retry-After.")
@click.option("--verbose", is_flag=True, help="Log every request.")
def serve(model_or_run, host, port, checkpoint, api_key, max_queue, verbose):
    """Serve a model or a run (base + adapter) over an OpenAI-compatible API.

    /v1/chat/completions (streaming too), /v1/completions and /v1/models, with the run's chat template
    (or mlxtune's fallback one); requests queue for one generation thread. On 127.0.0.1 only loopback
    Host names and application/json POSTs are answered (no web page can reach it); give --api-key when
    you bind another --host.

    \b
    Examples:
      mlxtune serve runs/demo --port 8080
      curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
           -d '{"model": "demo", "messages": [{"role": "user", "content": "hi"}]}'
    """
    from mlxtune.serve import is_loopback, make_server
    from mlxtune.ui import make_console

    console = make_console()
    with console.status(f"loading {model_or_run}"):
        server = make_server(model_or_run, host, port, checkpoint=checkpoint, max_queue=max_queue,
                             api_key=api_key or None, verbose=verbose)
    bound_host, bound_port = server.server_address[:2]
    if not is_loopback(host) and not server.api_key:
        console.print(f"[yellow]warning:[/] listening on {host}: anyone who can reach this machine can use the "
                      "model (no --api-key)")
    console.print(f"serving [bold]{server.model_id}[/] ({server.source}) at http://{bound_host}:{bound_port}/v1 · "
                  f"chat format: {server.chat_format.description} · Ctrl-C stops", highlight=False)
    sys.stdout.flush()
    try:
        server.serve_forever()
    finally:
        server.server_close()
        server.engine.stop()


@main.command()
@click.argument("reference")
@click.option("--quantize", "-q", type=click.Choice(QUANTIZE_CHOICES),
              help=f"Quantize the weights to 4 or 8 bits (QLoRA bases), or keep them [default: {DEFAULT_QUANTIZE}; "
                   "GGUF: Q4_0/Q4_1/Q8_0 kept exactly, floats kept, K-quants to 8; an explicit -q applies to all].")
@click.option("--group-size", type=click.Choice([str(g) for g in GROUP_SIZES]), default=str(DEFAULT_GROUP_SIZE), show_default=True,
              help="Weights per quantization group (smaller = more accurate, larger file; GGUF imports use 32).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), help="Precision of unquantized tensors [default: the model's; GGUF: f16].")
@click.option("--revision", help="Hub branch, tag or commit.")
@click.option("--name", help="Library name, a plain name like my-model-4bit [default: <repo name>-<quantization>].")
@click.option("--trust-remote-code", is_flag=True, help="Allow a model that ships its own Python code.")
@click.option("--force", is_flag=True, help="Convert again / replace the entry of that name (the old one stays until the new one is complete).")
@_json_option
def pull(reference, quantize, group_size, dtype, revision, name, trust_remote_code, force, json_mode):
    """Download a model from the Hugging Face hub (or take a local directory, a GGUF file, or a model from
    Ollama's or LM Studio's store), convert it to MLX, quantize it, and keep it in the model library.

    \b
    Examples:
      mlxtune pull Qwen/Qwen2.5-0.5B-Instruct               # 4-bit, group size 64
      mlxtune pull Qwen/Qwen2.5-0.5B-Instruct -q 8 --group-size 32
      mlxtune pull ./my-hf-model --quantize none --dtype bf16
      mlxtune pull ./SmolLM2-135M-Instruct.Q4_1.gguf        # GGUF (llama.cpp)
      mlxtune pull ollama:llama3.2:1b                       # Ollama's store
      mlxtune pull lmstudio:bartowski/Qwen2.5-0.5B-Instruct-GGUF
    Then: mlxtune lora --model Qwen2.5-0.5B-Instruct-4bit --data ./data
    """
    from mlxtune.hub import pull as pull_model
    from mlxtune.importers import is_gguf_reference, pull_gguf
    from mlxtune.ui import fmt_bytes, make_console, print_json

    console = make_console(json_mode)
    if is_gguf_reference(reference):
        entry = pull_gguf(reference, quantize=quantize, name=name, force=force, console=console, dtype=dtype)
    else:
        entry = pull_model(reference, quantize=quantize or DEFAULT_QUANTIZE, group_size=int(group_size), dtype=dtype,
                           revision=revision, trust_remote_code=trust_remote_code, name=name, force=force,
                           console=console)
    if json_mode:
        print_json(entry.to_dict())
    else:
        console.print(f"[green]ready:[/] [bold]{entry.name}[/] ({entry.architecture}, {entry.quantization_label}, "
                      f"{fmt_bytes(entry.size_bytes)}) at {entry.path}")
        console.print(f"use it with: mlxtune lora --model {entry.name} --data ./data")


@main.group(invoke_without_command=True)
@_json_option
@click.pass_context
def models(ctx, json_mode):
    """The local model library: list it (no subcommand), show one model, remove one.

    \b
    Examples:
      mlxtune models
      mlxtune models info stories260K-4bit
      mlxtune models rm stories260K-4bit
    """
    if ctx.invoked_subcommand is not None:
        return
    from mlxtune.library import library_dir, list_models
    from mlxtune.ui import make_console, print_json, print_models_table

    entries = list_models()
    if json_mode:
        print_json({"library": str(library_dir()), "models": [e.to_dict() for e in entries]})
    elif not entries:
        make_console().print(f"the library ({library_dir()}) is empty: `mlxtune pull ORG/NAME` adds a model")
    else:
        print_models_table(make_console(), entries)


@models.command("info")
@click.argument("name")
@_json_option
def models_info(name, json_mode):
    """Config summary of a library model (or a model directory) and the memory it needs.

    \b
    Example:
      mlxtune models info stories260K-4bit
    """
    from mlxtune.library import model_info
    from mlxtune.ui import make_console, print_json, print_model_info

    info = model_info(name)
    if json_mode:
        print_json(info)
    else:
        print_model_info(make_console(), info)


@models.command("rm")
@click.argument("name")
@click.option("--force", is_flag=True, help="Remove it even when runs in ./runs were trained on it.")
@_json_option
def models_rm(name, force, json_mode):
    """Delete a model from the library (refused while a run trains on it, or when runs in ./runs use it).

    \b
    Example:
      mlxtune models rm stories260K-4bit
    """
    from mlxtune.runs import remove_unused_model
    from mlxtune.ui import fmt_bytes, make_console, print_json

    entry = remove_unused_model(name, force=force)
    if json_mode:
        print_json({"removed": entry.name, "freed_bytes": entry.size_bytes})
    else:
        make_console().print(f"removed {entry.name} ({fmt_bytes(entry.size_bytes)} freed)")


def _cpu_kernels_line(kernels: dict) -> str:
    built = (f"compiled with {kernels['compiler_flags']} ({kernels['directory']})" if kernels["compiler_flags"]
             else f"MLX's own compiler flags — {kernels['status']}")
    return built + (" · SwiGLU through exp" if kernels["fast_swiglu"] else "")


@main.command()
@click.option("--no-measure", is_flag=True, help="Skip the matmul speed measurement.")
@_json_option
def doctor(no_measure, json_mode):
    """Show what this machine gives MLX: platform, memory, device, BLAS (with a measured matmul speed),
    library versions and where models and caches live.

    \b
    Example:
      mlxtune doctor --json
    """
    from mlxtune.doctor import diagnose
    from mlxtune.ui import make_console, print_json, summary_table

    report = diagnose(measure=not no_measure)
    if json_mode:
        print_json(report)
        return
    blas = report["blas"]
    rows = [
        ("platform", f"{report['platform']} · Python {report['python']}"),
        ("cpu", f"{report['cpu']} ({report['cores']} cores)"),
        ("memory", f"{report['memory_gb']:.1f} GB" if report["memory_gb"] else "unknown"),
        ("training budget", f"{report['memory_budget_gb']:.1f} GB ({report['memory_budget_source']})"),
        ("mlx device", report["mlx_device"]),
        ("metal", "yes · recommended working set "
                  f"{report['metal'].get('recommended_working_set_gb', 0):.1f} GB" if report["metal"]["available"]
         else "no (CPU backend)"),
        ("quantized layers", report["quantized_layers"]),
        ("blas", f"{blas['library'] or 'MLX built-in'} — {blas['status']}"
                 + (f" (kernel {blas['openblas_coretype']})" if blas["openblas_coretype"] else "")),
        ("cpu kernels", _cpu_kernels_line(report["mlx_cpu_kernels"])),
    ]
    if "matmul_gflops" in report:
        rows.append(("matmul", f"{report['matmul_gflops']:.1f} GFLOP/s (float32, 1024²)"))
    rows += [
        ("versions", ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v)),
        ("model library", report["model_library"]),
        ("hf cache", str(report["hf_cache"])),
        ("network", "offline (HF_HUB_OFFLINE)" if report["offline"] else "online allowed"),
    ]
    make_console().print(summary_table("mlxtune doctor", rows))


@main.group()
def data():
    """Inspect datasets before training on them.

    \b
    Example:
      mlxtune data check tests/fixtures/wwdc25 --model examples/models/stories260K --show 1
    """


@data.command("check")
@click.argument("path", type=click.Path())
@click.option("--model", help="Measure in this model's tokens and render with its chat template.")
@click.option("--show", default=0, show_default=True, type=int, help="Print N rendered examples, supervised part highlighted.")
@click.option("--max-seq-length", type=int, help="Warn about examples longer than this, with the supervised tokens truncation would drop [default: min(2048, the model's context)].")
@click.option("--train-on-prompt", is_flag=True, help="Measure as if the prompt were trained on too.")
@click.option("--chat-template", type=click.Path(), help="Jinja chat template file overriding the model's.")
@click.option("--prompt-key", help="Field holding the prompt [default: auto-detected].")
@click.option("--completion-key", help="Field holding the completion [default: auto-detected].")
@click.option("--iters", type=int, help="Planned optimizer steps: warn when they would pass over the data too often.")
@click.option("--batch-size", type=int, help="Planned examples per step, with --iters [default: 4].")
@click.option("--strict", is_flag=True, help="Exit with 1 on warnings too, not only on errors.")
@_json_option
def data_check(path, model, show, max_seq_length, train_on_prompt, chat_template, prompt_key, completion_key,
               iters, batch_size, strict, json_mode):
    """Check a dataset: format per file, counts, lengths, supervised share, duplicates, every error and every
    warning (records that would hurt the run: no user turn, empty replies, over --max-seq-length, copies of
    train in validation, placeholders like {{name}}), each as file:line. Identical problems are grouped.

    Exits with 1 if any record has an error, or with --strict any warning; 0 otherwise.

    \b
    Examples:
      mlxtune data check examples/data/wikisql
      mlxtune data check tests/fixtures/wwdc25 --model examples/models/stories260K --show 2
      mlxtune data check ./data --model Qwen2.5-0.5B-Instruct-4bit --max-seq-length 1024 --strict
    """
    from mlxtune.data.check import check_data
    from mlxtune.ui import make_console, print_data_report, print_json

    keys = (prompt_key or "prompt", completion_key or "completion") if (prompt_key or completion_key) else None
    report = check_data(path, model, show=show, max_seq_length=max_seq_length, train_on_prompt=train_on_prompt,
                        chat_template=chat_template, keys=keys, iters=iters, batch_size=batch_size)
    if json_mode:
        print_json(report.to_dict())
    else:
        print_data_report(make_console(), report, report.max_seq_length)
    sys.exit(0 if report.ok and not (strict and report.warnings) else 1)


if __name__ == "__main__":
    main()
