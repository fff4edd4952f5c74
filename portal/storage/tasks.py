"""Control-queue task of the storage app: the node's report on a volume request."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from compute.spec import SpecError, Task, VolumeObservation, VolumeOp, VolumeProgress, from_json
from portal.storage import backups, moves, volumes
from portal.storage.choices import VolumeStatus
from portal.storage.models import Volume

#: the steps of a move, settled by portal.storage.moves
_MOVE_OPS = (VolumeOp.SEND, VolumeOp.RECEIVE, VolumeOp.DROP)

log = logging.getLogger(__name__)


def apply_volume_observation(data: dict[str, Any]) -> str:
    """Settle one volume from its node's observation; returns what happened (for logs and tests)."""
    try:
        obs = from_json(VolumeObservation, data)
    except SpecError as exc:
        log.error("dropping malformed volume observation %r: %s", data, exc)
        return "malformed"
    if obs.op in _MOVE_OPS:
        status = Volume.objects.filter(pk=obs.volume_id).values_list("status", flat=True).first()
        if obs.op is VolumeOp.SEND and status == VolumeStatus.BACKING_UP:
            return backups.observe_send(obs)
        if obs.op is VolumeOp.RECEIVE and status == VolumeStatus.CREATING:
            return volumes.observe(obs)  # a restore: a create whose content comes from a backup
        return moves.observe(obs)
    return volumes.observe(obs)


def apply_volume_progress(data: dict[str, Any]) -> str:
    """Record a node's progress in sending or receiving a volume."""
    try:
        p = from_json(VolumeProgress, data)
    except SpecError as exc:
        log.error("dropping malformed volume progress %r: %s", data, exc)
        return "malformed"
    return "applied" if moves.progress(p) else "stale"


@shared_task(name=Task.OBSERVE_VOLUME)
def observe_volume(data: dict[str, Any]) -> None:
    apply_volume_observation(data)


@shared_task(name=Task.VOLUME_PROGRESS)
def volume_progress(data: dict[str, Any]) -> None:
    apply_volume_progress(data)


@shared_task(name="portal.storage.backups")
def backup_tick() -> dict[str, int]:
    """Start every due scheduled backup (beat)."""
    return backups.tick()
