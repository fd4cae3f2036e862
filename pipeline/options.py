"""Config sections as command-line options: a field's type, help text and range check sit beside the field.

A section is a dataclass deriving from :class:`Section`. A field whose values are limited says so where it
is declared, and the string under it is its ``--help``::

    log_every: int = option(20, at_least(1))
    \"\"\"steps between console/TensorBoard scalars\"\"\"

A rule over several fields of one section is a :class:`Rule` in the class's ``RULES``. :func:`check_section`
is the one function that runs the checks: a ``Section`` runs it when it is built, and :func:`build` (which
makes the tree from a file's or the command line's values) runs it for the sections other modules own that do
not derive from ``Section``. An option out of range raises :class:`OptionError`; ``build``, which knows the
section's place in the tree, turns it into one line naming the flag (``--faults.hang.timeout must be ...``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from basics.errors import UserError


@dataclass(frozen=True)
class Check:
    """A field's range: ``test(value)`` and, for the message and ``--help``, what a user must give."""

    test: Callable[[Any], bool]
    want: str


def option(default: Any = dataclasses.MISSING, check: Check | None = None, *, factory: Any = None) -> Any:
    """A dataclass field with its check beside it (``factory`` for mutable defaults, as ``default_factory``)."""
    metadata = {"check": check} if check is not None else {}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def at_least(low: int, note: str = "") -> Check:
    return Check(lambda x: x >= low, f"at least {low}{note}")


def finite(low: float = 0.0, *, above: bool = False, note: str = "") -> Check:
    """A finite number ``>= low`` (``> low`` with ``above``)."""
    if above:
        return Check(lambda x: math.isfinite(x) and x > low, f"a finite number > {low:g}{note}")
    return Check(lambda x: math.isfinite(x) and x >= low, f"a finite number >= {low:g}{note}")


AUTO = "auto"  # the word a FloatOrAuto option takes for "let the program choose"


class FloatOrAuto:
    """A field type: a number, or the word ``auto`` (the field then holds the string ``AUTO``; the module
    that reads it chooses the value). Only a type to annotate with: its values are plain floats or ``AUTO``."""


def or_auto(check: Check) -> Check:
    """``check``, or the word ``auto`` (for a :class:`FloatOrAuto` field)."""
    return Check(lambda x: x == AUTO or check.test(x), f"{check.want}, or {AUTO}")


def parse_float_or_auto(text: str) -> float | str:
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or {AUTO}, got {text!r}") from None


def one_of(*choices: Any) -> Check:
    shown = [str(c) for c in choices]
    return Check(lambda x: x in choices, " or ".join([", ".join(shown[:-1]), shown[-1]] if len(shown) > 1 else shown))


@dataclass(frozen=True)
class Rule:
    """A check across fields of one section: ``test`` gets the values of ``names`` in order; ``message`` names
    them as ``{name}`` (each becomes its flag) and the values are appended as ``(got ...)``."""

    names: tuple[str, ...]
    test: Callable[..., bool]
    message: str


PLACEHOLDER = re.compile(r"\{([\w.]+)\}")  # {name} in a check's message: the option, shown as its flag


class OptionError(UserError, ValueError):
    """An option out of range; ``render`` names each option as its flag once the section's place is known."""

    def __init__(self, template: str, names: tuple[str, ...], got: str, place: str | None = None):
        self.template, self.names, self.got = template, names, got
        super().__init__(self.render(place))

    def render(self, prefix: str | None) -> str:
        """``prefix`` is the section's dotted place in the tree (``"faults.hang."``); None: bare field names."""

        def name(match: re.Match[str]) -> str:
            if match.group(1) not in self.names:
                raise LookupError(f"check message {self.template!r} names {match.group(1)!r}, not one of {self.names}")
            return match.group(1) if prefix is None else f"--{flag(prefix + match.group(1))}"

        return f"{PLACEHOLDER.sub(name, self.template)} (got {self.got})"


class Section:
    """Base of the config sections: building one runs :func:`check_section` on it."""

    RULES: ClassVar[tuple[Rule, ...]] = ()

    def __post_init__(self) -> None:
        check_section(self)


_PLACES: dict[type, str] = {}  # a section's dotted place in the tree, so that a message names the flag


def name_places(root: type, prefix: str = "") -> None:
    """Remember where each section under ``root`` sits (``"faults.hang."``): its errors then name flags."""
    _PLACES[root] = prefix
    hints = typing.get_type_hints(root)
    for f in dataclasses.fields(root):
        if dataclasses.is_dataclass(hints[f.name]):
            name_places(hints[f.name], f"{prefix}{f.name}.")


def checks_of(cls: type) -> dict[str, Check]:
    """Every field's check of a section, by field name."""
    return {f.name: f.metadata["check"] for f in dataclasses.fields(cls) if "check" in f.metadata}


def check_section(section: Any) -> None:
    """The one place options are checked: every field of ``section`` against its check, then its rules."""
    for name, check in checks_of(type(section)).items():
        value = getattr(section, name)
        try:
            good = check.test(value)
        except TypeError:  # a value of the wrong type cannot be in range
            good = False
        if not good:
            raise OptionError(f"{{{name}}} must be {check.want}", (name,), show(value), _PLACES.get(type(section)))
    for rule in type(section).RULES if isinstance(section, Section) else ():
        values = [_get(section, name) for name in rule.names]  # a name that is no field fails here, every time
        if not rule.test(*values):
            raise OptionError(rule.message, rule.names, " and ".join(map(show, values)), _PLACES.get(type(section)))


def _get(section: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        section = getattr(section, part)
    return section


# ------------------------------------------------------------------------------------ the tree of sections


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass (its help text)."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


@dataclass(frozen=True)
class Leaf:
    """One option of the tree: its dotted path, field, resolved type, help text and check."""

    path: str
    field: dataclasses.Field
    kind: Any
    help: str
    check: Check | None


def leaves(cls: type, prefix: str = "") -> list[Leaf]:
    """Every scalar field of the tree under ``cls``, depth first."""
    hints = typing.get_type_hints(cls)
    checks = checks_of(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(kind):
            out += leaves(kind, path + ".")  # type: ignore[arg-type]
        else:
            out.append(Leaf(path, f, kind, field_docs(cls).get(f.name, ""), checks.get(f.name)))
    return out


def sections(cls: type) -> list[type]:
    """``cls`` and every section class below it."""
    hints = typing.get_type_hints(cls)
    below = [hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])]
    return [cls, *(s for kind in below for s in sections(kind))]


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """The section ``cls`` from plain values (a file's, the command line's): each value's type, then its checks."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        kind, value = hints[f.name], values[f.name]
        path = f"{prefix}{f.name}"
        kwargs[f.name] = build(kind, value, path + ".") if dataclasses.is_dataclass(kind) else coerce(kind, value, path)
    try:
        section = cls(**kwargs)
        if not isinstance(section, Section):
            check_section(section)
    except OptionError as e:
        raise UserError(e.render(prefix)) from None
    return section


def coerce(kind: Any, value: Any, path: str) -> Any:
    """Check a file's value against the field's type; ints pass as floats, lists as tuples."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if value is None and type(None) in args:
        return None
    if origin is typing.Union or (origin is not None and type(None) in args):
        kind = [a for a in args if a is not type(None)][0]
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"--{flag(path)}: expected a list, got {value!r}")
        items = [coerce(args[0], v, path) for v in value] if args else list(value)
        return tuple(items) if origin is tuple else items
    if kind is FloatOrAuto and isinstance(value, str):
        if value.strip().lower() == AUTO:
            return AUTO
        raise TypeError(f"--{flag(path)}: expected a number or {AUTO}, got {value!r}")
    if kind in (float, FloatOrAuto) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind in (int, str, bool) and type(value) is kind:
        return value
    if kind is FloatOrAuto:
        raise TypeError(f"--{flag(path)}: expected a number or {AUTO}, got {value!r}")
    if kind in (int, float, str, bool):
        want = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[kind]
        raise TypeError(f"--{flag(path)}: expected {want}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------ the command line


def text_parser(kind: Any) -> Any:
    """The argparse ``type`` for a field of type ``kind``."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin is typing.Union or (origin is not None and type(None) in args):  # X | None
        inner = [a for a in args if a is not type(None)][0]
        base = text_parser(inner)
        return lambda s: None if s.lower() in ("none", "null", "") else base(s)
    if kind is bool:
        return parse_bool
    if kind is FloatOrAuto:
        return parse_float_or_auto
    if origin in (list, tuple):
        item = text_parser(args[0]) if args else str
        return lambda s: [item(x) for x in s.split(",") if x.strip()]
    if kind in (int, float, str):
        return kind
    return str


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def metavar(kind: Any) -> str:
    if kind is bool:
        return "BOOL"
    if kind is FloatOrAuto:
        return f"FLOAT|{AUTO}"
    origin = typing.get_origin(kind)
    if origin in (list, tuple):
        return "A,B,..."
    return getattr(kind, "__name__", "VALUE").upper().replace("NONETYPE", "")


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def flag(path: str) -> str:
    return path.replace("_", "-")


def show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
