"""``key=value`` words parsed against typed configs: splitting the words, reading each value the way YAML would,
and building a component's ``Config`` dataclass from its dotted keys with OmegaConf, every failure a one-line
``ConfigError`` naming the key and what is allowed. ``config.py`` resolves a run's sections with these."""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lawa_suite.errors import ConfigError
from lawa_suite.files import first_line

__all__ = ["parse_overrides", "parse_value", "split_list", "list_fields", "build_section", "LIST_KEYS", "ALIASES"]

LIST_KEYS = {"averager", "trackers"}
ALIASES = {"data": "data.source"}


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """``["a=1", "b.c=x"]`` -> ``{"a": "1", "b.c": "x"}``; malformed or repeated keys are errors."""
    pairs: dict[str, str] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{item!r}: expected key=value (for example lr=0.1)")
        key = ALIASES.get(key, key)
        if key in pairs:
            raise ConfigError(f"{key}: given twice ({pairs[key]!r} and {value!r})")
        pairs[key] = value
    return pairs


def split_list(value: str) -> list[str]:
    return [v.strip() for v in value.strip("[]").split(",") if v.strip()]


def _check_choices(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{f.name}.")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ConfigError(f"{prefix}{f.name}: expected one of {', '.join(f.metadata['choices'])}, got {value!r}")


_TYPE_WORDS = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}
_NOT_CONVERTED = re.compile(r"Value '(.*)' of type '\w+' could not be converted to (\w+)")
_NOT_BOOL = re.compile(r"Value '(.*)' is not a valid bool")


def _omegaconf_message(exc: OmegaConfBaseException) -> str:
    """OmegaConf's error as our one line: ``steps: expected an integer, got 'abc'``."""
    key = getattr(exc, "full_key", "") or "?"
    msg = first_line(getattr(exc, "msg", None) or exc)
    converted = _NOT_CONVERTED.search(msg)
    if converted:
        value, kind = converted.groups()
        return f"{key}: expected {_TYPE_WORDS.get(kind, kind.lower())}, got {value!r}"
    if not_bool := _NOT_BOOL.search(msg):
        return f"{key}: expected true or false, got {not_bool.group(1)!r}"
    return f"{key}: {msg}"


def list_fields(schema: type, prefix: str = "") -> set[str]:
    """The fields of dataclass ``schema`` typed as lists (``phema.sigma_rel``), dotted, nested configs' too
    (``fid.final_at`` in the ddpm task's config)."""
    hints = typing.get_type_hints(schema)
    found = set()
    for f in dataclasses.fields(schema):
        hint = hints.get(f.name)
        if typing.get_origin(hint) is list:
            found.add(prefix + f.name)
        elif dataclasses.is_dataclass(hint):
            found |= list_fields(hint, f"{prefix}{f.name}.")
    return found


def _as_lists(schema: type, values: dict[str, Any]) -> dict[str, Any]:
    """A list field given one value or a comma list on the command line (``0.05,0.1``) as a list of parsed values."""
    lists = list_fields(schema)
    out = {}
    for key, value in values.items():
        if key in lists and isinstance(value, str):
            value = [parse_value(key, v) for v in split_list(value)]
        elif key in lists and not isinstance(value, (list, tuple)) and not OmegaConf.is_list(value):
            value = [value]
        out[key] = value
    return out


def build_section(section: str, schema: type, values: dict[str, Any]) -> Any:
    """Instantiate ``schema`` from dotted ``values``: OmegaConf parses and type-checks, __post_init__ ranges."""
    values = _as_lists(schema, values)
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, _nested(values))
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        message = _omegaconf_message(exc)
        raise ConfigError(f"{section}.{message}" if section else message) from None
    except ConfigError as exc:
        text = str(exc)
        raise ConfigError(f"{section}.{text}" if section and not text.startswith(section + ".") else text) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{section or 'config'}: {exc}") from None
    _check_choices(obj, f"{section}." if section else "")
    return obj


def _nested(values: dict[str, Any]) -> Any:
    cfg = OmegaConf.create({})
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def parse_value(key: str, raw: Any) -> Any:
    """Parse a command-line string the way YAML would (``5`` -> int, ``true`` -> bool, ``1e-3`` -> float)."""
    if not isinstance(raw, str):
        return raw
    if key in LIST_KEYS or key.rsplit(".", 1)[-1] in LIST_KEYS:
        return split_list(raw)
    if not raw.strip():
        return ""  # `resume=` means the empty string (YAML would read null; `key=null` still says that)
    parsed = OmegaConf.from_dotlist([f"v={raw}"]).v
    if isinstance(parsed, bool) and raw.strip().lower() not in ("true", "false"):
        return raw  # YAML 1.1 reads no/yes/on/off as booleans; mixed_precision=no means "no" (bool fields accept it)
    if isinstance(parsed, str):
        try:  # YAML reads 1e-3 as a string; a number is what anyone writing it means
            return float(parsed) if parsed.lower() not in ("nan", "inf", "-inf", "+inf") else parsed
        except ValueError:
            return parsed
    return parsed
