"""Typed, strict YAML -> dataclass loading shared by every config file of the project.

Every YAML file maps onto one dataclass tree. Unknown keys, wrong types and missing required
keys raise ConfigError naming the file and the dotted key, so a typo on the line never turns into
a silently ignored setting.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from edge.errors import ConfigError

T = TypeVar("T")


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping. Raises ConfigError naming the file on any problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}:{where}: malformed YAML: {problem}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load(cls: type[T], path: str | Path) -> T:
    """Load a YAML file into the dataclass `cls`, strictly."""
    return from_dict(cls, read_yaml(path), source=str(path))


def from_dict(cls: type[T], data: Any, source: str = "<config>", prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    where = f"{source}: {prefix or '<top>'}"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        keys = ", ".join(f"{prefix}{k}" for k in unknown)
        raise ConfigError(f"{source}: unknown key {keys} (allowed: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: missing required key {key}")
            continue
        kwargs[name] = _convert(hints[name], data[name], source, key)
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as exc:
            raise ConfigError(f"{source}: {prefix}{exc}") from exc
    return obj


# `X | Y` is a types.UnionType from 3.10 on; the annotation parser below builds typing.Union.
_UNIONS = (typing.Union, getattr(types, "UnionType", typing.Union))
# Builtin generics as typing spells them, so `list[int]` means the same on Python 3.8.
_GENERICS = {
    list: typing.List,
    dict: typing.Dict,
    tuple: typing.Tuple,
    set: typing.Set,
    frozenset: typing.FrozenSet,
    type: typing.Type,
}


def type_hints(cls: type) -> dict[str, Any]:
    """The field types of dataclass `cls`, resolved the same way on every Python from 3.8.

    With `from __future__ import annotations` every annotation is a string. On Python 3.8
    `typing.get_type_hints` cannot evaluate `int | None` or `list[int]`, so string annotations
    are parsed here instead: `|` becomes typing.Union and builtin generics their typing aliases.
    """
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        ann = klass.__dict__.get("__annotations__", {})
        if not ann:
            continue
        ns = dict(vars(typing))
        ns.update(vars(sys.modules[klass.__module__]))
        for name, tp in ann.items():
            hints[name] = _parse_annotation(tp, ns) if isinstance(tp, str) else tp
    return hints


def _parse_annotation(text: str, ns: dict[str, Any]) -> Any:
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError as exc:
        raise TypeError(f"cannot parse annotation {text!r}: {exc}") from exc
    return _eval_node(node, ns, text)


def _eval_node(node: ast.AST, ns: dict[str, Any], text: str) -> Any:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return typing.Union[_eval_node(node.left, ns, text), _eval_node(node.right, ns, text)]
    if isinstance(node, ast.Subscript):
        base = _eval_node(node.value, ns, text)
        base = _GENERICS.get(base, base)
        index = node.slice
        if isinstance(index, ast.Index):  # Python 3.8 wraps subscripts in ast.Index
            index = index.value  # type: ignore[attr-defined]
        if isinstance(index, ast.Tuple):
            args = tuple(_eval_node(e, ns, text) for e in index.elts)
        else:
            args = _eval_node(index, ns, text)
        return base[args]
    if isinstance(node, ast.Name):
        if node.id in ns:
            return ns[node.id]
        if hasattr(builtins, node.id):
            return getattr(builtins, node.id)
        raise TypeError(f"annotation {text!r}: unknown name {node.id!r}")
    if isinstance(node, ast.Attribute):
        return getattr(_eval_node(node.value, ns, text), node.attr)
    if isinstance(node, ast.Constant):  # None, Literal values, the `...` of tuple[int, ...]
        return node.value
    raise TypeError(f"annotation {text!r}: unsupported expression {ast.dump(node)}")


def _convert(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in _UNIONS:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, source, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1] if errors else f"{source}: {key}: invalid value {value!r}")
    if origin is typing.Literal:
        # bool is an int: `true` must not pass for the literal 1
        bool_for_int = isinstance(value, bool) and not any(isinstance(a, bool) for a in args)
        if value not in args or bool_for_int:
            raise ConfigError(
                f"{source}: {key}: invalid value {value!r}, expected one of {list(args)}"
            )
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        out = [_convert(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _convert(vt, v, source, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: {key}: unsupported config type {tp!r}")


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict (for saving the resolved config next to outputs)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump(obj: Any, path: str | Path) -> None:
    """Write the resolved config tree as YAML."""
    from edge.atomic import atomic_write

    atomic_write(path, yaml.safe_dump(to_dict(obj), sort_keys=False))
