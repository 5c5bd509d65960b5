"""Config dataclasses on the command line and in JSON: the `--key=value` override syntax every
entry point shares (type-checked against the dataclass, a nested config's fields set flat),
--help lines, and the round trip to plain dicts for config.json and checkpoints. It knows no
particular config."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing


def _parse_value(text: str, hint, name: str):
    """Convert a command-line string to the field's declared type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if text.lower() in ("none", "null", ""):
            return None
        return _parse_value(text, options[0], name)
    if origin is tuple:
        (item, *_rest) = typing.get_args(hint)
        parts = [p for p in text.replace(",", " ").split() if p]
        return tuple(_parse_value(p, item, name) for p in parts)
    if hint is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name} expects true or false, got {text!r}")
    if hint in (int, float, str):
        try:
            return hint(text)
        except ValueError:
            raise ValueError(f"--{name} expects {hint.__name__}, got {text!r}") from None
    raise TypeError(f"--{name}: unsupported field type {hint}")


def _nested_fields(cls) -> dict[str, str]:
    """Fields of `cls`'s nested config dataclasses that are set flat: name -> the field of
    `cls` holding them (a name `cls` has itself stays its own)."""
    hints = typing.get_type_hints(cls)
    own = {f.name for f in dataclasses.fields(cls)}
    nested = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            for inner in dataclasses.fields(hints[f.name]):
                if inner.name not in own:
                    nested[inner.name] = f.name
    return nested


def field_names(cls) -> set[str]:
    """Every name `apply_overrides` accepts for `cls`: its fields (a nested config's fields
    flat, not the nested field itself)."""
    hints = typing.get_type_hints(cls)
    own = {f.name for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])}
    return own | set(_nested_fields(cls))


def nearest_names(name: str, names) -> list[str]:
    return difflib.get_close_matches(name.replace("-", "_"), sorted(names), n=3, cutoff=0.6)


def apply_overrides(config, overrides: dict[str, str]):
    """Return a copy of a config dataclass with overrides (strings from the command line are
    parsed to each field's type; other values are taken as they are). A nested config's
    fields are set flat (LMConfig: `n_experts`, not `moe`). Unknown names raise a ValueError
    naming the nearest valid ones."""
    cls = type(config)
    hints = typing.get_type_hints(cls)
    nested = _nested_fields(cls)
    valid = field_names(cls)
    changes: dict = {}
    inner_changes: dict[str, dict] = {}
    for name, text in overrides.items():
        key = name.replace("-", "_")
        if key not in valid:
            near = nearest_names(key, valid)
            hint = f"; did you mean {', '.join('--' + n for n in near)}?" if near else ""
            raise ValueError(f"unknown option --{name} for {cls.__name__}{hint}")
        if key in nested:
            inner_changes.setdefault(nested[key], {})[key] = text
            continue
        changes[key] = _parse_value(text, hints[key], name) if isinstance(text, str) else text
    for holder, values in inner_changes.items():
        changes[holder] = apply_overrides(getattr(config, holder), values)
    return dataclasses.replace(config, **changes)


def describe_fields(
    cls, resumable: frozenset[str] = frozenset(), defaults=None, choices: dict | None = None
) -> list[str]:
    """One line per field for --help: `--name=TYPE (default VALUE)`, its allowed values (a
    config class's CHOICES, by field name, its nested configs' included), whether --resume may
    change it, and the class's HELP text for the field where it has one (a field whose
    meaning the name cannot carry). defaults: an instance whose values to show."""
    defaults = cls() if defaults is None else defaults
    choices = {**(choices or {}), **getattr(cls, "CHOICES", {})}
    help_texts = getattr(cls, "HELP", {})
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        value, hint = getattr(defaults, f.name), hints[f.name]
        if dataclasses.is_dataclass(hint):
            own = {g.name for g in dataclasses.fields(cls)}
            inner = describe_fields(hint, resumable, value, choices)
            lines += [line for line in inner if line.split("=")[0].strip()[2:] not in own]
            continue
        text = f"  --{f.name}={_type_name(hint)} (default {_show(value)})"
        if f.name in choices:
            text += f", one of {', '.join(choices[f.name])}"
        if f.name in resumable:
            text += "; --resume may change it"
        if f.name in help_texts:
            text += f": {help_texts[f.name]}"
        lines.append(text)
    return lines


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _type_name(options[0]) + "|none"
    if origin is tuple:
        return _type_name(typing.get_args(hint)[0]) + ",..."
    return getattr(hint, "__name__", str(hint))


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "()"
    return "none" if value is None else str(value)


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Separate `--key=value` items (overrides) from the rest of a command line."""
    rest, overrides = [], {}
    for arg in argv:
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            overrides[key] = value
        else:
            rest.append(arg)
    return rest, overrides


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(cls, data: dict):
    """Rebuild a config saved with config_to_dict (lists become tuples again, nested configs
    their dataclass)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    values = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = config_from_dict(hint, value)
        elif typing.get_origin(hint) is tuple and value is not None:
            value = tuple(value)
        values[key] = value
    return cls(**values)


__all__ = [
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "describe_fields",
    "field_names",
    "nearest_names",
    "split_overrides",
]
