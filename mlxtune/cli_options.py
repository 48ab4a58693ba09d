"""A command's flags made from its settings dataclass: name, type, choices, help and shown default, written once.

Each field of a settings class (mlxtune/settings.py) carries its command-line form in its metadata (made with
`settings.setting()`); `settings_options` turns the fields a command takes into click options. How a new command
adopts it (e.g. `grpo`), in mlxtune/settings.py and cli.py:

    @dataclass
    class GrpoSettings(FollowUpSettings):  # model, data, optimizer, cadence, adapter and --from come along
        batch_size: int = setting(4, "Prompts per micro-batch.")   # a field re-declared: its place, new help
        reward: list[str] | None = setting(help="A reward spec (repeatable; summed).", multiple=True)
        group_size: int = setting(8, "Samples per prompt (G).")
        loss_type: str = setting("grpo", "Loss normalisation.", choices=("grpo", "dr_grpo", "dapo"))
        epsilon_high: float | None = setting(help="Clip the ratio above at 1 + ε.", shown="the preset's: 0.2")

    @main.command("grpo", context_settings={"show_default": True})
    @settings_options(GrpoSettings, "grpo", _SHOWN)
    @_config_option
    @_resume_option
    def grpo(config_path, resume_dir, **flags):
        settings = resolve_settings(config_path, flags, cls=GrpoSettings)   # defaults ← YAML ← flags

A field that only some commands take says so (`commands=("dpo",)`); one that differs in meaning between them has
`help_for`; one no command takes as a flag has `flag=None`. Never write a default into a help text: it is shown
from the field's default (or its `shown` words, for a default decided at run time).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import click

# click's types for the settings' field types (the annotations are strings: `from __future__ import annotations`)
_TYPES = {"int": int, "float": float, "str": str, "list[str]": str}  # a list is given comma-separated


def shown_default(settings_field: dataclasses.Field) -> str | None:
    """The default `--help` shows for a field: its `shown` words, else its default value; None: show none."""
    meta = settings_field.metadata
    if meta.get("shown") is not None:
        return meta["shown"]
    value = settings_field.default
    if value is None or value is dataclasses.MISSING:
        return None
    if isinstance(value, bool):  # the switch that is on by default, as click names a flag's default
        switch = _switches(settings_field)[0 if value else 1]
        return switch.lstrip("-") if switch else None
    return f"{value:g}" if isinstance(value, float) else str(value)


def takes(settings_field: dataclasses.Field, command: str) -> bool:
    """Whether `command` has a flag for this field."""
    meta = settings_field.metadata
    if "flag" in meta and meta["flag"] is None:
        return False
    return command in meta.get("commands", (command,))


def option_spec(settings_field: dataclasses.Field, command: str,
                shown: dict[str, str] | None = None) -> tuple[list[str], dict[str, Any]]:
    """One field as `click.option`'s arguments for `command`; `shown` gives the default in words where it is
    decided outside the settings."""
    meta, name = settings_field.metadata, settings_field.name
    kind = str(settings_field.type).split(" |")[0]
    words = (shown or {}).get(name, shown_default(settings_field))
    text = meta.get("help_for", {}).get(command, meta.get("help", ""))
    # default None = not given (the YAML or the field's default applies), so click can't show the default itself:
    # it is added here, from the field, in click's own form
    attrs: dict[str, Any] = {"help": text if words is None else f"{text}  [default: {words}]", "default": None,
                             "show_default": False}
    if kind == "bool":
        on, off = _switches(settings_field)
        decls = [f"{on}/{off}" if off else on, name]
        if not off:
            attrs["is_flag"] = True
    else:
        decls = [_flag(settings_field), *meta.get("aliases", ()), name]
        if meta.get("multiple"):  # --reward a --reward b → ["a", "b"]; none given → None (not given)
            attrs.update(multiple=True, callback=lambda ctx, param, values: list(values) or None)
        attrs["type"] = (click.Choice(meta["choices"]) if "choices" in meta
                         else click.Path() if meta.get("path") else _TYPES[kind])
    return decls, attrs


def settings_options(cls, command: str, shown: dict[str, str] | None = None, names: tuple[str, ...] | None = None):
    """A click command's options from the settings dataclass `cls`: one per field `command` takes (of `names`, when
    given), in field order, before the command's own in --help.

    Every option's default is None (not given), so `settings.resolve_settings(config, flags, cls)` layers
    defaults ← YAML ← flags; the default --help shows comes from the field (`shown_default`). `shown` overrides the
    shown default of a field whose default is decided outside the settings (`--model`: the models' default)."""
    def decorate(function):
        for settings_field in reversed(dataclasses.fields(cls)):
            if takes(settings_field, command) and (names is None or settings_field.name in names):
                decls, attrs = option_spec(settings_field, command, shown)
                function = click.option(*decls, **attrs)(function)
        return function
    return decorate


def _flag(settings_field: dataclasses.Field) -> str:
    return settings_field.metadata.get("flag") or f"--{settings_field.name.replace('_', '-')}"


def _switches(settings_field: dataclasses.Field) -> tuple[str, str | None]:
    """A boolean's on and off switches: --pack/--no-pack, --selective-loss/--full-loss, --skip-invalid alone."""
    on = _flag(settings_field)
    off = settings_field.metadata.get("off", f"--no-{on.removeprefix('--')}")
    return on, off
