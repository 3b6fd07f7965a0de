"""Command-line options generated from the config dataclasses: each setting is declared once, in its field
(``field(default=..., metadata=option("LR", "Peak learning rate"))``, pipeline/core/config.py), and becomes
``--lr``, ``make LR=...`` and the environment variable ``MAT_LR`` of every command built on that config.

``settings_command(TrainConfig)`` wraps a command ``fn(settings: TrainConfig, **own)``: typer sees the command's
own parameters plus one option per declared field (nested groups included: ``optim.lr``, ``attack.image.eps``),
``--config FILE`` and ``--set name=value``. An option left out stays None and the config's default (or the file's
value) stands; the config is built once, defaults < --config < options < --set, and a bad value is one line.

The CLI reads only ``MAT_``-prefixed environment variables: a ``FORMAT`` or ``MODE`` left in a shell for another
tool never changes a run. The Makefile forwards the variables given on its command line with that prefix.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipeline.core.config import Option, build_config, field_default, _unwrap_optional

ENV_PREFIX = "MAT_"


def env(name: str) -> str:
    """The environment variable the CLI reads for the make variable `name`."""
    return ENV_PREFIX + name


def fail(message: str, code: int = 2) -> typing.NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@dataclasses.dataclass(frozen=True)
class Declared:
    """One generated option: the dotted field it sets, its declaration, type and the config's default."""

    path: str
    option: Option
    hint: Any
    default: Any

    @property
    def param(self) -> str:
        return "opt_" + self.path.replace(".", "__")

    @property
    def is_list(self) -> bool:  # an empty value is the empty list (ATTACKS="": clean only)
        return typing.get_origin(_unwrap_optional(self.hint, None)) in (tuple, frozenset)

    @property
    def is_switch(self) -> bool:
        return _unwrap_optional(self.hint, None) is bool


def declared_options(cls: type, prefix: str = "", defaults: Any = None) -> list[Declared]:
    """The fields of `cls` that declare an option, nested groups walked (a group's defaults are its parent's)."""
    found = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        default = getattr(defaults, field.name) if defaults is not None else _default_or_none(cls, field.name)
        hint = hints[field.name]
        if "option" in field.metadata:
            found.append(Declared(prefix + field.name, field.metadata["option"], hint, default))
        elif dataclasses.is_dataclass(inner := _unwrap_optional(hint, None)):
            found += declared_options(inner, f"{prefix}{field.name}.", default if default is not None else None)
    return found


def _default_or_none(cls: type, name: str) -> Any:
    try:
        return field_default(cls, name)
    except ValueError:  # a required field
        return None


def shown(value: Any, pixels: bool = False) -> str | None:
    """A default as --help shows it (None: not shown)."""
    if value is None:
        return None
    if isinstance(value, (tuple, list, frozenset)):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if pixels and isinstance(value, float) and abs(value * 255 - round(value * 255)) < 1e-9:
        return f"{round(value * 255)}/255"  # pixel budgets, in the papers' unit
    return f"{value:g}" if isinstance(value, float) else str(value)


_METAVARS = {int: "INT", float: "NUMBER", bool: "BOOL", Path: "PATH"}


def _typer_parameter(declared: Declared) -> inspect.Parameter:
    option = declared.option
    default_text = shown(declared.default, option.pixels)
    help_text = option.help
    if default_text:
        body, stop = (help_text[:-1], ".") if help_text.endswith(".") else (help_text, "")
        help_text = f"{body} (default {default_text}){stop}"
    common = dict(envvar=env(option.name), help=help_text, show_default=False)
    if declared.is_switch:
        name = declared.path.rsplit(".", 1)[-1].replace("_", "-")
        info = typer.Option(option.flag or f"--{name}/--no-{name}", **common)
        annotation = Annotated[Optional[bool], info]
    else:
        hint = _unwrap_optional(declared.hint, None)
        origin = typing.get_origin(hint)
        metavar = "LIST" if origin in (tuple, frozenset) else _METAVARS.get(hint, "TEXT")
        flag = option.flag or "--" + declared.path.rsplit(".", 1)[-1].replace("_", "-")
        annotation = Annotated[Optional[str], typer.Option(flag, metavar=metavar, **common)]
    return inspect.Parameter(declared.param, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


def _flags(parameter: inspect.Parameter) -> list[str]:
    """The option names a typer parameter takes ("--on/--off" gives both)."""
    infos = [m for m in getattr(parameter.annotation, "__metadata__", ()) if isinstance(m, typer.models.OptionInfo)]
    if not infos:
        return ["--" + parameter.name.replace("_", "-")]
    declared = [infos[0].default, *(infos[0].param_decls or ())]  # Annotated: typer keeps the first name in default
    names = [d for d in declared if isinstance(d, str) and d.startswith("-")] or ["--" + parameter.name.replace("_", "-")]
    return [part for name in names for part in name.split("/")]


ConfigFile = Annotated[Optional[Path], typer.Option("--config", envvar=env("CONFIG"), help="Settings file, YAML or JSON (a run's saved config.json replays as is); the options and --set override it.")]
Assignments = Annotated[Optional[list[str]], typer.Option("--set", envvar=env("SET"), help="Any setting as name=value, applied last, repeatable (e.g. --set optim.lr=1e-5; names as in the saved config.json; MAT_SET / make SET=: space-separated).")]


def settings_command(cls: type, split_set: Callable[[Sequence[str]], tuple[list[str], Any]] | None = None):
    """Give a command ``fn(settings, **own)`` an option per declared field of `cls`, --config and --set.

    `split_set` divides the --set items into the config's and the command's own (augment: stage options),
    passed to `fn` as ``set_extra``."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        declared = declared_options(cls)
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values()
               if p.name not in ("settings", "set_extra")]
        generated = [_typer_parameter(d) for d in declared]
        extra = [inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigFile),
                 inspect.Parameter("assignments", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Assignments)]
        names = [p.name for p in own + generated + extra]
        flags = [flag for p in own + generated + extra for flag in _flags(p)]
        clash = {n for n in names if names.count(n) > 1} | {f for f in flags if flags.count(f) > 1}
        if clash:
            raise TypeError(f"{fn.__name__}: {', '.join(sorted(clash))} declared twice")

        @functools.wraps(fn)
        def command(**given: Any) -> Any:
            options = {}
            for d in declared:
                value = given.pop(d.param)
                if value is None or (value == "" and not d.is_list):  # an empty variable: not given
                    continue
                if d.option.parse is not None and isinstance(value, str):
                    try:
                        value = d.option.parse(value)
                    except ValueError as error:
                        fail(f"{d.option.name}={value!r}: {error}")
                options[d.path] = value
            config_file, items = given.pop("config_file"), list(given.pop("assignments") or ())
            try:
                if split_set is not None:
                    items, given["set_extra"] = split_set(items)
                settings = build_config(cls, config_file, options, items)
            except ValueError as error:
                fail(str(error))
            return fn(settings=settings, **given)

        parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + generated + extra
        command.__signature__ = inspect.Signature(parameters)
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        del command.__wrapped__  # typer must read the generated signature, not fn's
        return command

    return decorate
