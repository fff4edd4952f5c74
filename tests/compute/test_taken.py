"""compute/taken.py: the action ids a node took, as its heartbeat lists them."""

from __future__ import annotations

import os
import time
from pathlib import Path

from compute.taken import TakenLog


def test_marks_are_listed_within_the_window_and_pruned_after(tmp_path: Path) -> None:
    log = TakenLog(tmp_path / "taken", window=600)
    assert log.recent() == ((), ())  # nothing taken yet, no directory
    log.mark({"action_id": "a" * 32, "instance_id": "x"})
    log.mark({"spec": {}, "action_id": "b" * 32})
    now = time.time()
    os.utime(tmp_path / "taken" / ("a" * 32), (now - 700, now - 700))
    assert log.recent(now) == (("b" * 32,), ())
    assert not (tmp_path / "taken" / ("a" * 32)).exists()  # pruned
    log.mark({"action_id": "b" * 32})  # a redelivery is taken again now
    assert (tmp_path / "taken" / ("b" * 32)).stat().st_mtime >= now - 1
    log.finish({"action_id": "b" * 32})  # handled: its observation is sent
    assert log.recent() == (("b" * 32,), ("b" * 32,))


def test_what_cannot_name_a_file_is_not_marked(tmp_path: Path) -> None:
    log = TakenLog(tmp_path / "taken")
    for payload in ({"action_id": "../../etc/passwd"}, {"action_id": ""}, {"action_id": 7}, [], None):
        log.mark(payload)
        log.finish(payload)
    log.finish({"action_id": "x.done"})
    assert log.recent() == ((), ())
    log.mark({"action_id": "c" * 65})  # longer than any action id
    assert log.recent() == ((), ())
