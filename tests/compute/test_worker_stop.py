"""The node worker's heartbeat child always ends when the worker stops (compute/worker.py).

A child that outlived the worker's stop held its exit (Python joins daemon children at exit
without a timeout): CI once saw a node worker still running 20 s after SIGTERM.  Each case runs
in a fresh interpreter, because importing compute.worker builds the node's app and service.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PRELUDE = """
import json, os, signal, time
import compute.worker as w

# what Celery installs in the worker: SIGTERM asks the main process for a warm shutdown, and a
# child that inherited the handler does nothing with it
signal.signal(signal.SIGTERM, lambda *_: None)
"""


def _run(body: str, tmp_path: Path) -> dict[str, object]:
    env = {**os.environ, "SKYPORT_NODE_DIR": str(tmp_path / "node"), "SKYPORT_NODE_NAME": "stoptest"}
    out = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    result = _run(
        """
        import multiprocessing

        def stubborn():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                time.sleep(0.1)

        child = multiprocessing.get_context("fork").Process(target=stubborn, daemon=True)
        child.start()
        time.sleep(0.3)  # it has set its handler
        w._beater.append(child)
        w.STOP_GRACE_SECONDS = 0.5
        began = time.monotonic()
        w._stop_heartbeat()
        print(json.dumps({"alive": child.is_alive(), "exitcode": child.exitcode,
                          "took": time.monotonic() - began}))
        """,
        tmp_path,
    )
    assert result["alive"] is False
    assert result["exitcode"] == -9  # SIGTERM ignored, SIGKILL after the grace
    assert 0.5 <= float(str(result["took"])) < 5


def test_a_stop_sent_before_the_child_set_its_handlers_still_ends_it(tmp_path: Path) -> None:
    # the child is slow to reach its handler reset (a starved machine): SIGTERM sent at once must
    # wait, blocked, for the default action, not reach the handler inherited from the worker
    result = _run(
        """
        real = w._heartbeat_loop

        def slow_start(parent):
            time.sleep(1.0)
            real(parent)

        w._heartbeat_loop = slow_start
        w.service.report = lambda: None  # no broker here; the loop itself is what is tested
        w._start_heartbeat()
        child = w._beater[0]
        child.terminate()
        child.join(10)
        print(json.dumps({"alive": child.is_alive(), "exitcode": child.exitcode,
                          "parent_mask": sorted(signal.pthread_sigmask(signal.SIG_BLOCK, []))}))
        if child.is_alive():
            child.kill()
        """,
        tmp_path,
    )
    assert result["alive"] is False
    assert result["exitcode"] == -15  # ended by the SIGTERM it got before resetting its handler
    assert result["parent_mask"] == []  # the worker's own signals are not left blocked
