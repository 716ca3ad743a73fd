"""Stage configs: dataclasses loaded from YAML, overridden from the CLI or a notebook cell.

Each stage has one ``@dataclass`` config. ``load_config(TrainConfig, "configs/x.yaml",
["learning_rate=1e-4"])`` reads the YAML file(s),
applies ``key=value`` overrides, converts each value to the field's type, and rejects unknown
keys with one sentence that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from .errors import ConchError


def _convert(cls, name: str, value, source: str):
    hints = typing.get_type_hints(cls)
    kind = hints[name]
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args):
        return None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        kind = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    try:
        if kind in (bool, int, float, str) and isinstance(value, (list, tuple, dict, set)):
            raise ValueError  # one value expected, several given
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if kind in (int, float, str):
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            if kind is int and isinstance(value, str) and "e" in value.lower():
                return kind(float(value))
            return kind(value)
        if origin is list:
            items = value.split(",") if isinstance(value, str) else list(value)
            inner = args[0] if args else str
            return [inner(x.strip() if isinstance(x, str) else x) for x in items if str(x).strip()]
    except (TypeError, ValueError):
        raise ConchError(f"{source}: '{name}' must be {getattr(kind, '__name__', kind)}, got {value!r}.") from None
    return value


def field_names(cls) -> list[str]:
    """A config dataclass's fields, its own first, then those it inherits (TrainConfig and DpoConfig share
    trainkit.SharedConfig's): the order `--help` and the saved YAML snapshots show, base model and data first."""
    names = [f.name for f in dataclasses.fields(cls)]
    inherited = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    return [n for n in names if n not in inherited] + [n for n in names if n in inherited]


def as_ordered_dict(cfg) -> dict:
    """``dataclasses.asdict``, in ``field_names`` order."""
    values = dataclasses.asdict(cfg)
    return {name: values[name] for name in field_names(type(cfg))}


def load_config(cls, path: str | Path | list | None = None, overrides: list[str] | dict | None = None):
    """Build a `cls` from YAML file(s) and overrides (``key=value`` strings or a dict).

    ``path`` may be a list: later files override earlier ones (e.g. the GPU defaults, then a
    CPU overlay).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    result = {}
    for file in ([path] if isinstance(path, (str, Path)) else path or []):
        if not Path(file).exists():
            raise ConchError(f"config file {file} does not exist; check the path (configs/ holds the examples).")
        for key, value in read_yaml_mapping(file).items():
            if key not in names:
                raise ConchError(f"{file}: unknown setting '{key}'; valid settings are: {', '.join(sorted(names))}.")
            result[key] = _convert(cls, key, value, str(file))
    if isinstance(overrides, dict):  # values as they are: a list stays a list, None stays None
        pairs = [(str(key), True, value, f"{key}={value!r}") for key, value in overrides.items()]
    else:
        pairs = [(*item.partition("="), item) for item in overrides or []]
    for key, sep, value, item in pairs:
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or key not in names:
            raise ConchError(f"override '{item}' must be key=value with a key among: {', '.join(sorted(names))}.")
        result[key] = _convert(cls, key, value, "override")
    return cls(**result)


def parse_cli_overrides(args: list[str]) -> list[str]:
    """``--key value --flag --other-key=x`` (what a CLI user types) -> ``["key=value", "flag=true", "other_key=x"]``.

    Keys are spelled with underscores, like the config fields; the dashed spelling is accepted as an alias.
    """
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConchError(f"unexpected argument '{arg}'; settings are given as --key value.")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if eq:
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            i += 2
        else:
            value = "true"
            i += 1
        out.append(f"{key}={value}")
    return out


def read_yaml_mapping(path: str | Path, *, deletable: bool = False) -> dict:
    """A YAML file's top-level mapping ({} when empty); else one ConchError sentence naming the file and line.

    ``deletable=True`` (an optional file) adds "or delete the file" to the advice.
    """
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConchError(f"{path} does not exist; check the path.")
    or_delete = " or delete the file" if deletable else ""
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConchError(f"{path} is not valid YAML{where} ({problem}); fix that line{or_delete}.") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        kind = "a list" if isinstance(loaded, list) else "a single value"
        raise ConchError(f"{path} must hold key: value pairs at its top level, not {kind}; fix it{or_delete}.")
    return loaded
