"""One home for every setting: a dataclass field that carries its default, help and choices.

Each part's settings dataclass (train, influence, update, eval, ...) declares its fields with
`setting(...)`. The run config embeds those dataclasses, and each command's options read the same
fields (`ideal.cli_options`), so a default, a choice list or a help text exists once:

    curvature: str = setting("ekfac", "ekfac, kfac, identity or exact", choices=CURVATURES)

`check_choices(instance, section)` validates every field that declares choices, with a line that
names the dotted key and the value. `before` is the value that described a run started before the
option existed, where the default changed behaviour (resume reads it: ideal.run.config).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any

from ideal.errors import IdealError

_NO_DEFAULT: Any = dataclasses.MISSING

LOSSES = ("example", "token")  # the training objectives: per-example or per-token normalisation
ON_INVALID = ("error", "skip")  # what a data loader does with an invalid row


def setting(
    default: Any = _NO_DEFAULT,
    help: str = "",
    *,
    choices: Sequence[str] | None = None,
    factory: Any = _NO_DEFAULT,
    before: Any = _NO_DEFAULT,
    none: str | None = None,
    flag: str | None = None,
) -> Any:
    """A dataclass field with its help text and choices in `metadata`. `none` is the word that
    stands for None on the command line (e.g. 'all': no cap); `flag` a command-line name other
    than --field-name, or "" for a setting no command offers."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if none is not None:
        metadata["none"] = none
    if flag is not None:
        metadata["flag"] = flag
    if before is not _NO_DEFAULT:
        metadata["before"] = before
    if factory is not _NO_DEFAULT:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_of(cls: type, name: str) -> dataclasses.Field:
    """The field `name` of settings dataclass `cls` (KeyError names both when it is missing)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no setting {name!r}")


def default_of(cls: type, name: str) -> Any:
    """The default value of a setting (a factory's product for mutable defaults)."""
    f = field_of(cls, name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise KeyError(f"{cls.__name__}.{name} has no default")


def help_of(cls: type, name: str) -> str:
    return field_of(cls, name).metadata.get("help", "")


def choices_of(cls: type, name: str) -> tuple[str, ...] | None:
    return field_of(cls, name).metadata.get("choices")


def check_choices(instance: Any, section: str) -> None:
    """Every field of `instance` that declares choices holds one of them, or a one-line error
    names `section.field` and the value."""
    for f in dataclasses.fields(instance):
        choices = f.metadata.get("choices")
        value = getattr(instance, f.name)
        if choices is not None and value is not None and value not in choices:
            key = f"{section}.{f.name}" if section else f.name
            raise IdealError(f"{key} must be one of {', '.join(choices)}, got {value!r}")


def hint_members(hint: Any) -> list[Any]:
    """The types a field's hint allows: a union's members (None left out), or the hint itself."""
    if hint is None:
        return []
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return [a for a in typing.get_args(hint) if a is not type(None)]
    return [hint]
