"""Settings: the one mechanism behind vtt-prep's and vtt-train's configs.

A config is a frozen dataclass whose `__post_init__` validates without I/O (a wrong value is a `ConfigError`
naming the setting); what needs the file system or the network is a separate `preflight` of each half. A
command-line flag is declared once, as a `Flag` beside the field it sets (in the field's metadata, or in a
table next to the dataclass when the fields live elsewhere); `click_options` makes the click options from
them: names, short forms and help from the Flag, the default shown from the dataclass, values converted by
`coerce`, the same code that converts YAML and `--set` values. Every option defaults to None, so a flag left
out is told apart from one given (vtt-train's YAML, vtt-prep's rerun keep their own value).

Lives in shards/ because both halves import it and shards/ is the one layer below both (tests/test_layering.py);
it needs only click, PyYAML and the standard library.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable

import click
import yaml

MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A setting that is unknown, mistyped, contradicts another one or cannot work; the message names it."""


class RawValue(str):
    """A value as typed on a command line (`--set`, a flag): a string field keeps it verbatim (templates like
    `{description_fr}` are not YAML mappings); numbers are read as Python reads them; anything else as YAML
    (`true`, `[0.9, 0.95]`, `null`)."""


def _args(tp: Any) -> tuple:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def _from_raw(value: RawValue, tp: Any, where: str) -> Any:
    text, args = value.strip(), _args(tp)
    if text in ("", "null", "~", "None") and type(None) in args:
        return None
    kinds = [a for a in args if a is not type(None)]
    if kinds == [str]:
        return str(value)
    for kind in (int, float):  # YAML 1.1 reads 3e-4 as a string
        if kind in kinds:
            try:
                return kind(text)
            except ValueError:
                pass
    if bool in kinds and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if str in kinds:  # "auto" of an int | str field, or a bool | str one
        return str(value)
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: {value!r} is not valid YAML: {e}") from e


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one YAML, `--set` or flag value against a dataclass field type (str, int, float, bool,
    tuples, optionals, dicts); a mismatch is a ConfigError naming `where`."""
    if isinstance(value, RawValue):
        value = _from_raw(value, tp, where)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(coerce(v, a, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    return _scalar(value, origin or tp, where)


def _scalar(value: Any, tp: Any, where: str) -> Any:
    if tp in (dict, list):
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected a {tp.__name__}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp in (int, float, str):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


class Flag:
    """One command-line flag of a config field: `name` ("--num-frames", "--lora/--no-lora" for a switch with
    its negation), `help` (never the default: that is read from the dataclass), `short` ("-q"), `dest` (the
    click parameter name; default: the name's), `field` (the field it sets, "section.field" in a tree;
    default: the dest), `type` (a click type when the field's own is not what is typed: Choice, a size
    string), `default_text` (what a None or computed default means), `show` (default -> text), `convert`
    (the click value -> the field's value), and any other click.option keyword (multiple, metavar, ...)."""

    def __init__(self, name: str, help: str = "", *, short: str | None = None, dest: str | None = None,
                 field: str | None = None, type: Any = None, default_text: str | None = None,
                 show: Callable[[Any], str] | None = None, convert: Callable[[Any], Any] | None = None,
                 **click_kw):
        self.name, self.help, self.short, self.type = name, help, short, type
        self.dest = dest or name.split("/")[0].lstrip("-").replace("-", "_")
        self.field = field or self.dest
        self.default_text, self.show, self.convert, self.click_kw = default_text, show, convert, click_kw


def setting(default: Any = MISSING, *args, default_factory: Any = MISSING, **flag_kw) -> Any:
    """A dataclass field with its flag: `x: int = setting(8, "--x", "Help.")`; no flag name: no flag."""
    meta = {"flag": Flag(*args, **flag_kw)} if args or flag_kw else {}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def flags_of(cls: type, names: tuple[str, ...] | None = None) -> list[Flag]:
    """The Flags in `cls`'s field metadata (only `names`, in that order, when given)."""
    found = {f.name: f.metadata["flag"] for f in dataclasses.fields(cls) if "flag" in f.metadata}
    for name, flag in found.items():
        flag.field = name  # setting() made the Flag before the field had a name
    return [found[n] for n in names] if names is not None else list(found.values())


def field_of(root: type, path: str) -> tuple[dataclasses.Field, Any]:
    """(the dataclass field, its resolved type) at "a.b" below `root`."""
    cls, f, tp = root, None, root
    for part in path.split("."):
        f = {x.name: x for x in dataclasses.fields(cls)}[part]
        tp = typing.get_type_hints(cls)[part]
        cls = tp
    return f, tp


def default_text(flag: Flag, f: dataclasses.Field) -> str | None:
    """The help's `[default: ...]`: the Flag's words for a None or computed default, else the dataclass's."""
    if flag.default_text is not None:
        return flag.default_text
    if isinstance(f.default, bool):
        return ("on" if f.default else "off") if "/" in flag.name else None
    if f.default in (MISSING, None, "", ()):
        return None
    if flag.show:
        return flag.show(f.default)
    return f"{f.default:g}" if isinstance(f.default, float) else str(f.default)


_TYPE_NAMES = {int: "integer", str: "text"}  # as click's own types are shown in --help


class FieldType(click.ParamType):
    """A flag's value converted by `coerce` against its field's type (as `--set` and YAML values are)."""

    def __init__(self, tp: Any, where: str):
        self.tp, self.where = tp, where
        kinds = [a for a in _args(tp) if a is not type(None)]
        self.name = "/".join(_TYPE_NAMES.get(k, getattr(k, "__name__", str(k))) for k in kinds).upper()

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            return coerce(RawValue(value), self.tp, self.where)
        except ConfigError as e:
            self.fail(str(e).removeprefix(f"{self.where}: "), param, ctx)


def click_options(flags: list[Flag], root: type, note: Callable[[str], str] = lambda field: ""):
    """A decorator adding one click option per Flag (in the given order), for fields of `root`; `note(field)`
    is appended inside the `[default: ...]` of that field's help."""
    def decorate(command):
        for flag in reversed(flags):
            decls, kw = option_args(flag, root, note)
            command = click.option(*decls, **kw)(command)
        return command
    return decorate


def make_options(flags: list[Flag], root: type) -> list[click.Option]:
    """The same options as objects, for a command that adds them when first used (see vtt.trainer.cli)."""
    return [click.Option(decls, **kw) for decls, kw in (option_args(f, root, lambda field: "") for f in flags)]


def option_args(flag: Flag, root: type, note: Callable[[str], str]) -> tuple[list[str], dict]:
    """(parameter declarations, click.Option keywords) of one Flag; default None: a flag left out is None."""
    f, tp = field_of(root, flag.field)
    text = default_text(flag, f)
    help_ = flag.help + (f"  [default: {text}{note(flag.field)}]" if text is not None else "")
    kw = dict(flag.click_kw)
    switch = "/" in flag.name or kw.get("is_flag")
    if not switch and "type" not in kw:
        element = typing.get_args(tp)[0] if kw.get("multiple") and typing.get_origin(tp) is tuple else tp
        kw["type"] = flag.type or (click.STRING if flag.convert else FieldType(element, flag.field))
    decls = [flag.name] + ([flag.short] if flag.short else []) + [flag.dest]
    return decls, {**kw, "default": None, "help": help_.strip()}


def values_of(flags: list[Flag], params: dict) -> dict:
    """{field: value} of the flags given (None or an empty repeatable: left out), `convert` applied."""
    out = {}
    for flag in flags:
        value = params.get(flag.dest)
        if value is None or value == ():
            continue
        try:
            out[flag.field] = flag.convert(value) if flag.convert else value
        except ValueError as e:
            raise ConfigError(str(e)) from e
    return out
