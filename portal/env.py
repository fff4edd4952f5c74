"""Typed reading of the portal's environment variables, for ``settings.py`` (and the beat probe).

Settings come only from the environment (Healthchecks' rule).  Every number
is parsed here, so a bad value stops start-up with an ``ImproperlyConfigured``
that names the variable and what it expects, never a bare ``ValueError``.
No Django set-up is needed to use these.
"""

from __future__ import annotations

import os

from django.core.exceptions import ImproperlyConfigured

from compute import config

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def text(name: str, default: str) -> str:
    return os.environ.get(name, default)


def boolean(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r}: expected one of {', '.join(_TRUE + _FALSE)}.")


def integer(name: str, default: int, minimum: int | None = None, maximum: int | None = None) -> int:
    """A whole number within ``minimum``..``maximum``, else ImproperlyConfigured naming the variable."""
    raw = os.environ.get(name, str(default))
    try:
        value = int(raw.strip())
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r}: expected a whole number.") from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f"{minimum if minimum is not None else '…'}..{maximum if maximum is not None else '…'}"
        raise ImproperlyConfigured(f"{name}={raw!r}: expected a whole number within {bounds}.")
    return value


def seconds(name: str, default: float) -> float:
    """A positive, finite number of seconds (the nodes' rule, :func:`compute.config.seconds`)."""
    try:
        return config.seconds(name, default)
    except config.ConfigError as exc:
        raise ImproperlyConfigured(f"{exc}.") from None


def file_text(name: str, limit: int = 65536) -> str | None:
    """The text of the file the variable names (``None`` when unset), read once at start-up."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        with open(raw, encoding="utf-8") as f:
            content = f.read(limit + 1)
    except (OSError, UnicodeDecodeError) as exc:
        raise ImproperlyConfigured(f"{name}={raw!r}: cannot read the file ({exc}).") from None
    if len(content) > limit:
        raise ImproperlyConfigured(f"{name}={raw!r}: the file is longer than {limit} characters.")
    return content


def choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    raw = os.environ.get(name, default)
    if raw not in allowed:
        raise ImproperlyConfigured(f"{name}={raw!r}: expected one of {', '.join(allowed)}.")
    return raw
