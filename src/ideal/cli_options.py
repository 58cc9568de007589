"""Command-line options read from the settings dataclasses, so a default, a choice list and a help
text exist once (ideal.settings):

    Curvature = Annotated[choice(InfluenceConfig, "curvature"), option(InfluenceConfig, "curvature", "--curvature")]
    def influence(curvature: Curvature = default_of(InfluenceConfig, "curvature")): ...

`option` marks the typer option with the setting it reads (`.setting`), so a test can compare every
command's defaults with the dataclasses.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import typer

from ideal.errors import IdealError
from ideal.settings import choices_of, default_of, field_of, hint_members


def option(cls: type, name: str, *flags: str, help: str | None = None, **kwargs: Any) -> Any:
    """A typer option whose help comes from the setting `cls.name` (unless given)."""
    info = typer.Option(*flags, help=help or field_of(cls, name).metadata.get("help"), **kwargs)
    info.setting = (cls, name)  # read by tests/test_settings.py
    return info


def choice(cls: type, name: str) -> Any:
    """The Literal type of a setting's choices: typer shows and checks them."""
    choices = choices_of(cls, name)
    if not choices:
        raise KeyError(f"{cls.__name__}.{name} declares no choices")
    return Literal[choices]


def literal(values: typing.Sequence[str]) -> Any:
    """The Literal type of a constant's values (choices that are no setting's)."""
    return Literal[tuple(values)]


def settings_options(cls: type, *, skip: Sequence[str] = ()) -> Callable[[Callable], Callable]:
    """A decorator: one option per field of settings dataclass `cls`, after the command's own
    parameters, each with the field's default, help and choices; the command receives them as
    keyword arguments (`from_options` turns them back into the dataclass)."""
    hints = typing.get_type_hints(cls)

    def decorate(func: Callable) -> Callable:
        signature = inspect.signature(func, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        added = []
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
            if f.name in skip or not flag or typing.get_origin(hints[f.name]) is dict:
                continue
            kind, default = _cli_type(cls, f, hints[f.name])
            if kind is bool:
                flag = f"{flag}/--no-{flag[2:]}"
            annotation = Annotated[kind, option(cls, f.name, flag)]
            added.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                           default=default, annotation=annotation))  # fmt: skip
        func.__signature__ = signature.replace(parameters=[*own, *added])
        return func

    return decorate


def _cli_type(cls: type, f: dataclasses.Field, hint: Any) -> tuple[Any, Any]:
    """The command line's type and default of a setting: choices as a Literal, a tuple as a
    comma-separated string, a count whose None has a word ('all') as a string."""
    default = default_of(cls, f.name)
    if f.metadata.get("choices"):
        return (choice(cls, f.name) | None if default is None else choice(cls, f.name)), default
    if f.metadata.get("none"):
        return str, f.metadata["none"] if default is None else str(default)
    if any(typing.get_origin(m) is tuple for m in hint_members(hint)):
        return str | None, None if default is None else ",".join(default)
    return hint, default


def from_options(cls: type, values: dict[str, Any], **fixed: Any) -> Any:
    """The settings dataclass from a command's keyword arguments (as `settings_options` made
    them): comma-separated strings back to tuples, the word for None back to None."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        members = hint_members(hints[f.name])
        word = f.metadata.get("none")
        if word is not None and isinstance(value, str):
            value = None if value.strip().lower() == word else _count(f.name, value, word)
        elif isinstance(value, str) and any(typing.get_origin(m) is tuple for m in members):
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        out[f.name] = value
    return cls(**{**out, **fixed})


def _count(name: str, value: str, word: str) -> int:
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        flag = "--" + name.replace("_", "-")
        raise IdealError(f"{flag} must be a positive integer or '{word}', got {value!r}")
    return count
