"""Config dataclasses in TOML files and on the command line, the flags generated from the fields.

A component's settings are one dataclass (STYLE 3); its fields, their defaults and the one-line doc
under each are the only place an option is described. This module derives the rest from them:

- `add_flags`: an argparse flag per field, `--field-name`, and `--table.field-name` for the fields of
  a nested dataclass; the field's doc is the help, its default is shown. Older names of a flag are
  kept as aliases (`--inner-steps` for `--sync-every`).
- `load_toml`: a table of a TOML file as field values, checked against the fields: an unknown key or
  a value of the wrong type is an error that names the file and the key.
- `build`: the dataclass from its defaults < the file < the flags the user actually passed (a flag
  left out never overrides the file: generated flags have no argparse default).

Values travel as nested dicts keyed by field name, the shape of the TOML table:
`{"steps": 200, "data": {"batch_size": 8}}`. A field `X | None = None` given as a partial table is X
built from its defaults, or from `metadata["base"](kwargs)` (the other fields, built) when the field
names a better start: the outer optimizer starts from the codec's recipe.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import textwrap
import tomllib
import types
import typing
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")
DEST = "config:"
"""Prefix of the argparse dest of a generated flag (`config:data.batch_size`), which tells them apart."""


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
              aliases: Mapping[str, str] | None = None, skip: Collection[str] = (), own: bool = False) -> None:
    """Add a flag for each field of dataclass `cls` (recursively for nested dataclasses).

    Args:
        parser: the parser or argument group the flags go to.
        cls: the config dataclass.
        aliases: dotted field path -> another flag name for it (`{"data.paths": "--data"}`).
        skip: dotted field paths that get no flag (set in the file, or by a flag of the caller's own).
        own: only the fields `cls` declares, not those of the dataclasses it extends (flagged already).
    """
    if own:
        skip = {*skip, *(f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base)
                         for f in dataclasses.fields(base))}
    _add_flags(parser, cls, prefix="", aliases=aliases or {}, skip=skip, unset="")


def _add_flags(parser: Any, cls: type, *, prefix: str, aliases: Mapping[str, str], skip: Collection[str],
               unset: str) -> None:
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        if not f.init or path in skip:
            continue
        kind, _ = _optional(_hints(cls)[f.name])
        default = _declared(f)
        if dataclasses.is_dataclass(kind):
            # A nested table. Under a field whose default is None its fields' defaults are not the
            # defaults: that field's doc says what unset means.
            why = unset or (f"{path}: {docs.get(f.name, '')}" if f.default is None else "")
            _add_flags(parser, kind, prefix=path + ".", aliases=aliases, skip=skip, unset=why)
            continue
        names = ["--" + path.replace("_", "-")] + ([aliases[path]] if path in aliases else [])
        parser.add_argument(*names, dest=DEST + path, default=argparse.SUPPRESS,
                            help=_help(docs.get(f.name, ""), default, unset), **_parse_as(kind, f.name))


def _parse_as(kind: Any, name: str) -> dict[str, Any]:
    """argparse's type/choices/nargs/action for a field of type `kind`."""
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if get_origin(kind) is Literal:
        choices = get_args(kind)
        return {"type": type(choices[0]), "choices": choices}
    if get_origin(kind) is list:
        return {"type": get_args(kind)[0], "nargs": "+", "metavar": name.upper()}
    return {"type": kind, "metavar": name.upper()}


def _help(doc: str, default: Any, unset: str) -> str:
    shown = f" ({unset})" if unset else "" if default is None or default == [] else f" (default: {default})"
    return (doc + shown).replace("%", "%%")  # argparse %-formats help


def flag_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The values of `cls`'s fields given as generated flags on the command line (nested dicts)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if not dest.startswith(DEST):
            continue
        *tables, key = dest[len(DEST):].split(".")
        if (tables[0] if tables else key) in names:
            target = values
            for table in tables:
                target = target.setdefault(table, {})
            target[key] = value
    return values


def to_flags(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Command-line flags that give `values` (nested dicts) to a command with the generated flags."""
    argv: list[str] = []
    for key, value in values.items():
        flag = "--" + (prefix + key).replace("_", "-")
        if value is None:
            continue
        if isinstance(value, Mapping):
            argv += to_flags(value, prefix + key + ".")
        elif isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def load_toml(cls: type, path: str | Path, table: str) -> dict[str, Any]:
    """The `[table]` of TOML file `path` as values of dataclass `cls`'s fields, checked.

    Raises:
        ValueError: the file is not TOML, has no `[table]`, or the table has a key `cls` does not know
            or a value of the wrong type; the message names the file and the key.
        OSError: the file cannot be read.
    """
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from None
    tables = {key: value for key, value in data.items() if isinstance(value, dict)}
    if table not in tables:
        raise ValueError(f"{path}: no [{table}] table (tables in the file: {', '.join(tables) or 'none'})")
    try:
        return check_table(cls, tables[table], where=table)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def check_table(cls: type, table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`table` as values of dataclass `cls`'s fields: keys known, types right (an int is a float too).

    Raises:
        ValueError: an unknown key (the known ones listed) or a wrong type, naming `where.key`.
    """
    hints = _hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    values = {}
    for key, value in table.items():
        if key not in known:
            raise ValueError(f"unknown key {where}.{key}; known keys of [{where}]: {', '.join(known)}")
        values[key] = _checked(value, hints[key], f"{where}.{key}")
    return values


def _checked(value: Any, kind: Any, key: str) -> Any:
    kind, _ = _optional(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a table ([{key}]), got {value!r}")
        return check_table(kind, value, key)  # type: ignore[arg-type]
    if get_origin(kind) is Literal:
        if value not in get_args(kind):
            raise ValueError(f"{key} must be one of {', '.join(map(repr, get_args(kind)))}, got {value!r}")
        return value
    if get_origin(kind) is list:
        if not isinstance(value, list):
            raise ValueError(f"{key} must be a list, got {value!r}")
        return [_checked(item, get_args(kind)[0], f"{key}[{i}]") for i, item in enumerate(value)]
    if kind is float and type(value) is int:
        return float(value)
    if type(value) is not kind:  # exact: a bool is no int here, nor an int a str
        raise ValueError(f"{key} must be {_NAMES.get(kind, kind)}, got {value!r} ({type(value).__name__})")
    return value


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts merged key by key; a later layer's value wins."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = merge(out[key], value)
            else:
                out[key] = dict(value) if isinstance(value, Mapping) else value
    return out


def build(cls: type[T], *layers: Mapping[str, Any]) -> T:
    """Dataclass `cls` from its defaults overlaid by `layers` (nested dicts of field values; later ones win).

    Raises:
        ValueError: an unknown key, or a value the dataclass refuses (its message names the option).
    """
    return cls(**_kwargs(cls, merge(*layers)))


def _kwargs(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    hints = _hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise ValueError(f"{cls.__name__} has no option {unknown[0]!r}; known: {', '.join(by_name)}")
    kwargs: dict[str, Any] = {}
    # Fields that start from a base last: the base is made from the other fields' values (built).
    for key in sorted(values, key=lambda k: "base" in by_name[k].metadata):
        value, kind = values[key], _optional(hints[key])[0]
        if dataclasses.is_dataclass(kind) and isinstance(value, Mapping):
            base = by_name[key].metadata.get("base")
            given = _kwargs(kind, value)  # type: ignore[arg-type]
            value = dataclasses.replace(base(kwargs), **given) if base else kind(**given)
        kwargs[key] = value
    return kwargs


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The doc of each field of dataclass `cls` (the string right under it), its bases' fields too."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body  # type: ignore[attr-defined]
        except (OSError, TypeError):  # no source (a frozen or generated class): no help text
            continue
        for node, after in itertools.pairwise(body):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _declared(f: dataclasses.Field[Any]) -> Any:
    """The default a field declares (not what __post_init__ may make of it); None when it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _optional(kind: Any) -> tuple[Any, bool]:
    """(X, True) for `X | None`, else (kind, False)."""
    if get_origin(kind) in (typing.Union, types.UnionType):
        rest = [a for a in get_args(kind) if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return kind, False
