"""Typed options: every config dataclass checks its values against its annotations.

A field's type says what a value may be (``int``, ``float``, ``bool``, ``str``, ``Literal``
choices, ``X | None``, ``list[str]``) and an ``Annotated[..., Range(...)]`` says where it may
lie. :class:`Options` checks every field when the dataclass is built, so a wrong ``-o`` value
(``eta=abc``, ``steps=1.5``, ``batch_size=0``) fails with one line naming the option before any
model is loaded, for the CLI and the Python API alike.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import Annotated, Any, Literal, Union

from unrelearn.errors import UnrelearnError


@dataclass(frozen=True)
class Range:
    """Inclusive bounds; ``None`` leaves a side open."""

    low: float | None = None
    high: float | None = None
    # ``low`` itself excluded (a learning rate or a clip norm of exactly 0 makes no sense where this is set).
    above_low: bool = False

    def violation(self, value: float) -> str | None:
        if self.low is not None and (value <= self.low if self.above_low else value < self.low):
            return f"greater than {self.low:g}" if self.above_low else f"at least {self.low:g}"
        if self.high is not None and value > self.high:
            return f"at most {self.high:g}"
        return None


PositiveInt = Annotated[int, Range(low=1)]
NonNegativeInt = Annotated[int, Range(low=0)]
NonNegativeFloat = Annotated[float, Range(low=0)]
PositiveFloat = Annotated[float, Range(low=0, above_low=True)]
Fraction = Annotated[float, Range(low=0, high=1)]


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *extras = typing.get_args(hint)
        bounds = [r for r in extras if isinstance(r, Range)]
        text = _describe(base)
        for r in bounds:
            parts = []
            if r.low is not None:
                parts.append(f"{'>' if r.above_low else '>='} {r.low:g}")
            if r.high is not None:
                parts.append(f"<= {r.high:g}")
            text += f" {' and '.join(parts)}"
        return text
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return {int: "a whole number", float: "a number", bool: "true or false", str: "a text"}.get(hint, str(hint))


def _check(value: Any, hint: Any) -> tuple[bool, Any]:
    """(fits, value converted to the field's type) for one value and one type hint."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *extras = typing.get_args(hint)
        fits, value = _check(value, base)
        if not fits:
            return False, value
        return all(r.violation(value) is None for r in extras if isinstance(r, Range)), value
    if origin is Literal:
        return value in typing.get_args(hint), value
    if origin in (Union, types.UnionType):
        for option in typing.get_args(hint):
            if option is type(None):
                if value is None:
                    return True, None
                continue
            fits, converted = _check(value, option)
            if fits:
                return True, converted
        return False, value
    if origin is list:
        if not isinstance(value, list | tuple):
            return False, value
        (item,) = typing.get_args(hint)
        checked = [_check(v, item) for v in value]
        return all(ok for ok, _ in checked), [v for _, v in checked]
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return True, float(value)
        return False, value
    if hint is str:
        return isinstance(value, str), value
    if hint is Any:
        return True, value
    raise TypeError(f"options of type {hint!r} are not supported")  # a programming error, not user input


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def check_options(cls: type, values: dict[str, Any], owner: str) -> dict[str, Any]:
    """``values`` checked against ``cls``'s fields; one line naming the option when one does not fit."""
    hints = field_types(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UnrelearnError(f"{owner} has no option {', '.join(unknown)}; its options: {', '.join(sorted(known))}")
    checked = {}
    for name, value in values.items():
        fits, converted = _check(value, hints[name])
        if not fits:
            raise UnrelearnError(f"{owner}: option {name}={value!r} must be {_describe(hints[name])}")
        checked[name] = converted
    return checked


class Options:
    """Mixin for config dataclasses: every field is checked when the config is built.

    Subclasses that add their own ``__post_init__`` call ``super().__post_init__()``.
    """

    def __post_init__(self) -> None:
        owner = getattr(self, "option_owner", type(self).__name__)
        for name, value in check_options(
            type(self), {f.name: getattr(self, f.name) for f in fields(self)}, owner
        ).items():
            object.__setattr__(self, name, value)


def extend_config(prefix: str, owner: Any, option_classes: tuple[type, ...], bases: tuple[type, ...]) -> type:
    """A config class for a defence around ``owner`` (a method class): ``bases`` plus the fields of
    ``option_classes`` (types, defaults and default factories kept), named ``PREFIX + owner's``."""
    own = [(f, typing.get_type_hints(cls, include_extras=True)[f.name]) for cls in option_classes for f in fields(cls)]
    made = make_dataclass(
        f"{prefix}{owner.Config.__name__}",
        [(f.name, hint, field(default=f.default) if f.default_factory is MISSING else field(default_factory=f.default_factory))
         for f, hint in own],
        bases=bases,
    )  # fmt: skip
    made.__doc__ = f"{owner.Config.__name__} plus {', '.join(c.__name__ for c in option_classes)}."
    return made
