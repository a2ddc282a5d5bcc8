"""Service configuration from flags and `GENSET_*` environment variables.

A config is a dataclass; each field becomes a flag (`drain_timeout` -> `--drain-timeout`) and
an environment variable (`GENSET_DRAIN_TIMEOUT`). A flag given on the command line beats the
environment, which beats the field's default. Values are checked as they are read: a bad one
raises ConfigError naming the flag or variable it came from, never a traceback later on.

Any service can describe its own options the same way:

    @dataclass
    class RouterConfig:
        block_size: int = field(default=16, metadata=opt("KV block size in tokens", min=1))

    add_dataclass_args(parser, RouterConfig)
    cfg = dataclass_from_args(RouterConfig, parser.parse_args(argv))
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import proto.subjects

ENV_PREFIX = "GENSET_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """`--help` shows each option's default, unless its help text already says it (or there
    is none to show): argparse's ArgumentDefaultsHelpFormatter would repeat hand-written
    "(default ...)" notes."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default in (None, False, argparse.SUPPRESS)
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"

    def _format_action(self, action: argparse.Action) -> str:
        # argparse shows nothing for an option without help text: give it its default
        if (action.help is None and action.option_strings
                and action.default not in (None, False, argparse.SUPPRESS)):
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names where it came from."""


class FieldError(ValueError):
    """Raised by a config dataclass's `__post_init__` when one field's value cannot be used
    (a check `opt()` cannot express: another field's value, a file, an exclusive bound).
    `dataclass_from_args` reports it as a ConfigError naming the flag or environment variable
    the value came from (the flag when it is the default), so the user knows what to fix.

        def __post_init__(self):
            if self.engine == "mocker" and self.speedup <= 0:
                raise FieldError("speedup", f"must be > 0 with --engine mocker, got {self.speedup}")
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def opt(help: str = "", *, choices: tuple | None = None, min: float | None = None,
        max: float | None = None, env: str | None = None, secret: bool = False) -> dict:
    """Field metadata for a config option (help text, allowed values, range, env name)."""
    return {"help": help, "choices": choices, "min": min, "max": max, "env": env,
            "secret": secret}


def env_var(f: dataclasses.Field, prefix: str = ENV_PREFIX) -> str:
    return f.metadata.get("env") or prefix + f.name.upper()


def flag(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def _base_type(tp: Any) -> tuple[type, bool]:
    """(the scalar type, whether None is allowed) of a field annotation."""
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else str
    if tp not in (str, int, float, bool):
        raise TypeError(f"config fields must be str, int, float or bool (or optional), got {tp}")
    return tp, optional


def _parse(text: str, tp: type, optional: bool, source: str) -> Any:
    if optional and text == "":
        return None
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{source}={text!r} is not a boolean (use true/false, 1/0, yes/no)")
    if tp is int:
        try:
            return int(text.strip())
        except ValueError:
            raise ConfigError(f"{source}={text!r} is not an integer") from None
    if tp is float:
        try:
            v = float(text.strip())
        except ValueError:
            raise ConfigError(f"{source}={text!r} is not a number") from None
        # nan passes every min/max check (comparisons with it are false) and inf means no
        # limit, which no option offers: a deadline of inf never fires, an interval of nan
        # never ticks
        if not math.isfinite(v):
            raise ConfigError(f"{source}={text!r} is not a finite number")
        return v
    return text


def _check(value: Any, f: dataclasses.Field, source: str, raw: str | None = None) -> Any:
    """Check choices and range; errors show `raw` (the text as given) when there is one."""
    if value is None:
        return value
    shown = repr(raw) if raw is not None else repr(value)
    meta = f.metadata
    choices = meta.get("choices")
    if choices and value not in choices:
        allowed = ", ".join(map(str, choices))
        raise ConfigError(f"{source}={shown} is not one of: {allowed}")
    low, high = meta.get("min"), meta.get("max")
    if low is not None and value < low:
        raise ConfigError(f"{source}={shown} must be >= {low}")
    if high is not None and value > high:
        raise ConfigError(f"{source}={shown} must be <= {high}")
    return value


def _default_text(f: dataclasses.Field) -> str:
    if f.metadata.get("secret"):
        return "unset"
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    return "required"


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, *,
                       group_title: str | None = None) -> None:
    """Add one flag per field of dataclass `cls`. Defaults stay None so that
    `dataclass_from_args` can tell "not given" from "given"."""
    hints = typing.get_type_hints(cls)
    target = parser.add_argument_group(group_title) if group_title else parser
    for f in dataclasses.fields(cls):
        tp, optional = _base_type(hints[f.name])
        text = f"{f.metadata.get('help', '')} [env {env_var(f)}; default {_default_text(f)}]"
        if tp is bool:
            target.add_argument(flag(f), dest=f.name, default=None,
                                action=argparse.BooleanOptionalAction, help=text.strip())
            continue

        def convert(s: str, tp=tp, optional=optional, name=flag(f)) -> Any:
            try:
                return _parse(s, tp, optional, name)
            except ConfigError as exc:  # argparse already prefixes "argument --flag:"
                raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{name}=")) from None

        convert.__name__ = tp.__name__  # argparse names the type in its error message
        choices = f.metadata.get("choices")
        metavar = "{" + ",".join(map(str, choices)) + "}" if choices else f.name.upper()
        target.add_argument(flag(f), dest=f.name, default=None, type=convert,
                            metavar=metavar, help=text.strip())


def dataclass_from_args(cls: type, args: argparse.Namespace | Mapping[str, Any] | None = None,
                        env: Mapping[str, str] | None = None) -> Any:
    """Build `cls`: flag (when given, i.e. not None) > environment variable > default."""
    env = os.environ if env is None else env
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}  # field -> the flag or variable its value came from
    for f in dataclasses.fields(cls):
        tp, optional = _base_type(hints[f.name])
        if given.get(f.name) is not None:
            sources[f.name] = flag(f)
            values[f.name] = _check(given[f.name], f, flag(f))
        elif env_var(f) in env:
            name = sources[f.name] = env_var(f)
            values[f.name] = _check(_parse(env[name], tp, optional, name), f, name, env[name])
    try:
        return cls(**values)
    except FieldError as exc:
        source = sources.get(exc.field) or "--" + exc.field.replace("_", "-")
        # a message that already starts with the flag (e.g. from a helper) is not prefixed again
        text = exc.message if exc.message.startswith(source) else f"{source}: {exc.message}"
        raise ConfigError(text) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {cls.__name__}: {exc}") from None


def _check_namespace(namespace: str) -> None:
    try:
        proto.subjects.subject(namespace, "x", "x")
    except ValueError:
        raise ValueError(
            f"namespace {namespace!r} must be letters, digits, _ and - only "
            "(--namespace / GENSET_NAMESPACE)") from None


@dataclass
class CommonConfig:
    """The flags every genset service shares."""

    namespace: str = field(default="default", metadata=opt(
        "isolates one deployment's subjects and etcd keys from another's"))
    nats: str = field(default="nats://127.0.0.1:4222", metadata=opt(
        "NATS server URL(s), comma separated"))
    etcd: str = field(default="127.0.0.1:2379", metadata=opt(
        "etcd endpoint(s) host:port, comma separated (https:// for TLS)"))
    host: str = field(default="127.0.0.1", metadata=opt(
        "address the /metrics and /health server listens on"))
    metrics_port: int = field(default=0, metadata=opt(
        "port of the /metrics and /health server (0 = any free port)", min=0, max=65535))
    log_format: str = field(default="auto", metadata=opt(
        "log output: json lines, readable console, or auto (console on a terminal)",
        choices=("auto", "json", "console")))
    log_level: str = field(default="info", metadata=opt(
        "lowest level logged", choices=("debug", "info", "warning", "error", "critical")))
    drain_timeout: float = field(default=30.0, metadata=opt(
        "seconds to finish in-flight work after SIGTERM before exiting anyway", min=0))
    lease_ttl: float = field(default=10.0, metadata=opt(
        "etcd lease TTL in seconds: how long a crashed process stays listed", min=2))
    nats_user: str | None = field(default=None, metadata=opt("NATS user"))
    nats_password: str | None = field(default=None, metadata=opt("NATS password", secret=True))
    nats_token: str | None = field(default=None, metadata=opt("NATS token", secret=True))
    nats_ca: str | None = field(default=None, metadata=opt(
        "CA certificate file for NATS TLS (enables TLS)"))
    etcd_user: str | None = field(default=None, metadata=opt("etcd user"))
    etcd_password: str | None = field(default=None, metadata=opt("etcd password", secret=True))
    etcd_ca: str | None = field(default=None, metadata=opt(
        "CA certificate file for etcd TLS (enables TLS)"))
    instance_id: str | None = field(default=None, metadata=opt(
        "this process's instance id (hex); a worker's NATS and etcd permissions name it "
        "(genset.runtime.auth); default: random"))
    metrics_token: str | None = field(default=None, metadata=opt(
        "require `Authorization: Bearer <token>` on /metrics", secret=True))

    def __post_init__(self) -> None:
        _check_namespace(self.namespace)
        if self.instance_id is not None:
            try:
                value = int(self.instance_id, 16)
            except ValueError:
                value = 0
            if not 0 < value < 2**63:
                raise FieldError("instance_id", f"{self.instance_id!r} is not a hex instance "
                                 "id between 1 and 7fffffffffffffff")
        if (self.etcd_user is None) != (self.etcd_password is None):
            raise ValueError("etcd auth needs both --etcd-user and --etcd-password")
        for name in ("nats_ca", "etcd_ca"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"--{name.replace('_', '-')} {path!r} is not a readable file")

    def redacted(self) -> dict[str, Any]:
        """For logging: secrets replaced by '***'."""
        out = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.metadata.get("secret") and out[f.name] is not None:
                out[f.name] = "***"
        return out


def add_common_args(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, CommonConfig, group_title="common service options")


def common_config(args: argparse.Namespace | Mapping[str, Any] | None = None,
                  env: Mapping[str, str] | None = None) -> CommonConfig:
    """CommonConfig from parsed args (attributes not given are None) and the environment."""
    return dataclass_from_args(CommonConfig, args, env)
