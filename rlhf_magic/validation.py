"""Settings -> a checked, frozen config: the one place where every setting is validated.

Cell text (parsing), the Python API, the CLI and the panels all build their configs with `build_config` (or
`with_options`, which puts settings over an existing config and checks the whole). It checks, in this order:
known keys (with near-miss hints), types, the ranges in each field's `Check` (config.py), then the `RULES` between
settings. Every failure is one line that names the setting, the value and what is accepted: "lr = -1: use a
number > 0, or None".
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal

from .config import RULES, LoraConfig
from .errors import ConfigError, did_you_mean


# ------------------------------------------------------------------------------------------- help
def _fields(cls: type) -> Iterator[tuple[str, dataclasses.Field]]:
    """(key, field) of every setting of `cls`, with `lora.*` after `lora`."""
    for f in dataclasses.fields(cls):
        yield f.name, f
        if f.name == "lora":
            for lf in dataclasses.fields(LoraConfig):
                yield f"lora.{lf.name}", lf


def field_help(cls: type) -> dict[str, str]:
    """Help line of every field of a config class, including the nested `lora.*` ones."""
    return {key: f.metadata.get("help", "") for key, f in _fields(cls)}


def describe(cls: type) -> str:
    """Plain-text settings table of a config class (magic docstrings and `--help`): help, default, range."""
    lines = []
    for key, f in _fields(cls):
        default = _default(f)
        short = getattr(f.metadata.get("check"), "short", "")
        shown = "" if dataclasses.is_dataclass(default) else f" (default {default!r}{', ' + short if short else ''})"
        lines.append(f"  {key:<20} {f.metadata.get('help', '')}{shown}")
    return "\n".join(lines)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


# ------------------------------------------------------------------------------------------- building
def build_config(cls: type, values: dict[str, Any], where: dict[str, str] | None = None) -> Any:
    """Check `values` against `cls` and return a frozen config.

    Keys may be dotted (`lora.r`); `lora` may also be a dict of lora settings. `where` maps a key to a location
    such as "line 3" for error messages.
    """
    where = dict(where or {})
    names = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    plain: dict[str, Any] = {}
    lora_over: dict[str, Any] = {}
    given: dict[str, Any] = {}
    for key, value in values.items():
        top, _, sub = key.partition(".")
        if top not in names or (sub and top != "lora"):
            raise ConfigError(
                f"{_at(where, key)}unknown setting {key!r}{did_you_mean(key, list(field_help(cls)))}; "
                f"settings are: {', '.join(sorted(names))}"
            )
        if sub:
            lora_over[sub] = given[key] = value
        elif top == "lora" and isinstance(value, dict):  # lora = {"r": 8}: lora.r = 8 over the defaults
            plain["lora"] = LoraConfig()
            for sub_key, sub_value in value.items():
                full = f"lora.{sub_key}"
                if full not in given:  # an explicit `lora.r` wins over the dict
                    lora_over[str(sub_key)] = given[full] = sub_value
                    where.setdefault(full, where.get("lora", ""))
        else:
            plain[top] = check_value(key, value, hints[top], where)
            given[key] = value
    if "lora" in names:
        plain["lora"] = _merge_lora(plain.get("lora", _default(_field(cls, "lora"))), lora_over, where)
    return _checked(cls(**plain), given, where)


def with_options(cls: type, config: Any, options: dict[str, Any], where: str | None = None) -> Any:
    """`config` (or the defaults) with `options` on top, all checked by `build_config`; `where` prefixes errors
    about `options` (e.g. "%rank")."""
    if config is not None and not isinstance(config, cls):
        raise ConfigError(f"config must be a {cls.__name__}, not {type(config).__name__}")
    base = {} if config is None else {f.name: getattr(config, f.name) for f in dataclasses.fields(cls)}
    return build_config(cls, {**base, **options}, {k: where for k in options} if where else None)


def _checked(cfg: Any, given: dict[str, Any], where: dict[str, str]) -> Any:
    """`cfg` if every range and rule holds; else a one-line ConfigError for the first setting (in the order the
    user gave them) that breaks one. The value shown is the one given (`lr = -1`, not `-1.0`)."""
    checks = {key: (value, check) for key, value, check in _ranges(cfg)}
    for key in [*(k for k in given if k in checks), *(k for k in checks if k not in given)]:
        value, check = checks[key]
        if not _passes(check, value):
            raise ConfigError(f"{_at(where, key)}{key} = {given.get(key, value)!r}: {check.text}")
    for key, ok, text in RULES.get(type(cfg), ()):
        if not ok(cfg):
            raise ConfigError(f"{_at(where, key)}{key} = {given.get(key, getattr(cfg, key))!r}: {text.format(c=cfg)}")
    return cfg


def _passes(check: Any, value: Any) -> bool:
    try:
        return bool(check.ok(value))
    except TypeError:  # a config made by hand, with a value of the wrong type
        return False


def _ranges(cfg: Any) -> Iterator[tuple[str, Any, Any]]:
    """(key, value, Check) of every checked setting of `cfg`, `lora.*` included."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if "check" in f.metadata:
            yield f.name, value, f.metadata["check"]
        if isinstance(value, LoraConfig):
            yield from ((f"lora.{k}", v, c) for k, v, c in _ranges(value))


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _merge_lora(base: Any, overrides: dict[str, Any], where: dict[str, str]) -> LoraConfig | None:
    """`base` with the `lora.*` settings on top, each type-checked (their ranges are checked with the rest)."""
    if not overrides:
        return base
    if base is None:
        base = LoraConfig()  # `lora = False` then `lora.r = 8`: the explicit sub-setting wins
    hints = typing.get_type_hints(LoraConfig)
    fixed = {}
    for sub, value in overrides.items():
        if sub not in hints:
            raise ConfigError(
                f"{_at(where, 'lora.' + sub)}unknown setting 'lora.{sub}'"
                f"{did_you_mean(sub, hints)}; lora settings are: {', '.join(hints)}"
            )
        fixed[sub] = check_value(f"lora.{sub}", value, hints[sub], where)
    return dataclasses.replace(base, **fixed)


def _at(where: dict[str, str], key: str) -> str:
    return f"{where[key]}: " if where.get(key) else ""


# ------------------------------------------------------------------------------------------- types
def check_value(key: str, value: Any, tp: Any, where: dict[str, str] | None = None) -> Any:
    """Return `value` converted to type `tp`, or raise a one-line ConfigError naming the key."""
    ok, out = _coerce(value, tp)
    if ok:
        return out
    raise ConfigError(f"{_at(where or {}, key)}{key} = {value!r} is not valid; expected {_type_name(tp)}")


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    if tp is Any:
        return True, value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is False and LoraConfig in typing.get_args(tp):
            return True, None  # `lora = False`: full fine-tuning
        for arm in typing.get_args(tp):
            ok, out = _coerce(value, arm)
            if ok:
                return True, out
        return False, None
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp)), value
    if tp is type(None):
        return value is None, None
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    if tp is str:
        return isinstance(value, str), value
    if origin is tuple:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return True, tuple(value)
        return False, None
    if tp is LoraConfig:
        return (True, LoraConfig()) if value is True else (isinstance(value, LoraConfig), value)
    return isinstance(value, tp), value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    if tp is LoraConfig:
        return "True, False or a dict of lora settings"
    if origin is tuple:
        return "a list of strings"
    return getattr(tp, "__name__", str(tp))
