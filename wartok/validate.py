"""Config validation shared by every module's dataclass config.

Each config dataclass checks its own values in ``__post_init__`` with these helpers, so a bad
setting fails with one line that names the setting and what is allowed, before any compute.
This module imports nothing from wartok (it is a leaf).
"""
from __future__ import annotations

import math
from typing import Iterable


class ConfigError(ValueError):
    """A setting has a value outside what it allows. The message is one line, ready to print."""


def check_choice(name: str, value: str, allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} is not allowed; it must be an integer >= {minimum}")


def check_finite(name: str, value: float, *, minimum: float | None = None, strict: bool = False) -> None:
    """A finite float, optionally >= minimum (or > minimum when ``strict``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        bound = "" if minimum is None else (f" {'>' if strict else '>='} {minimum}")
        raise ConfigError(f"{name}={value!r} is not allowed; it must be a finite number{bound}")


def check_unit_interval(name: str, value: float, *, open_right: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0.0 or value > 1.0 or (open_right and value == 1.0):
        raise ConfigError(f"{name}={value!r} is not allowed; it must be a number in [0, 1{')' if open_right else ']'}")
