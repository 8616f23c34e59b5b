"""Dataclass configs: YAML files plus ``key=value`` overrides, validated once at load.

A job declares one dataclass (nested dataclasses for its sections). ``parse_job_args``
reads ``[--config FILE] [key=value ...]``, applies the file and then the overrides
(dotted keys reach into sections: ``model.width=256``), checks every key and every
value against the field types, and runs each section's ``validate()``. Any problem is a
``ConfigError`` naming the key, raised before the job does any work.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value is unknown, of the wrong type, or out of range."""


class UnknownKeyError(ConfigError):
    def __init__(self, keys: list[str], known: list[str], hint: str = ""):
        self.keys, self.known = keys, known
        super().__init__(f"unknown config key{'s' if len(keys) > 1 else ''} {', '.join(keys)}"
                         + (f"; {hint}" if hint else f" (known: {', '.join(known)})"))


def _suggest(key: str, dotted_keys: list[str], siblings: list[str] = ()) -> str | None:
    """The nearest existing key to a misspelt one: by the whole dotted name, else by its last part
    (``epochs=3`` at the top level finds ``train.epochs``)."""
    import difflib

    close = difflib.get_close_matches(key, dotted_keys, n=1, cutoff=0.75)
    if close:
        return close[0]
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in reversed(dotted_keys)}
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.8)
    if close:
        return by_leaf[close[0]]
    # a misspelt section (`trian.epochs`): the nearest name at the same level
    close = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
    return (key.rsplit(".", 1)[0] + "." if "." in key else "") + close[0] if close else None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` checked (and, where lossless, converted) against type ``tp``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool) and all(isinstance(c, str) for c in choices):
            # `use_gpu=true` on the command line reads as a YAML boolean
            value = str(value).lower()
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (list, tuple):
        (item_tp, *rest) = get_args(tp) or (Any,)
        if isinstance(value, str):
            # allow `key=a,b,c` on the command line; each item read as YAML reads a value
            # (`cameras=0,3` gives ints), except where the items are strings (file names stay as typed)
            value = [v.strip() for v in value.split(",") if v.strip() != ""]
            if item_tp is not str:
                value = [_scalar(v) for v in value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and rest and rest != [Ellipsis]:
            if len(value) != len(get_args(tp)):
                raise ConfigError(f"{key}: expected {len(get_args(tp))} items, got {len(value)}")
            return tuple(_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, get_args(tp))))
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build_config(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):
            return str(value).lower()
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def build_config(cls: type[T], values: dict, prefix: str = "") -> T:
    """``cls`` from a mapping of its fields (nested mappings for sections), every value checked."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UnknownKeyError([prefix + k for k in unknown], sorted(fields))
    kwargs = {}
    for name, f in fields.items():
        if name in values:
            kwargs[name] = _coerce(values[name], hints[name], prefix + name)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _scalar(raw: str) -> Any:
    """One command-line value as YAML reads it: 3, 0.1, true, null, [1, 2]; anything else a string."""
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key, _scalar(raw)


def validate_tree(cfg: Any, prefix: str = "") -> None:
    """Run ``validate()`` on every dataclass section, depth first."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate_tree(value, prefix=f"{prefix}{f.name}.")
    check = getattr(cfg, "validate", None)
    if check is not None:
        try:
            check()
        except ConfigError as exc:
            raise ConfigError(f"{prefix}{exc}") from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from defaults, then the YAML file at ``path``, then ``overrides``."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        tree = loaded
    for text in overrides or []:
        key, value = _parse_override(text)
        _set_dotted(tree, key, value)
    try:
        cfg = build_config(cls, tree)
    except UnknownKeyError as exc:
        dotted = [d.key for d in describe(cls)]
        hints = [f"did you mean {s}?" for s in (_suggest(k, dotted, exc.known) for k in exc.keys) if s]
        if hints:
            raise UnknownKeyError(exc.keys, exc.known, " ".join(hints)) from None
        raise
    validate_tree(cfg)
    return cfg


@dataclasses.dataclass
class KeyDoc:
    key: str  # dotted
    type: str
    default: Any
    comment: str


def _field_comments(cls: type) -> dict[str, str]:
    """The ``# ...`` lines right above each field in the class body (what the code says of it)."""
    import inspect

    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out, pending = {}, []
    for line in lines[1:]:
        text = line.strip()
        if text.startswith("#"):
            pending.append(text.lstrip("#").strip())
            continue
        name = text.split(":", 1)[0].strip()
        if ":" in text and name.isidentifier() and not text.startswith(("def ", "class ", "@")):
            out[name] = " ".join(pending)
        pending = []
    return out


def _shown_type(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(str(c) for c in get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name((get_args(tp) or (Any,))[0])}"
    return _type_name(tp)


def describe(cls: type, prefix: str = "") -> list[KeyDoc]:
    """Every key of a config class, depth first: dotted name, type, default and comment."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    defaults = cls()
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(describe(tp, f"{prefix}{f.name}."))
            continue
        out.append(KeyDoc(prefix + f.name, _shown_type(tp), getattr(defaults, f.name), comments.get(f.name, "")))
    return out


def help_text(cls: type, doc: str = "") -> str:
    """``--help``: the job's docstring (usage and examples), then every key with type, default, comment."""
    lines = [doc.strip(), ""] if doc and doc.strip() else ["usage: [--config FILE.yaml] [key=value ...]", ""]
    lines.append("flags: --config FILE.yaml, --json (print the whole summary as JSON on stdout), --help")
    lines.append("keys (YAML sections or dotted key=value overrides):")
    for d in describe(cls):
        default = json.dumps(d.default) if isinstance(d.default, (list, tuple, dict, str)) else d.default
        lines.append(f"  {d.key} ({d.type}, default {default})" + (f"  # {d.comment}" if d.comment else ""))
    return "\n".join(lines)


def parse_job_args(cls: type[T], argv: list[str]) -> T:
    """``[--config FILE] [key=value ...]`` → a validated ``cls``."""
    path = None
    overrides = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-c", "--config"):
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a file path")
            path = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg}; use --config FILE and key=value overrides")
        else:
            overrides.append(arg)
        i += 1
    return load_config(cls, path, overrides)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(cfg: Any) -> dict[str, Any]:
    """Dotted-key view of a config, for MLflow params."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[prefix + key] = json.dumps(value) if isinstance(value, (list, tuple)) else value

    walk(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, "")
    return out


def dump_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
