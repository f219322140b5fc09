"""Configuration files: one TOML file per replicated device, an alternative to command-line flags.

Keys are the long flag names without the leading dashes (``target-device`` or ``target_device``); values
have the flag's type (strings, integers, booleans for switches).  Flags given on the command line override
the file.  Errors name the file, the key and the reason.

    # /etc/bdr/server-data.toml
    address = "0.0.0.0"
    port = 7788
    target-device = "/dev/sdc1"
    journal = "/var/lib/bdr/data.journal"
    verbose = true
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Sequence
from typing import Any


class ConfigError(Exception):
    """The configuration file cannot be used; the message says which file, which key and why."""


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        a.dest: a
        for a in parser._actions
        if a.option_strings and a.dest not in ("help", "version", "config") and a.default != argparse.SUPPRESS
    }


def _check_value(path: str, key: str, action: argparse.Action, value: Any) -> Any:
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: key {key!r}: expected true or false, got {value!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(value, bool | dict | list):
        raise ConfigError(f"{path}: key {key!r}: expected a single value, got {value!r}")
    kind = action.type
    if kind is None or kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: key {key!r}: expected a string, got {value!r}")
        converted: Any = value
    elif kind is int:
        if not isinstance(value, int):
            raise ConfigError(f"{path}: key {key!r}: expected an integer, got {value!r}")
        converted = value
    else:
        try:
            converted = kind(value)  # type: ignore[operator]
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"{path}: key {key!r}: {exc}") from None
    if action.choices is not None and converted not in action.choices:
        raise ConfigError(f"{path}: key {key!r}: {value!r} is not one of {sorted(action.choices)}")
    return converted


def load(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """Read ``path`` and return {dest: value} for ``parser``'s options."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    options = _options(parser)
    values: dict[str, Any] = {}
    for key, value in data.items():
        dest = key.replace("-", "_")
        if dest not in options:
            known = ", ".join(sorted(d.replace("_", "-") for d in options))
            raise ConfigError(f"{path}: unknown key {key!r}; known keys: {known}")
        values[dest] = _check_value(path, key, options[dest], value)
    return values


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with ``--config FILE`` support: the file's values are defaults, flags override them.

    ``parser`` must define ``--config``.  A ConfigError is reported through ``parser.error`` (exit 2).
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        try:
            values = load(parser, known.config)
        except ConfigError as exc:
            parser.error(str(exc))
        for action in parser._actions:
            if action.dest in values:
                action.required = False  # given by the file; a flag may still override it
        parser.set_defaults(**values)
    return parser.parse_args(argv)
