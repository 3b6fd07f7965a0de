"""One config system: frozen dataclasses, validated in their own ``__post_init__``, changed by ``a.b=c``
assignments, loaded from and saved to YAML / JSON files.

Every command's settings are one frozen dataclass (nested dataclasses for groups, e.g. ``TrainConfig.optim``).
The same four functions serve all of them:

- :func:`apply_overrides` takes ``["optim.lr=1e-5", "attack.text.top_k=5"]`` (the CLI's ``--set``), converts
  each value by the field's type and rebuilds the dataclasses (so their validation runs again);
- :func:`to_dict` / :func:`from_dict` turn a config into JSON values and back, refusing unknown keys;
- :func:`load_config` reads ``--config run.yaml`` or a run's saved ``config.json``; :func:`save_config` writes
  one, with the values a run resolved at start (precision, device, ...) under the reserved key ``resolved``,
  which loading skips: a saved file replays as is.

Every value from a file, an option or ``--set`` is type-checked against its field once, in :func:`from_dict`
(``lr: true``, ``steps: 2.5``, a non-finite float are refused); config files are capped in size and in YAML
alias expansion. Validation helpers (:func:`check_choice`, :func:`check_positive`, ...) raise ``ValueError``
naming the field, which the CLI shows as a one-line error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
RESOLVED_KEY = "resolved"  # saved beside the settings, skipped when a file is loaded


# ------------------------------------------------------------------------------------------- validation


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r}: choose one of {', '.join(map(str, choices))}")


def check_choices(name: str, values: Iterable[Any], choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    unknown = [v for v in values if v not in choices]
    if unknown:
        raise ValueError(f"{name}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(map(str, choices))}")


#: The device names a config may hold (whether this machine has the device is checked where it is resolved,
#: pipeline/models/device.py:resolve_device).
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N (N a GPU index), mps"
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?|mps")


def check_device(name: str, value: Any) -> None:
    """A device name of a form the pipeline runs on: auto, cpu, cuda, cuda:N or mps."""
    if not isinstance(value, str) or _DEVICE.fullmatch(value) is None:
        raise ValueError(f"{name}={value!r}: choose one of {DEVICE_CHOICES}")


def check_positive(config: Any, *names: str) -> None:
    """Each named field must be > 0 (None is allowed: 'not set')."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise ValueError(f"{name}={value!r}: must be > 0")


def check_non_negative(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value < 0:
            raise ValueError(f"{name}={value!r}: must be >= 0")


def check_range(name: str, value: float | None, low: float, high: float) -> None:
    """low <= value <= high (None allowed)."""
    if value is not None and not low <= value <= high:
        raise ValueError(f"{name}={value!r}: must be in [{low}, {high}]")


# ------------------------------------------------------------------------------------------ conversion


def to_dict(config: Any) -> dict[str, Any]:
    """JSON values of a config: nested dataclasses as dicts, tuples as lists, paths as strings."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, Path):
        return str(value)
    return value


def from_dict(cls: type[T], payload: dict[str, Any], where: str = "") -> T:
    """Rebuild a (nested) config from :func:`to_dict` output; unknown keys raise ValueError naming the valid ones."""
    if not isinstance(payload, dict):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {type(payload).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(payload) - set(fields) - ({RESOLVED_KEY} if not where else set()))
    if unknown:
        raise ValueError(f"{where or cls.__name__}: unknown option(s) {', '.join(unknown)}; "
                         f"options: {', '.join(sorted(fields))}")
    kwargs = {name: _from_json(payload[name], hints[name], _join(where, name)) for name in fields if name in payload}
    return cls(**kwargs)


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _from_json(value: Any, hint: Any, where: str) -> Any:
    """A JSON / YAML value as the field's type (lists become tuples, mappings nested dataclasses); a value of
    another type (``lr: true``, ``steps: 2.5``) or a non-finite float raises ValueError naming the field."""
    hint = _unwrap_optional(hint, value)
    if value is None:
        return None
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if isinstance(value, str) and hint in (int, float, bool):
        value = parse_value(value, hint, where)
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not Ellipsis]
    if origin in (tuple, frozenset):
        items = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
        if origin is tuple and Ellipsis not in typing.get_args(hint) and args:  # a fixed shape: tuple[str, int]
            if len(items) != len(args):
                raise ValueError(f"{where}={value!r}: expected {len(args)} items")
            return tuple(_from_json(v, a, where) for v, a in zip(items, args))
        converted = [_from_json(v, args[0] if args else Any, where) for v in items]
        return tuple(converted) if origin is tuple else frozenset(converted)
    if origin in (typing.Union, types.UnionType):  # Path | str: one of them
        if not any(_is_instance(value, a) for a in args):
            raise ValueError(f"{where}={value!r}: expected {' or '.join(_type_name(a) for a in args)}")
        return value
    if hint is Path and isinstance(value, str):
        return Path(value)
    if not _is_instance(value, hint):
        raise ValueError(f"{where}={value!r}: expected {_type_name(hint)}")
    if hint is float:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{where}={value!r}: must be a finite number")
    return value


def _is_instance(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if hint in (int, float) and isinstance(value, bool):  # True is an int to Python, not to a config
        return False
    if hint is float:
        return isinstance(value, (int, float))
    if hint is Path:
        return isinstance(value, (str, Path))
    origin = typing.get_origin(hint) or hint
    return isinstance(origin, type) and isinstance(value, origin)


def _type_name(hint: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", Path: "a path"}
    return names.get(hint, getattr(typing.get_origin(hint) or hint, "__name__", str(hint)))


def _unwrap_optional(hint: Any, value: Any) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
    return hint


def parse_value(raw: str, hint: Any, where: str) -> Any:
    """A command-line string as the field's type: bool (true/false/1/0/yes/no), int, float (also a fraction such
    as 2/255), a comma list for tuples, 'none' / 'null' / '' for an optional field, paths, strings."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if optional and raw.strip().lower() in ("", "none", "null"):
        return None
    hint = _unwrap_optional(hint, raw)
    try:
        if hint is bool:
            lowered = raw.strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return lowered in ("1", "true", "yes")
        if hint is int:
            return int(raw)
        if hint is float:
            return float(Fraction(raw.strip())) if "/" in raw else float(raw)
        if hint is Path:
            return Path(raw)
        if typing.get_origin(hint) in (tuple, frozenset):
            args = [a for a in typing.get_args(hint) if a is not Ellipsis]
            item = args[0] if args else str
            items = (parse_value(part.strip(), item, where) for part in raw.split(",") if part.strip())
            return frozenset(items) if typing.get_origin(hint) is frozenset else tuple(items)
    except (ValueError, ZeroDivisionError) as error:
        raise ValueError(f"{where}={raw!r}: not a valid {getattr(hint, '__name__', hint)}") from error
    if dataclasses.is_dataclass(hint):
        raise ValueError(f"{where} is a group of options; set one of its fields ({where}.<name>=...)")
    return raw


# ------------------------------------------------------------------------------------------ overrides


def parse_assignments(assignments: Sequence[str]) -> list[tuple[str, str]]:
    """``["a.b=c", ...]`` -> ``[("a.b", "c"), ...]``; a malformed item raises ValueError."""
    pairs = []
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected name=value (e.g. optim.lr=1e-5)")
        pairs.append((key.strip(), value))
    return pairs


def apply_overrides(config: T, assignments: Sequence[str] | dict[str, Any]) -> T:
    """A copy of ``config`` with dotted fields replaced: ``["optim.lr=1e-5"]`` (strings, converted by type) or
    ``{"optim.lr": 1e-5}`` (values as they are; None leaves a field unchanged). Unknown names raise ValueError
    listing the valid ones. All changes are applied at once, then the config is rebuilt (and so validated) once."""
    items = parse_assignments(assignments) if not isinstance(assignments, dict) else list(assignments.items())
    items = [(key, value) for key, value in items if value is not None]
    if not items:
        return config
    payload = dataclasses.asdict(config)
    for key, value in items:
        _set_path(type(config), payload, key.split("."), value, key)
    return from_dict(type(config), payload)


def _set_path(cls: type, payload: dict[str, Any], path: list[str], value: Any, full: str) -> None:
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    head = path[0]
    if head not in fields:
        prefix = full[: len(full) - len(".".join(path))].rstrip(".")
        raise ValueError(f"{full}: no option {head!r} in {prefix or cls.__name__}; options: {', '.join(sorted(fields))}")
    hint = typing.get_type_hints(cls)[head]
    if len(path) > 1:
        inner = _unwrap_optional(hint, None)
        if not dataclasses.is_dataclass(inner):
            raise ValueError(f"{full}: {head!r} is a single option, not a group")
        if payload.get(head) is None:
            payload[head] = dataclasses.asdict(inner())
        _set_path(inner, payload[head], path[1:], value, full)
    else:
        payload[head] = parse_value(value, hint, full) if isinstance(value, str) else value


@dataclasses.dataclass(frozen=True)
class Option:
    """How a setting appears on the command line, declared once in its field's metadata (``option(...)``):
    ``make NAME=value`` / ``MAT_NAME`` / ``--flag``. The CLI generates every command's options from these."""

    name: str  # the make variable; the environment variable is MAT_<name>
    help: str
    flag: str | None = None  # default: "--" + the field's name with dashes; "--on/--off" for a switch
    parse: Any = None  # str -> the field's value, where parse_value's comma lists do not fit (e.g. ft=500,mat=1000)
    pixels: bool = False  # shown in 1/255 units in --help


def option(name: str, help: str, **how: Any) -> dict[str, Option]:
    """A field's metadata declaring its command-line option: ``field(default=..., metadata=option("LR", "..."))``."""
    return {"option": Option(name, help, **how)}


# The dataset every command works on; one declaration shared by their configs.
DATASET_OPTION = option("DATASET", "Dataset name (a plain name: letters, digits, _ - .); synth is the embedded one.")


def field_default(cls: type, name: str) -> Any:
    """A field's default (the CLI shows it in --help instead of repeating it)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise ValueError(f"{cls.__name__}.{name} has no default")


def option_names(cls: type, prefix: str = "") -> list[str]:
    """Every dotted option name of a config class (nested groups expanded), for --help and error messages."""
    names = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        hint = _unwrap_optional(hints[f.name], None)
        if dataclasses.is_dataclass(hint):
            names += option_names(hint, f"{prefix}{f.name}.")
        else:
            names.append(prefix + f.name)
    return names


# ------------------------------------------------------------------------------------------ files


def load_config(cls: type[T], path: str | Path) -> T:
    """A config from a YAML or JSON file (a run's saved ``config.json`` included)."""
    payload = _read_payload(path)
    try:
        return from_dict(cls, payload)
    except ValueError as error:
        raise ValueError(f"config file {path}: {error}") from error


MAX_CONFIG_BYTES = 1_000_000
MAX_CONFIG_VALUES = 100_000  # YAML aliases repeat a value without repeating its text: a few lines can expand to 10^9


def _read_payload(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ValueError(f"config file {path}: {error.strerror or error}") from error
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"config file {path}: larger than {MAX_CONFIG_BYTES:,} bytes")
    try:
        text = data.decode("utf-8")
        payload = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError, RecursionError) as error:
        raise ValueError(f"config file {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from error
    _check_expanded_size(payload, path)
    if not isinstance(payload, (dict, type(None))):
        raise ValueError(f"config file {path}: expected a mapping, got {type(payload).__name__}")
    return payload or {}


def _check_expanded_size(payload: Any, path: Path) -> None:
    """Count the values as the config system will copy them (an alias once per use), up to the cap."""
    stack, count = [payload], 0
    while stack:
        value = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ValueError(f"config file {path}: more than {MAX_CONFIG_VALUES:,} values once its aliases are expanded")
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def save_config(config: Any, path: str | Path, resolved: dict[str, Any] | None = None) -> Path:
    """Write ``config`` as JSON (YAML for a .yaml/.yml path); ``resolved`` values go under the key ``resolved``."""
    from pipeline.core.fileio import atomic_write_text

    payload = to_dict(config)
    if resolved:
        payload[RESOLVED_KEY] = _plain(resolved)
    path = Path(path)
    text = yaml.safe_dump(payload, sort_keys=False) if path.suffix in (".yaml", ".yml") else json.dumps(payload, indent=2) + "\n"
    atomic_write_text(path, text)
    return path


def build_config(cls: type[T], config_file: str | Path | None = None, options: dict[str, Any] | None = None,
                 assignments: Sequence[str] = ()) -> T:
    """What every command does: defaults, then ``--config FILE``, then the explicit options (None: not given),
    then ``--set a.b=c`` assignments, later ones winning. All of them are merged first and the config is built
    (so validated) once: neither the defaults nor the file alone need be valid (a filter's threshold may come
    from an option)."""
    payload = {f.name: _plain_default(f) for f in dataclasses.fields(cls)
               if f.init and (f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)}
    if config_file:
        given = _read_payload(config_file)
        given.pop(RESOLVED_KEY, None)
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(given) - names)
        if unknown:
            raise ValueError(f"config file {config_file}: unknown option(s) {', '.join(unknown)}; "
                             f"options: {', '.join(sorted(names))}")
        payload.update(given)
    items = [(key, value) for key, value in dict(options or {}).items() if value is not None]
    for key, value in items + parse_assignments(list(assignments)):
        _set_path(cls, payload, key.split("."), value, key)
    return from_dict(cls, payload)


def _plain_default(field: dataclasses.Field) -> Any:
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
