"""JSON from outside, parsed with a limit on how deeply it nests.

Python's ``json`` recurses once per level of nesting.  A document of
100,000 ``[`` (100 KB) makes it raise ``RecursionError``, which is not a
``ValueError``: every caller that turns a ``ValueError`` into "invalid
JSON" answered a 500 instead (the API's request bodies, the admin's JSON
fields), and an image manifest shaped like that would crash the import
task.  :func:`loads` counts the nesting first, skipping strings, and refuses
a document deeper than the limit with :class:`TooDeep` (a ``ValueError``, so
existing ``except ValueError`` handlers catch it); only then does ``json``
parse it.

Shared by the portal (request bodies, admin forms, image validation) and
compute nodes (image manifests), so it imports neither Django nor the portal.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

#: No API body, image manifest or config needs more than a handful of levels.
MAX_DEPTH = 32

# A JSON string (escapes included) or one bracket; the strings are matched only to skip
# the brackets inside them.  The unrolled form `"[^"\\]*(?:\\.[^"\\]*)*"` never backtracks.
_TOKENS_STR = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
_TOKENS_BYTES = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
_STR_KINDS = (frozenset("[{"), '"')
_BYTES_KINDS = (frozenset(b"[{"), ord('"'))


class TooDeep(ValueError):
    """The document nests arrays and objects deeper than the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"JSON nested more than {limit} levels deep")
        self.limit = limit


def check_depth(data: str | bytes | bytearray, max_depth: int = MAX_DEPTH) -> None:
    """Raise :class:`TooDeep` when ``data`` nests deeper than ``max_depth`` levels.

    Only valid JSON is measured exactly; for a broken document the count may
    be off, and the parser refuses it anyway.
    """
    if isinstance(data, str):
        if data.count("[") + data.count("{") <= max_depth:  # cannot be deeper: skip the scan
            return
        firsts: Iterator[object] = (m.group()[0] for m in _TOKENS_STR.finditer(data))
        opening, quote = _STR_KINDS
    else:
        if data.count(b"[") + data.count(b"{") <= max_depth:
            return
        firsts = (m.group()[0] for m in _TOKENS_BYTES.finditer(data))
        opening, quote = _BYTES_KINDS  # type: ignore[assignment]
    depth = 0
    for first in firsts:
        if first in opening:
            depth += 1
            if depth > max_depth:
                raise TooDeep(max_depth)
        elif first != quote:  # a closing bracket
            depth -= 1


def loads(data: str | bytes | bytearray, max_depth: int = MAX_DEPTH, **kwargs: Any) -> Any:
    """``json.loads`` for untrusted input: :class:`TooDeep` instead of a ``RecursionError``."""
    check_depth(data, max_depth)
    try:
        return json.loads(data, **kwargs)
    except RecursionError as exc:  # a limit above what the interpreter's stack allows
        raise TooDeep(max_depth) from exc
