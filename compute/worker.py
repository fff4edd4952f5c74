"""The compute node's Celery app: ``celery -A compute.worker worker -Q node.<name>``.

No Django here.  Settings come from the environment (:class:`NodeConfig`).
Each task takes one message of :mod:`compute.spec` as JSON, named by
:class:`compute.spec.Task`.  The worker's main process sends a heartbeat
(:class:`NodeReport`) every ``SKYPORT_HEARTBEAT_SECONDS`` to the control queue, which also registers the
node with the portal the first time.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import task_received, worker_ready, worker_shutdown

from compute import celeryconf
from compute.config import NodeConfig
from compute.spec import NODE_TASKS, Task
from compute.tasks import INSTANCE_TASKS, NodeService

log = logging.getLogger(__name__)

config = NodeConfig.from_env()

# never the Django fixup, whatever the environment says; queues declared as celeryconf says
app = Celery("skyport-node", fixups=[], amqp=celeryconf.AMQP_CLASS)
app.conf.update(
    # the portal's delivery rules and broker options (compute/celeryconf.py)
    **celeryconf.reliability_settings(),
    **celeryconf.broker_settings(
        config.broker_url, config.visibility_timeout_seconds, config.broker_master or None
    ),
    task_ignore_result=True,
    task_default_queue=config.queue,
    worker_hijack_root_logger=False,
)


def _send(task: Task, payload: dict[str, Any]) -> None:
    app.send_task(task, args=[payload], queue="control")


service = NodeService(config, _send)


def _node_task(task: Task, **options: Any) -> None:
    """Register ``task``: it hands its one argument, the message's JSON, to :meth:`NodeService.handle`."""

    def run(payload: dict[str, Any]) -> None:
        service.handle(task, payload)

    run.__name__ = run.__qualname__ = task.replace(".", "_")
    app.task(name=task, **options)(run)  # type: ignore[no-untyped-call]


@task_received.connect
def _mark_taken(request: Any = None, **kwargs: Any) -> None:
    """A message reserved by this worker is taken, even before a pool process runs it (prefetch)."""
    try:
        if request is not None and request.task_name in INSTANCE_TASKS:
            service.taken.mark(request.args[0] if request.args else None)
    except Exception:  # a mark only helps: never let it lose the message
        log.exception("cannot mark a received message as taken")


# a lost console read is simply asked for again; a console or exec whose worker died is not
# replayed minutes later (its client has given up, and an exec must not run twice)
INTERACTIVE = frozenset({Task.CONSOLE, Task.CONSOLE_OPEN, Task.EXEC, Task.LOGS})
for _task in NODE_TASKS:
    _node_task(_task, **({"acks_late": False} if _task in INTERACTIVE else {}))


def _heartbeat_loop(parent: int) -> None:
    # The fork inherited the worker's signal handlers, which turn SIGTERM into a warm shutdown of a
    # worker this child is not: terminate() did nothing, and every stop waited for join() in vain.
    # The parent forked with SIGTERM and SIGINT blocked, so one sent before this point waits for
    # the default action instead of reaching the inherited handler.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    next_beat = 0.0
    last = 0.0
    pending = False
    while os.getppid() == parent:
        # A container that ended (conmon wrote its exit file) is reported at once, with its exit
        # code or signal and last output, instead of at the next regular beat; exits first, then
        # the restart policies (which may have restarted or given up on some).  A burst of exits
        # (a mass delete) is folded into one report per EXIT_REPORT_GAP.
        pending = service.exits_changed() | service.supervise() | pending
        service.keep_logs()  # each log's previous file kept at the cap; deleted ones swept after retention
        now = time.monotonic()
        if now >= next_beat or (pending and now - last >= EXIT_REPORT_GAP):
            try:
                service.report()
            except Exception:  # keep beating; the portal marks the node down if beats stop
                log.exception("heartbeat failed")
            last, pending = time.monotonic(), False
            next_beat = last + config.heartbeat_seconds
        time.sleep(EXIT_POLL_SECONDS)


EXIT_POLL_SECONDS = 0.2  # how soon a container's exit reaches the portal
EXIT_REPORT_GAP = 0.5  # at most two early reports a second

_beater: list[multiprocessing.process.BaseProcess] = []


@worker_ready.connect
def _start_heartbeat(**kwargs: Any) -> None:
    """Beat from a single-threaded child: the container driver needs its own
    mount namespace (unshare), which a multi-threaded process cannot get."""
    beater = multiprocessing.get_context("fork").Process(
        target=_heartbeat_loop, args=(os.getpid(),), name="heartbeat", daemon=True
    )
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        beater.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a stop sent meanwhile arrives now
    _beater.append(beater)


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
STOP_GRACE_SECONDS = 5.0


@worker_shutdown.connect
def _stop_heartbeat(**kwargs: Any) -> None:
    """End the heartbeat child: SIGTERM, then SIGKILL if it has not ended within the grace.

    Bounded either way: Python joins a daemon child at exit without a timeout, so a child that
    outlived this would hold the worker's exit for as long as it lived.
    """
    for beater in _beater:
        if not beater.is_alive():
            continue
        beater.terminate()
        beater.join(STOP_GRACE_SECONDS)
        if beater.is_alive():
            log.warning(
                "heartbeat child %s did not end within %.0f s of SIGTERM (%s); killing it",
                beater.pid, STOP_GRACE_SECONDS, _wchan(beater.pid),
            )  # fmt: skip
            beater.kill()
            beater.join(STOP_GRACE_SECONDS)


def _wchan(pid: int | None) -> str:
    """Where in the kernel ``pid`` waits, for the log (``?`` when unreadable)."""
    try:
        return "waiting in " + Path(f"/proc/{pid}/wchan").read_text().strip()
    except OSError:
        return "?"
