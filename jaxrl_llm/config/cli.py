"""Command line: ``--config PATH`` then ``--config.a.b=value`` overrides, with messages of our own.

absl's ``config_flags`` would do the parsing, but its errors are tracebacks about flags; ours name the
dotted key, the value and what the schema allows, and arrive all at once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import traceback
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections

from .schema import FIELDS, FIELDS_BY_KEY, Field, base_config, section_of
from .validate import ConfigError, check_field, flatten, is_section, show, unknown_key, validate

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")
_TYPE_WORDS = {int: "an integer", float: "a number"}
_USAGE_HINT = "expected --config PATH and --config.<key>=<value> overrides"


def _plain(tree: Any) -> Any:
    return {k: _plain(v) for k, v in tree.items()} if is_section(tree) else tree


def _untyped(tree: Any) -> ml_collections.ConfigDict:
    # A fresh, unlocked, type-unsafe copy: overrides never mutate the caller's config, and a wrong type
    # reaches `validate` rather than an ml-collections TypeError.
    return ml_collections.ConfigDict(_plain(tree), type_safe=False)


def load_config(path: str) -> ml_collections.ConfigDict:
    """Runs ``get_config()`` from the Python file at ``path``; any failure is a ConfigError naming the path."""
    where = f"config file {path!r}"
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: no such file")
    if not path.endswith(".py"):
        raise ConfigError(f"{where}: expected a .py file that defines get_config()")
    name = "_jaxrl_llm_config_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        raise ConfigError(f"{where}: syntax error on line {err.lineno}: {err.msg}") from None
    except Exception as err:  # a failure in user code is reported, not raised
        raise ConfigError(f"{where}: {_describe_failure(err, path)}") from None
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"{where}: defines no get_config() function")
    try:
        cfg = get_config()
    except Exception as err:
        raise ConfigError(f"{where}: get_config() {_describe_failure(err, path)}") from None
    if not is_section(cfg):
        raise ConfigError(f"{where}: get_config() returned {type(cfg).__name__}, expected a ConfigDict")
    return _untyped(cfg)


def _describe_failure(err: Exception, path: str) -> str:
    """``raised KeyError: 'x' (line 12)``: the line is the last one in the config file the error passed."""
    target = os.path.realpath(path)
    lines = [
        f.lineno for f in traceback.extract_tb(err.__traceback__) if os.path.realpath(f.filename) == target
    ]
    line = f" (line {lines[-1]})" if lines else ""
    return f"raised {type(err).__name__}: {err}{line}"


def coerce(field: Field, raw: str) -> Any:
    """Parses an override string as ``field``'s type; raises ConfigError naming the key and value."""
    text = raw.strip()
    if field.nullable and text.lower() in ("none", "null"):
        return None
    if field.type is str:
        return raw
    if field.type is list:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{field.key}={show(raw)}: expected a JSON list ({err.msg})") from None
        except RecursionError:
            raise ConfigError(f"{field.key}={show(raw)}: expected a JSON list (nested too deeply)") from None
        if not isinstance(value, list):
            raise ConfigError(f"{field.key}={show(raw)}: expected a JSON list, got {type(value).__name__}")
        return value
    if field.type is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ConfigError(f"{field.key}={show(raw)}: expected bool (true/false, yes/no, 1/0)")
    number = _number(text, field.type)
    if number is None:
        raise ConfigError(
            f"{field.key}={show(raw)}: expected {field.allowed()}; {show(raw)} is not {_TYPE_WORDS[field.type]}"
        )
    return number


def _number(text: str, kind: type) -> int | float | None:
    try:
        return kind(text)
    except ValueError:
        pass
    if kind is int:
        try:
            number = float(text)
        except ValueError:
            return None
        # Step counts are often written 1e4; accept a float spelling of a whole number.
        if number.is_integer():
            return int(number)
    return None


def apply_overrides(
    cfg: Any, overrides: Mapping[str, Any] | Iterable[tuple[str, Any]]
) -> ml_collections.ConfigDict:
    """Returns a copy of ``cfg`` with each ``(dotted_key, value)`` set in order.

    String values are coerced to the key's schema type; other values are set as given (``validate``
    checks them). Every bad key or value is collected into one ConfigError.
    """
    cfg = _untyped(cfg)
    problems = []
    for key, value in overrides.items() if isinstance(overrides, Mapping) else overrides:
        field = FIELDS_BY_KEY.get(key)
        if field is None:
            problems.append(_not_a_key(key, value))
            continue
        try:
            value = coerce(field, value) if isinstance(value, str) else value
            _set(cfg, key, value)
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError(problems)
    return cfg


def _not_a_key(key: str, value: Any) -> str:
    inside = [f.key for f in FIELDS if f.key.startswith(f"{key}.")]
    if inside:
        return f"{key}={show(value)}: is a section, not a key; override one of its keys, e.g. {inside[0]}"
    return unknown_key(key, value)


def _set(cfg: ml_collections.ConfigDict, key: str, value: Any) -> None:
    node = cfg
    for part in key.split(".")[:-1]:
        if part not in node:
            node[part] = ml_collections.ConfigDict(type_safe=False)
        elif not is_section(node[part]):
            raise ConfigError(
                f"{key}={show(value)}: cannot set it, {section_of(key)} is a value, not a section"
            )
        node = node[part]
    node[key.rpartition(".")[2]] = value


def _split_args(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    """Separates the config path from the overrides, and collects a problem for each malformed argument."""
    path, overrides, problems = None, [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        name, eq, value = arg.partition("=")
        if name != "--config" and not name.startswith("--config."):
            hint = f"; did you mean --{arg.lstrip('-')}?" if arg.lstrip("-").startswith("config") else ""
            problems.append(f"{arg!r}: unknown argument; {_USAGE_HINT}{hint}")
            continue
        if not eq:
            # Space-separated form; "--" starts the next option while "-1" is still a value.
            if i >= len(argv) or argv[i].startswith("--"):
                problems.append(f"{name}: missing value")
                continue
            value, i = argv[i], i + 1
        if name != "--config":
            overrides.append((name.removeprefix("--config."), value))
        elif path is not None:
            problems.append(f"--config={value!r}: config file given twice (first {path!r}); pass one")
        else:
            path = value
    return path, overrides, problems


def parse_args(argv: Sequence[str]) -> ml_collections.ConfigDict:
    """``[--config PATH] [--config.a.b=value ...]`` -> the validated config.

    Without ``--config`` the overrides apply to ``base_config()``. Raises one ConfigError listing every bad
    argument, config file and override; only if there are none, validates and raises what it finds.
    """
    path, overrides, problems = _split_args(argv)
    cfg = base_config()
    if path is not None:
        try:
            cfg = load_config(path)
        except ConfigError as err:
            problems += err.problems  # the overrides are still checked, against the base config
    try:
        cfg = apply_overrides(cfg, overrides)
    except ConfigError as err:
        problems += err.problems
    if problems:
        raise ConfigError(problems + _checked_alone(overrides))
    validate(cfg)
    return cfg


def _checked_alone(overrides: list[tuple[str, str]]) -> list[str]:
    """The problems of the overrides that parsed, so that an out-of-range value is named beside an
    unparsable one rather than only after it is fixed."""
    problems = []
    for key, raw in overrides:
        field = FIELDS_BY_KEY.get(key)
        if field is None:
            continue
        try:
            value = coerce(field, raw)
        except ConfigError:
            continue
        if problem := check_field(field, value):
            problems.append(problem)
    return problems


def format_config(cfg: Any) -> str:
    """One ``key = value`` line per key, in schema order, for printing the resolved config."""
    flat, _, _ = flatten(cfg)
    keys = [f.key for f in FIELDS if f.key in flat]
    width = max((len(k) for k in keys), default=0)
    return "\n".join(f"{k:<{width}} = {flat[k]!r}" for k in keys)
