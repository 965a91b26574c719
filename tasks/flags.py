"""Command-line flags generated from a pydantic settings model.

A command's settings model (tasks/settings.py) holds each default and its description; the
flags are made from its fields, so `--help` shows both and no default is written twice. A
field becomes `--field-name` with the field's type; `Flag` says where a flag is spelt
otherwise (`--db` for `db_url`, `--no-json-plan` for `json_plan`, an environment variable
read when the flag is absent).

Generated flags default to argparse.SUPPRESS: an absent flag leaves no attribute, so the
settings built from the namespace take the model's own default, not a copy of it.
"""

from __future__ import annotations

import argparse
import json
import os
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo


class SettingsError(ValueError):
    """A flag value the settings model refused; the message names the flag."""


def json_object(text: str) -> dict[str, Any]:
    """argparse type of a dict field (--extra-body): a JSON object, or a one-line usage error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


@dataclass(frozen=True)
class Flag:
    """How one field shows on the command line where it differs from `--field-name`."""

    name: str | None = None
    metavar: str | None = None
    # The command insists on the flag though the model has a default (`--out` of export).
    required: bool = False
    # Read when the flag is absent; unset too: the model's default.
    env: str | None = None
    # When the flag is absent (and `env` unset): the command's own value instead of the
    # model's default, e.g. the progress bar only on a terminal; `absent_help` says so.
    absent: Callable[[], Any] | None = None
    absent_help: str | None = None
    # A bool field: "--x/--no-x" both spellings (BooleanOptionalAction). Otherwise a field
    # that defaults to False is switched on by `--x` and one that defaults to True is
    # switched off by `--no-x`.
    both: bool = False
    choices: tuple[str, ...] | None = None


def _flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _dest(name: str) -> str:
    return name.removeprefix("--").replace("-", "_")


def _inner(annotation: Any) -> Any:
    """`X` of `X | None`."""
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def field_default(info: FieldInfo) -> Any:
    return info.get_default(call_default_factory=True)


def default_of(model: type[BaseModel], name: str) -> Any:
    """The settings model's default of `name`, for a lower layer's own default (a dataclass
    field, a function parameter) that must equal it: it names its source instead of
    repeating the value. A misspelt name fails at import."""
    return field_default(model.model_fields[name])


class Defaults:
    """A settings model's defaults as read-only attributes (`BUILD.max_paragraph_tokens`):
    what a lower layer's own default (a dataclass field, a function parameter) names instead
    of repeating the value. A misspelt name fails at import."""

    def __init__(self, model: type[BaseModel]) -> None:
        object.__setattr__(self, "_model", model)

    def __getattr__(self, name: str) -> Any:
        try:
            return default_of(self._model, name)
        except KeyError:
            raise AttributeError(f"{self._model.__name__} has no field {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("settings defaults are read-only: change them in tasks/settings.py")


def derive(cls: type[Any], source: Any, **given: Any) -> Any:
    """A stage config (a dataclass) from settings: every field of `cls` that `source` has
    under the same name, then `given` (renamed or computed fields) on top. A stage config
    is made by one call of this, not a field-by-field copy that forgets the next field."""
    assert is_dataclass(cls), cls
    names = {f.name for f in fields(cls) if f.init}
    unknown = set(given) - names
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {sorted(unknown)}")
    values = {n: getattr(source, n) for n in names if n not in given and hasattr(source, n)}
    return cls(**values, **given)


class Flags:
    """The flags of one settings model (or some of its fields) on one parser."""

    def __init__(
        self,
        model: type[BaseModel],
        only: Iterable[str] | None = None,
        exclude: Iterable[str] = (),
        flags: Mapping[str, Flag] | None = None,
    ) -> None:
        self.model = model
        names = list(only) if only is not None else list(model.model_fields)
        skip = set(exclude)
        self.fields = [n for n in names if n not in skip]
        # Spellings shared by several commands: the ones of fields this model has.
        self.specs = {k: v for k, v in (flags or {}).items() if k in model.model_fields}
        missing = set(self.fields) - set(model.model_fields)
        if missing:
            raise TypeError(f"{model.__name__} has no field {sorted(missing)}")

    def spec(self, name: str) -> Flag:
        return self.specs.get(name, Flag())

    def _kind(self, name: str) -> str:
        """store | negate | switch | both (the last three: a bool field)."""
        info = self.model.model_fields[name]
        if _inner(info.annotation) is not bool:
            return "store"
        if self.spec(name).both:
            return "both"
        return "negate" if field_default(info) is True else "switch"

    def flag(self, name: str) -> str:
        """The flag that sets field `name` (for error messages that name it)."""
        spec = self.spec(name)
        if spec.name:
            return spec.name
        if self._kind(name) == "negate":
            return "--no-" + name.replace("_", "-")
        return _flag_name(name)

    def help(self, name: str) -> str:
        info = self.model.model_fields[name]
        spec = self.spec(name)
        text = info.description or name.replace("_", " ")
        kind = self._kind(name)
        # A flag the command requires has no default to show (the model's is for deployments).
        required = info.is_required() or spec.required
        default = None if required else field_default(info)
        if kind == "negate":
            text = f"turn off: {text}"
        elif spec.absent_help:
            text += f" (default: {spec.absent_help})"
        elif kind == "store" and default not in (None, [], {}, ""):
            shown = f"${spec.env}, else {default}" if spec.env else default
            text += f" (default: {shown})"
        elif spec.env:
            text += f" (default: ${spec.env})"
        if get_origin(_inner(info.annotation)) is list:
            text += " (repeatable)"
        # argparse formats help with %: a literal one (id % partitions) must be doubled.
        return text.replace("%", "%%")

    def groups(self) -> list[tuple[type, list[str]]]:
        """The fields by the class that declares them: the model's own first, then each
        mixin's (the writer's endpoint, the judge, ...), in the model's base order."""
        by_owner: dict[type, list[str]] = {}
        for name in self.fields:
            owner = next(
                c for c in self.model.__mro__ if name in c.__dict__.get("__annotations__", {})
            )
            by_owner.setdefault(owner, []).append(name)
        return sorted(by_owner.items(), key=lambda kv: self.model.__mro__.index(kv[0]))

    def add_to(self, parser: argparse.ArgumentParser | Any, title: str | None = None) -> None:
        """Add the flags; a mixin's under a heading (its docstring's first line), or with
        `title` all of them under that one heading."""
        heading = parser.add_argument_group(title) if title else None
        for owner, names in self.groups():
            target = heading or parser
            if heading is None and owner is not self.model:
                mixin = (owner.__doc__ or owner.__name__).strip().splitlines()[0].rstrip(".")
                target = parser.add_argument_group(mixin)
            for name in names:
                action = self._add(target, name)
                # What tests/tasks/test_settings.py reads: this flag was made from that field,
                # and shows this default instead of the model's when absent_help is set.
                action.settings_field = (self.model.__name__, name)
                action.absent_help = self.spec(name).absent_help

    def _add(self, parser: Any, name: str) -> argparse.Action:
        info = self.model.model_fields[name]
        spec = self.spec(name)
        flag = self.flag(name)
        kw: dict[str, Any] = {"help": self.help(name), "dest": _dest(flag)}
        kind = self._kind(name)
        if kind != "store":
            if kind == "both":
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["action"] = "store_true"
            return parser.add_argument(flag, default=argparse.SUPPRESS, **kw)
        inner = _inner(info.annotation)
        if spec.required or info.is_required():
            kw["required"] = True
        else:
            kw["default"] = argparse.SUPPRESS
        if spec.metavar:
            kw["metavar"] = spec.metavar
        origin = get_origin(inner)
        if origin is list:
            kw["action"] = "append"
            (item,) = get_args(inner) or (str,)
            kw["type"] = item if item in (int, float) else str
        elif origin is dict or inner is dict:
            kw["type"] = json_object
            kw.setdefault("metavar", "JSON")
        elif origin is Literal:
            kw["choices"] = tuple(get_args(inner))
        elif inner in (int, float):
            kw["type"] = inner
        elif inner not in (str, Path):
            raise TypeError(f"{self.model.__name__}.{name}: no flag for {info.annotation!r}")
        if spec.choices:
            kw["choices"] = spec.choices
        return parser.add_argument(flag, **kw)

    def values(self, args: argparse.Namespace) -> dict[str, Any]:
        """Field values the command line gives: flags present (None counts as absent, as an
        argparse default of None), else the flag's environment variable or `absent`."""
        out: dict[str, Any] = {}
        for name in self.fields:
            spec = self.spec(name)
            kind = self._kind(name)
            value = getattr(args, _dest(self.flag(name)), None)
            if kind == "negate":
                if value:
                    out[name] = False
                continue
            if kind == "switch" and value is False:
                value = None  # store_true not given, from a parser with argparse defaults
            if value is not None:
                out[name] = value
            elif spec.env and os.environ.get(spec.env):
                out[name] = os.environ[spec.env]
            elif spec.absent is not None:
                out[name] = spec.absent()
        return out

    def settings(self, args: argparse.Namespace, **given: Any) -> Any:
        """The model from the command line (`given` on top); a refused value raises
        SettingsError naming its flag."""
        values = {**self.values(args), **given}
        try:
            return self.model(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = first.get("loc") or ()
            field = str(loc[0]) if loc else ""
            where = self.flag(field) if field in self.model.model_fields else "settings"
            raise SettingsError(f"{where}: {first['msg']}") from None
