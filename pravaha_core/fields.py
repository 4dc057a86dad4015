"""Helpers for the validated dataclasses (EngineConfig, SamplingParams, WorkerConfig). Torch-free."""

from __future__ import annotations

import functools
import inspect
from dataclasses import fields


def check_known(cls: type, settings: dict, what: str) -> None:
    """ValueError naming the first key of `settings` that is not a field of dataclass `cls`."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown {what} (known: {', '.join(sorted(known))})")


def field_help(cls: type) -> dict[str, str]:
    """Each field's help text, read from the `name: text` entries of the class docstring
    (continuation lines are indented under their entry)."""
    names, docs, current = {f.name for f in fields(cls)}, {}, None
    for line in inspect.getdoc(cls).splitlines():
        head, sep, rest = line.partition(":")
        if sep and head in names:
            current, docs[head] = head, rest.strip()
        elif current and line.startswith(" "):
            docs[current] += " " + line.strip()
        else:
            current = None
    return docs


def reject_unknown_keywords(cls: type) -> type:
    """Class decorator (over @dataclass): a keyword that is no field raises ValueError naming
    it, like every other bad value, instead of the TypeError of the generated __init__."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        check_known(cls, kwargs, f"{cls.__name__} field")
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls
