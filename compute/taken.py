"""The action ids of the instance messages this node has taken, for its heartbeat to list.

A message can be lost between the broker and the node: kombu's Redis transport
pops a message (``BRPOP``) before it records it as unacknowledged, so a
connection that breaks in between (Redis restarted) loses it, and no
visibility timeout brings it back.  The portal then waits for an observation
that never comes until the task's deadline fails the instance.  The way back can
lose the node's observation the same way.  So the node says which messages it
did get and which it has handled: the worker marks each instance message's
action id when it receives it (and again when it runs it), and once more,
as done, when its handler has returned (the observation sent); the heartbeat
reports both of the last :data:`WINDOW_SECONDS`.  The portal sends a create or
delete again when the node has not taken it and its queue is empty, or when the
node has handled it and no observation came (portal/cloud/resend.py): the node
acts again idempotently and observes again.

One empty file per action id, its mtime the moment it was taken: the marks
are written by the worker's main and pool processes and read by the heartbeat
process, with no lock (a touch is atomic enough; a half-listed directory only
delays a resend by a beat).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: how long a taken action id is reported; the portal judges only messages younger than this
WINDOW_SECONDS = 600.0

_ACTION_ID = re.compile(r"[0-9a-zA-Z-]{1,64}")
#: the suffix of a handled message's mark (an action id never has a dot)
DONE = ".done"


def action_id_of(payload: Any) -> str | None:
    """The action id an instance message's JSON carries, if it is one a file may be named by."""
    if not isinstance(payload, Mapping):
        return None
    action_id = payload.get("action_id")
    if isinstance(action_id, str) and _ACTION_ID.fullmatch(action_id):
        return action_id
    return None


class TakenLog:
    def __init__(self, directory: Path, window: float = WINDOW_SECONDS) -> None:
        self.directory = directory
        self.window = window

    def mark(self, payload: Any) -> None:
        """Record the message's action id as taken now (never raises: a mark only helps)."""
        self._touch(payload, "")

    def finish(self, payload: Any) -> None:
        """Record that the message was handled: its observation has been sent."""
        self._touch(payload, DONE)

    def _touch(self, payload: Any, suffix: str) -> None:
        action_id = action_id_of(payload)
        if action_id is None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / (action_id + suffix)
            path.touch()
            os.utime(path)  # touch() leaves the mtime of an existing file: a redelivery is taken now
        except OSError as exc:
            log.warning("cannot mark action %s as taken: %s", action_id, exc)

    def recent(self, now: float | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The action ids taken, and those of them handled, within the window, oldest first.

        Older marks are removed.
        """
        now = time.time() if now is None else now
        taken: list[tuple[float, str]] = []
        done: list[tuple[float, str]] = []
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return (), ()
        for entry in entries:
            try:
                at = entry.stat().st_mtime
                if now - at > self.window:
                    os.unlink(entry.path)
                elif entry.name.endswith(DONE):
                    done.append((at, entry.name.removesuffix(DONE)))
                else:
                    taken.append((at, entry.name))
            except FileNotFoundError:  # another process pruned it
                continue
        return tuple(n for _, n in sorted(taken)), tuple(n for _, n in sorted(done))
