"""Names users give to instances, snapshots and groups (they become host names)."""

from __future__ import annotations

import re

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
NAME_RULE = "Use lower-case letters, digits and '-', starting and ending with a letter or digit (at most 63)."
