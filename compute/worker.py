"""The compute node's Celery app: ``celery -A compute.worker worker -Q node.<name>``.

No Django here.  Settings come from the environment (:class:`NodeConfig`).
The worker's main process sends a heartbeat (:class:`NodeReport`) every
``SKYPORT_HEARTBEAT_SECONDS`` to the control queue, which also registers the
node with the portal the first time.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from compute import celeryconf
from compute.config import NodeConfig
from compute.tasks import NodeService

log = logging.getLogger(__name__)

config = NodeConfig.from_env()

# never the Django fixup, whatever the environment says; queues declared as celeryconf says
app = Celery("skyport-node", fixups=[], amqp=celeryconf.AMQP_CLASS)
app.conf.update(
    # the portal's delivery rules and broker options (compute/celeryconf.py)
    **celeryconf.reliability_settings(),
    **celeryconf.broker_settings(
        config.broker_url,
        float(os.environ.get("SKYPORT_BROKER_VISIBILITY_SECONDS", "300")),
        os.environ.get("SKYPORT_BROKER_MASTER"),
    ),
    task_ignore_result=True,
    task_default_queue=config.queue,
    worker_hijack_root_logger=False,
)


def _send(name: str, payload: dict[str, Any]) -> None:
    app.send_task(name, args=[payload], queue="control")


service = NodeService(config, _send)


@app.task(name="compute.instance.create")
def create(spec: dict[str, Any], action_id: str) -> None:
    service.create(spec, action_id)


@app.task(name="compute.instance.action")
def action(
    instance_id: str, kind: str, action: str, action_id: str, params: dict[str, Any] | None = None
) -> None:
    service.action(instance_id, kind, action, action_id, params)


@app.task(name="compute.instance.console", acks_late=False)
def console(instance_id: str, kind: str, max_bytes: int = 16384) -> None:
    service.console(instance_id, kind, max_bytes)


@app.task(name="compute.instance.delete")
def delete(instance_id: str, kind: str, action_id: str) -> None:
    service.delete(instance_id, kind, action_id)


@app.task(name="compute.network.ensure")
def ensure_network(segment: dict[str, Any]) -> None:
    service.ensure_network(segment)


def _heartbeat_loop(parent: int) -> None:
    interval = float(os.environ.get("SKYPORT_HEARTBEAT_SECONDS", "5"))
    while os.getppid() == parent:
        try:
            service.report()
        except Exception:  # keep beating; the portal marks the node down if beats stop
            log.exception("heartbeat failed")
        time.sleep(interval)


_beater: list[multiprocessing.process.BaseProcess] = []


@worker_ready.connect
def _start_heartbeat(**kwargs: Any) -> None:
    """Beat from a single-threaded child: the container driver needs its own
    mount namespace (unshare), which a multi-threaded process cannot get."""
    beater = multiprocessing.get_context("fork").Process(
        target=_heartbeat_loop, args=(os.getpid(),), name="heartbeat", daemon=True
    )
    beater.start()
    _beater.append(beater)


@worker_shutdown.connect
def _stop_heartbeat(**kwargs: Any) -> None:
    for beater in _beater:
        if beater.is_alive():
            beater.terminate()
            beater.join(5)
