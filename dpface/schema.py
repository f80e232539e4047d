"""The config machinery every component's config section uses.

A section is a dataclass. A field's range rule is declared with the field
(``rule(0.1, lambda v: v > 0, "> 0")``) and so moves and renames with it; checks that
span several fields of one section are its ``validate()`` method, which raises
:class:`Invalid` naming the field. :func:`build_section` turns a plain mapping into the
section, checking keys, types and rules, and prefixes every message with the key path
and the file it came from.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING, field
from typing import Any, Callable, Literal

from dpface.registry import closest


class ConfigError(ValueError):
    """A config file or override is invalid; the message names key and source."""


class Invalid(ValueError):
    """Raised by a section's ``validate()``: ``key`` is the field (relative to the
    section), ``message`` what is wrong with it."""

    def __init__(self, key: str, message: str):
        super().__init__(f"'{key}' {message}")
        self.key, self.message = key, message


def rule(default: Any = MISSING, check: Callable[[Any], bool] | None = None, why: str = "", *,
         default_factory: Any = MISSING):
    """A dataclass field whose value must satisfy ``check`` (described by ``why``)."""
    md = {"rule": (check, why)} if check is not None else {}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=md)
    return field(default=default, metadata=md)


# The common rules, so each is written once.
def positive(default):
    return rule(default, lambda v: v > 0, "> 0")


def non_negative(default):
    return rule(default, lambda v: v >= 0, ">= 0")


def at_least(default, low):
    return rule(default, lambda v: v >= low, f">= {low}")


def in_unit(default, open_low: bool = True):
    """In (0, 1] (or [0, 1] with ``open_low=False``)."""
    if open_low:
        return rule(default, lambda v: 0 < v <= 1, "in (0, 1]")
    return rule(default, lambda v: 0 <= v <= 1, "in [0, 1]")


def type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check ``value`` against annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        return isinstance(value, (int, float)), float(value) if isinstance(value, (int, float)) else value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp in (str, bool, list, dict):
        return isinstance(value, tp), value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    raise TypeError(f"unsupported annotation {tp}")


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def build_section(cls, data: Any, prefix: str, source: str):
    """``cls`` from the mapping ``data`` (nested sections recursively), every key, type
    and rule checked, then ``validate()``; errors are ConfigError naming key and source."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix or '<root>'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(
                f"{source}: unknown key '{where}'{closest(key, fields)}; valid keys here: {', '.join(fields)}"
            )
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        key = f"{prefix}.{name}" if prefix else name
        tp, value = hints[name], data[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_section(tp, value, key, source)
            continue
        ok, value = type_ok(value, tp)
        if not ok:
            raise ConfigError(
                f"{source}: '{key}' expects {type_name(tp)}, got {type(data[name]).__name__} {data[name]!r}"
            )
        check, why = f.metadata.get("rule", (None, ""))
        if check is not None and not check(value):
            raise ConfigError(f"{source}: '{key}' must be {why}, got {value!r}")
        kwargs[name] = value
    section = cls(**kwargs)
    validate = getattr(section, "validate", None)
    if validate is not None:
        try:
            validate()
        except Invalid as e:
            where = f"{prefix}.{e.key}" if prefix else e.key
            raise ConfigError(f"{source}: '{where}' {e.message}") from None
    return section
