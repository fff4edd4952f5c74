"""Rules for a container's launch overrides, shared by the API serializer and the launch form.

Command, environment, working directory, user and restart policy replace or
extend the image config (docs/container-driver.md).  Each check returns the
reason in words or None; env values may be secrets, so a reason names a
variable, never its value.
"""

from __future__ import annotations

import re

from compute.spec import ID_RANGE_SIZE, SpecError, env_problem, restart_rule

MASK = "********"
MAX_ENV = 256
MAX_ENV_NAME = 255
MAX_ENV_BYTES = 64 * 1024
MAX_ARGS = 256
_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,31})?")
RESTART_HELP = "no | on-failure[:N] | always (with backoff; a crash loop ends in error)"


def env_error(env: dict[str, str]) -> str | None:
    if len(env) > MAX_ENV:
        return f"At most {MAX_ENV} variables."
    if sum(len(k) + len(v) for k, v in env.items()) > MAX_ENV_BYTES:
        return f"At most {MAX_ENV_BYTES // 1024} KiB of names and values."
    for name, value in env.items():
        if len(name) > MAX_ENV_NAME:
            return f"Variable names have at most {MAX_ENV_NAME} characters."
        problem = env_problem(name, value)
        if problem:
            return problem.replace(repr(name), repr(name[:64]))[:300]
    return None


def command_error(args: list[str]) -> str | None:
    if len(args) > MAX_ARGS:
        return f"At most {MAX_ARGS} arguments."
    if any("\x00" in a for a in args):
        return "An argument contains a NUL character."
    return None


def workdir_error(value: str) -> str | None:
    if value and (not value.startswith("/") or "\x00" in value):
        return "Give an absolute path, such as /srv/app."
    return None


def user_error(value: str) -> str | None:
    if value and not _USER_RE.fullmatch(value):
        return "Give user[:group], names or ids: 1000:1000 or www-data."
    for part in value.split(":"):
        if part.isdigit() and int(part) >= ID_RANGE_SIZE:
            return f"Ids inside a container go up to {ID_RANGE_SIZE - 1}."
    return None


def restart_policy_error(value: str) -> str | None:
    try:
        restart_rule(value)
    except SpecError as exc:
        return str(exc)
    return None


def parse_env_lines(text: str) -> tuple[dict[str, str], str | None]:
    """``NAME=value`` per line (the form's textarea) → dict, or the line number that is wrong."""
    env: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name, sep, value = line.partition("=")
        if not sep:
            return env, f"Line {n}: write NAME=value."
        if name in env:
            return env, f"Variable {name[:64]!r} is given twice."
        env[name] = value
    return env, None
