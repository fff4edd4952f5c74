#!/usr/bin/env python3
"""Run podman containers' health checks on hosts where systemd is not PID 1.

Podman schedules every container's health check with a transient systemd timer.  Without
systemd it logs "unable to get systemd connection to add healthchecks", starts the container
anyway, and its health stays "starting" for ever: compose's ``depends_on: condition:
service_healthy`` then never starts web, control or beat.  This loop does what those timers
would: each running container that has a health check gets ``podman healthcheck run`` once its
own interval has passed (checks run in parallel, one at a time per container).

    deploy/podman-healthchecks.py [--project NAME] [--once]

``--project`` limits it to one compose project's containers (docker-compose labels them);
``--once`` checks every container once and exits.  Standard library only.  On hosts with
systemd podman needs none of this.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

PODMAN = "podman"


def _running(project: str | None) -> list[str]:
    cmd = [PODMAN, "ps", "--format", "json", "--filter", "status=running"]
    if project:
        cmd += ["--filter", f"label=com.docker.compose.project={project}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if out.returncode != 0:
        return []
    return [c["Id"] for c in json.loads(out.stdout or "[]")]


def _interval(cid: str) -> float | None:
    """The container's health-check interval in seconds, or None when it has no check."""
    out = subprocess.run(
        [PODMAN, "inspect", "--format", "{{json .Config.Healthcheck}}", cid],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if out.returncode != 0 or out.stdout.strip() in ("", "null"):
        return None
    check = json.loads(out.stdout)
    if not check.get("Test") or check["Test"][0] == "NONE":
        return None
    return max(1.0, (check.get("Interval") or 30_000_000_000) / 1e9)


def _check(cid: str, busy: set[str], lock: threading.Lock) -> None:
    try:
        subprocess.run(
            [PODMAN, "healthcheck", "run", cid], capture_output=True, timeout=600, check=False
        )  # its exit status is the check's; podman records it in the container's health log
    finally:
        with lock:
            busy.discard(cid)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", help="only this compose project's containers")
    parser.add_argument("--once", action="store_true", help="check every container once, then exit")
    args = parser.parse_args(argv)
    intervals: dict[str, float | None] = {}
    due: dict[str, float] = {}
    busy: set[str] = set()
    lock = threading.Lock()
    threads: list[threading.Thread] = []
    while True:
        now = time.monotonic()
        running = _running(args.project)
        for cid in running:
            if cid not in intervals:
                intervals[cid] = _interval(cid)
                due[cid] = now  # the first check at once: dependents wait for it
            period = intervals[cid]
            with lock:
                if period is None or cid in busy or due[cid] > now:
                    continue
                busy.add(cid)
            due[cid] = now + period
            t = threading.Thread(target=_check, args=(cid, busy, lock), daemon=True)
            t.start()
            threads.append(t)
        for gone in set(intervals) - set(running):
            intervals.pop(gone)
            due.pop(gone, None)
        if args.once:
            for t in threads:
                t.join()
            return 0
        threads = [t for t in threads if t.is_alive()]
        time.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
