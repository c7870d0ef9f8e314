"""One config dataclass per service; every field settable from a CLI flag and
from the environment.

    @dataclass(frozen=True)
    class WorkerConfig:
        broker: str = field(default="memory://", metadata={"help": "broker URL"})
        max_batch_size: int = 32
        def __post_init__(self): ...validate, raise ValueError...

    add_config_args(parser, WorkerConfig)        # --broker, --max-batch-size, ...
    cfg = config_from_args(WorkerConfig, args)   # flag > FASTSERVE_MAX_BATCH_SIZE > default

Field name `max_batch_size` <-> flag `--max-batch-size` <-> env
`FASTSERVE_MAX_BATCH_SIZE`. Supported annotations: str, int, float, bool
(`--x/--no-x`; env 1/0/true/false/yes/no/on/off), X | None (env/flag value
"none" or "" means None), tuple[X, ...] / list[X] (comma-separated),
Literal[...] (choices). Field metadata: "help", "flag" (override the flag name).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar

ENV_PREFIX = "FASTSERVE_"
T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(ValueError):
    """A config value that cannot be parsed or does not validate."""


def env_name(field_name: str, prefix: str = ENV_PREFIX) -> str:
    return prefix + field_name.upper()


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _fields(cls: type, exclude: Iterable[str]) -> list[tuple[dataclasses.Field, Any]]:
    assert dataclasses.is_dataclass(cls), f"{cls} is not a dataclass"
    hints = typing.get_type_hints(cls, include_extras=False)
    skip = set(exclude)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init and f.name not in skip]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
        raise TypeError(f"unsupported union {tp}")
    return tp, False


def parse_value(text: str, tp: Any, where: str) -> Any:
    """Parse one string (env var or flag) into annotation `tp`."""
    inner, optional = _unwrap_optional(tp)
    if optional and text.strip().lower() in ("", "none", "null"):
        return None
    origin = typing.get_origin(inner)
    try:
        if origin in (tuple, list):
            item = typing.get_args(inner)[0] if typing.get_args(inner) else str
            items = [parse_value(p.strip(), item, where) for p in text.split(",") if p.strip()]
            return tuple(items) if origin is tuple else items
        if origin is Literal:
            choices = typing.get_args(inner)
            for c in choices:
                if str(c) == text:
                    return c
            raise ValueError(f"must be one of {', '.join(map(str, choices))}")
        if inner is bool:
            low = text.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError("must be one of 1/0/true/false/yes/no/on/off")
        if inner in (int, float, str):
            return inner(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: invalid value {text!r}: {exc}") from None
    raise TypeError(f"{where}: unsupported config annotation {tp!r}")


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if isinstance(value, (tuple, list)):
        value = ",".join(map(str, value))
    return f"default: {value}" if value != "" else "default: empty"


def add_config_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    exclude: Iterable[str] = (),
    env_prefix: str = ENV_PREFIX,
) -> None:
    """Add one flag per field of dataclass `cls`. Flags not given on the command
    line are absent from the parsed namespace (argparse.SUPPRESS) so that
    `config_from_args` can fall back to the environment, then the default."""
    for f, tp in _fields(cls, exclude):
        inner, _ = _unwrap_optional(tp)
        help_text = f"{f.metadata.get('help', '')} ({_default_text(f)}; env {env_name(f.name, env_prefix)})".strip()
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if inner is bool:
            parser.add_argument(flag_name(f), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if typing.get_origin(inner) is Literal:
            kwargs["choices"] = [str(c) for c in typing.get_args(inner)]
        parser.add_argument(flag_name(f), type=str, metavar=f.name.upper(), **kwargs)


def config_from_args(
    cls: type[T],
    args: argparse.Namespace | Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    exclude: Iterable[str] = (),
    env_prefix: str = ENV_PREFIX,
    **overrides: Any,
) -> T:
    """Build `cls` from, in order of precedence: `overrides` (typed values),
    flags in `args` (strings from add_config_args, or typed values), the
    environment (`env`, default os.environ), the dataclass defaults.
    Raises ConfigError with the offending flag/variable named."""
    env = os.environ if env is None else env
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    kwargs: dict[str, Any] = {}
    for f, tp in _fields(cls, exclude):
        if f.name in overrides:
            kwargs[f.name] = overrides[f.name]
        elif f.name in given:
            value = given[f.name]
            kwargs[f.name] = parse_value(value, tp, flag_name(f)) if isinstance(value, str) and tp is not str else value
        elif env_name(f.name, env_prefix) in env:
            kwargs[f.name] = parse_value(env[env_name(f.name, env_prefix)], tp, env_name(f.name, env_prefix))
    unknown = set(overrides) - {f.name for f, _ in _fields(cls, exclude)}
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from exc


def config_from_env(cls: type[T], env: Mapping[str, str] | None = None, **overrides: Any) -> T:
    return config_from_args(cls, None, env=env, **overrides)
