"""Name → constructor registries for backbones and losses.

A config names a component and its parameters as a flat mapping
(``{name: arcface, s: 64, m: 0.5}``); the registry checks the name and every
parameter against the constructor's signature, so a typo fails at load time with
the list of valid choices instead of deep inside training.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Mapping


class SpecError(ValueError):
    """A component spec names something unknown or passes a bad parameter."""


def closest(word: str, choices) -> str:
    """' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, fn: Callable[..., Any] | None = None):
        """Register ``fn`` under ``name``; usable as a decorator."""

        def add(f):
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = f
            return f

        return add(fn) if fn is not None else add

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._entries:
            raise SpecError(
                f"unknown {self.kind} '{name}'{closest(name, self._entries)}; "
                f"valid: {', '.join(self.names())}"
            )
        return self._entries[name]

    def parameters(self, name: str) -> dict[str, inspect.Parameter]:
        """Keyword parameters the constructor of ``name`` accepts."""
        sig = inspect.signature(self.get(name))
        return {
            p.name: p
            for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }

    def check(self, name: str, params: Mapping[str, Any], provided: tuple[str, ...] = ()) -> None:
        """Raise SpecError for an unknown name or parameter.

        ``provided`` lists parameters the caller fills in itself (e.g. the
        embedding size), which a config must not set here.
        """
        valid = {k: p for k, p in self.parameters(name).items() if k not in provided}
        for key in params:
            if key not in valid:
                raise SpecError(
                    f"{self.kind} '{name}' has no parameter '{key}'{closest(key, valid)}; "
                    f"valid: {', '.join(sorted(valid)) or '(none)'}"
                )
        missing = [
            k for k, p in valid.items() if p.default is inspect.Parameter.empty and k not in params
        ]
        if missing:
            raise SpecError(f"{self.kind} '{name}' needs parameter(s): {', '.join(missing)}")

    def build(self, spec: Mapping[str, Any], **provided):
        """Build from a flat spec ``{'name': ..., **params}`` plus caller-provided kwargs."""
        spec = dict(spec)
        if "name" not in spec:
            raise SpecError(f"{self.kind} spec needs a 'name'; valid: {', '.join(self.names())}")
        name = spec.pop("name")
        self.check(name, spec, provided=tuple(provided))
        self._build_nested(name, spec, provided)
        return self.get(name)(**spec, **provided)

    def _build_nested(self, name: str, spec: dict, provided: dict) -> None:
        """Replace nested component specs in ``spec`` by their built components (in place);
        registries whose components wrap others override it."""
