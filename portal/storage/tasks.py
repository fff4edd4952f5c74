"""Control-queue task of the storage app: the node's report on a volume request."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from compute.spec import SpecError, Task, VolumeObservation, from_json
from portal.storage import volumes

log = logging.getLogger(__name__)


def apply_volume_observation(data: dict[str, Any]) -> str:
    """Settle one volume from its node's observation; returns what happened (for logs and tests)."""
    try:
        obs = from_json(VolumeObservation, data)
    except SpecError as exc:
        log.error("dropping malformed volume observation %r: %s", data, exc)
        return "malformed"
    return volumes.observe(obs)


@shared_task(name=Task.OBSERVE_VOLUME)
def observe_volume(data: dict[str, Any]) -> None:
    apply_volume_observation(data)
