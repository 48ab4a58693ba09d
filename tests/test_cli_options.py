"""The training commands' flags come from their settings dataclasses: the default --help shows is the field's, every
flag reaches the settings object the library gets, and no help text restates a default.

The help is click's own help record of each option (in-process); one subprocess per command checks that `--help`
works end to end.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import re

import click
import pytest

from conftest import run_cli
from test_layers import PACKAGE, _graph, _modules
from mlxtune.cli import main
from mlxtune.errors import UsageError
from mlxtune.settings import GrpoSettings, LoraSettings, PreferenceSettings, resolve_settings

COMMANDS = {"lora": LoraSettings, "plan": LoraSettings, "dpo": PreferenceSettings, "orpo": PreferenceSettings,
            "grpo": GrpoSettings}
# Each command's flags that are not settings: how a run is started, printed or resumed.
_LAUNCH = {"config_path", "resume_dir", "nproc", "hosts", "backend", "rank_timeout", "check", "force", "json_mode"}
# plan: --objective grpo and the GRPO settings that size its memory (GrpoSettings', checked in test_grpo_run.py)
NOT_SETTINGS = {"lora": _LAUNCH, "plan": {"config_path", "timed", "json_mode", "objective", "group_size",
                                          "max_completion_tokens"}, "dpo": _LAUNCH, "orpo": _LAUNCH,
                "grpo": _LAUNCH}
# The settings a command has no flag for, and why.
NO_FLAG = {
    "lora": set(), "plan": set(),
    "dpo": {"objective"},  # the command is the objective
    "orpo": {"objective", "label_smoothing", "precompute_reference"},  # ORPO has no reference model
    "grpo": set(),
}


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _setting_params(command: str) -> list[click.Option]:
    return [p for p in main.commands[command].params
            if isinstance(p, click.Option) and p.name in _fields(COMMANDS[command])]


def _help_lines(command: str) -> dict[str, str]:
    """Each option's help as `mlxtune COMMAND --help` shows it (click's own help record), by its settings name."""
    cmd = main.commands[command]
    ctx = click.Context(cmd, info_name=command, **cmd.context_settings)
    return {param.name: param.get_help_record(ctx)[1] for param in _setting_params(command)}


def _switch(field: dataclasses.Field, on: bool) -> str | None:
    """The switch (without dashes) that turns a boolean on or off; None: a flag that is only ever turned on."""
    flag = (field.metadata.get("flag") or field.name.replace("_", "-")).lstrip("-")
    off = field.metadata.get("off", f"--no-{flag}")
    return flag if on else off and off.lstrip("-")


@pytest.mark.parametrize("command", COMMANDS)
def test_each_shown_default_is_the_settings_default(command):
    fields = _fields(COMMANDS[command])
    for name, line in _help_lines(command).items():
        field = fields[name]
        shown = re.findall(r"\[default: (.*?)\]$", line)
        assert len(re.findall(r"\[default:", line)) <= 1, line
        if "shown" in field.metadata:  # a default decided at run time, in words: never for a fixed default
            assert field.default is None and shown == [field.metadata["shown"]], (name, line)
        elif field.default is None:
            assert shown == [] or name == "model", line  # --model: the models' default, shown by the CLI
        elif isinstance(field.default, bool):
            switch = _switch(field, field.default)
            assert shown == ([switch] if switch else []), line
        elif isinstance(field.default, float):
            assert len(shown) == 1 and float(shown[0]) == field.default, line
        else:
            assert shown == [str(field.default)], line


def _other_value(field: dataclasses.Field):
    """A value for the field's flag that is not its default and that the settings accept."""
    default, kind = field.default, str(field.type).split(" |")[0]
    if "choices" in field.metadata:
        return next(c for c in field.metadata["choices"] if c != default)
    if kind == "int":
        return 3 if default is None else default + 1
    if kind == "float":
        return 0.25 if not default else default / 2
    if kind == "list[str]":
        return "self_attn.q_proj,self_attn.v_proj"
    return "best" if field.name == "from_checkpoint" else f"given-{field.name}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_reaches_the_settings_and_every_setting_has_a_flag(command):
    cls = COMMANDS[command]
    params = {p.name for p in main.commands[command].params if p.name != "help"}
    assert params - set(_fields(cls)) == NOT_SETTINGS[command], "a flag that sets nothing"
    assert set(_fields(cls)) - params == NO_FLAG[command], "a setting without its flag"
    for param in _setting_params(command):
        field = _fields(cls)[param.name]
        if str(field.type).startswith("bool"):
            turn_on = not field.default  # None (pack: not decided) and False: turn it on
            args, expected = [f"--{_switch(field, turn_on)}"], turn_on
        else:
            value = _other_value(field)
            args = [param.opts[0], str(value)]
            expected = (value.split(",") if field.name == "target_modules" else
                        [value] if field.metadata.get("multiple") else value)  # --reward a: ["a"]
        ctx = main.commands[command].make_context(command, list(args))  # click consumes the list
        flags = {k: v for k, v in ctx.params.items() if k in _fields(cls)}
        if cls is PreferenceSettings:
            flags["objective"] = command
        settings = resolve_settings(None, flags, cls)
        assert getattr(settings, field.name) == expected != field.default, (command, args)
        for alias in param.opts[1:]:  # --lr
            by_alias = main.commands[command].make_context(command, [alias, *args[1:]])
            assert by_alias.params[field.name] == ctx.params[field.name] is not None


# Where each command's work starts; the settings it gets are read there or in a module those import. (cli.py's own
# reads count too: `--from` is merged there, before training starts.)
ENTRY = {"lora": {"train.loop", "train.distributed"}, "plan": {"memory.report"},
         "dpo": {"train.preference.run", "fuse"}, "orpo": {"train.preference.run", "fuse"},
         "grpo": {"train.grpo.run", "fuse"}}


@functools.lru_cache(maxsize=None)
def _attributes_read(path) -> frozenset[str]:
    """`x.name` reads in a module, leaving out the settings' own checks (validate reads every field)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    checks = {id(node) for function in ast.walk(tree) if isinstance(function, ast.FunctionDef)
              and (function.name == "validate" or function.name.startswith("_check")) for node in ast.walk(function)}
    return frozenset(node.attr for node in ast.walk(tree)
                     if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and id(node) not in checks)


def test_every_setting_a_command_takes_is_read_by_the_code_it_runs():
    graph, modules = _graph(), _modules()
    for command, cls in COMMANDS.items():
        reached, todo = set(), list(ENTRY[command])
        while todo:
            module = todo.pop()
            if module not in reached:
                reached.add(module)
                todo.extend(graph[module])
        read = set().union(_attributes_read(PACKAGE / "cli.py"), *(_attributes_read(modules[m]) for m in reached))
        unread = [f.name for f in dataclasses.fields(cls) if f.name not in read]
        assert not unread, f"mlxtune {command} takes settings nothing reads: {unread}"


def test_no_help_restates_a_default():
    for cls in (LoraSettings, PreferenceSettings, GrpoSettings):
        for field in dataclasses.fields(cls):
            texts = [field.metadata.get("help", ""), *field.metadata.get("help_for", {}).values()]
            assert not any("default" in text.lower() for text in texts), (field.name, texts)


def test_dpo_and_orpo_take_no_lora_data_flags():
    for command in ("dpo", "orpo"):
        names = {p.name for p in main.commands[command].params}
        assert not names & {"pack", "batch_tokens", "train_on_prompt", "drop_long", "prompt_key", "completion_key"}
    assert {"pack", "prompt_key"} <= {p.name for p in main.commands["plan"].params}


def test_help_shows_an_example_and_the_defaults():
    for command in COMMANDS:
        cmd = main.commands[command]
        text = cmd.get_help(click.Context(cmd, info_name=command, **cmd.context_settings))
        assert f"mlxtune {command} --" in text and "[default: 0.0002]" in " ".join(text.split()), command
    result = run_cli("dpo", "--help")  # and end to end, once
    assert result.returncode == 0, result.stderr
    assert "--beta FLOAT" in result.stdout and "--pack" not in result.stdout


def test_adapter_flags_with_method_full_are_refused():
    with pytest.raises(UsageError, match="--rank, --dropout do nothing with --method full"):
        resolve_settings(None, {"method": "full", "rank": 16, "dropout": 0.1})
    assert resolve_settings(None, {"method": "full", "layers": 2}).layers == 2  # --layers chooses the blocks
    assert resolve_settings(None, {"method": "dora", "rank": 16}).rank == 16


def test_a_lora_setting_in_a_preference_config_is_named(tmp_path):
    config = tmp_path / "dpo.yaml"
    config.write_text("beta: 0.2\npack: true\n")
    with pytest.raises(UsageError, match="pack is a setting of `mlxtune lora`, not of this command"):
        resolve_settings(config, {}, PreferenceSettings)
