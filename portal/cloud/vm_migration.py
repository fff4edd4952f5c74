"""A drain's cold migration of a VM: stop it, send its disk through the portal, build it on the target.

The node's halves are :mod:`compute.migration` (``send_disk`` on the source,
``target_spec`` for the target's create); this module orders them.  One
:class:`Evacuation` row (mode ``drain``) follows the move, its ``step`` saying
where it is, and the instance is claimed (``task_state`` ``migrating``) from
the first step to the last, each step with its own action id and deadline:

1. ``stopping``: a running VM is shut down on the source **cleanly**: the
   ACPI power button and :data:`STOP_TIMEOUT` seconds; a guest that does not
   go down in that time is *not* forced off (a pulled plug could lose what
   the guest had not written): the move is refused and the VM keeps running.
2. ``sending``: the source flattens the disk and PUTs it to a hidden image of
   the tenant (``Image.hidden``: never listed, never launched) with a
   one-image upload token (``compute.instance.send_disk``).
3. ``importing``: the portal checks the upload as any image upload; the step
   goes on when both the node's observation and the import have arrived
   (either order: :func:`image_settled` is the import's half).
4. ``creating``: the row points at the target, which builds the same
   instance (id, MAC, address) on that disk; the create starts it.
5. Done: the copy left on the source is destroyed through the row, now an
   ordinary evacuation row (``step`` ""): the same resend-until-gone and
   guard as any moved copy (:mod:`portal.cloud.evacuation`).  A VM that was
   stopped is stopped again; the hidden image is deleted.

A failure at any step (a refusal, a failed upload or import, a failed create,
a deadline) puts the row back on the source with the reason, deletes the
hidden image, and starts the VM again if it was running; a copy the target may
have left gets a destroy of its own.  The source copy is destroyed only after
the target's create is observed, so the VM is never without a disk.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from compute import migration
from compute.spec import (
    Action,
    CreateInstance,
    DeleteInstance,
    InstanceAction,
    Kind,
    Observation,
    PowerState,
    SendDisk,
)
from portal.audit.log import record
from portal.audit.models import Outcome
from portal.cloud import deadlines, dispatch, forwards, networks, services, states
from portal.cloud.choices import TaskState, VmState
from portal.cloud.models import ComputeNode, Evacuation, Instance
from portal.errors import Conflict
from portal.images import services as image_services
from portal.images.choices import ImageStatus
from portal.images.models import Image
from portal.storage.choices import VolumeStatus

log = logging.getLogger(__name__)

#: how long a guest has to shut down after the power button before the move is refused
STOP_TIMEOUT = 60.0
Step = Evacuation.Step


def why_it_stays(inst: Instance, source: ComputeNode) -> str:
    """Why the VM cannot be migrated now ("" when it can)."""
    if inst.task_state is not None:
        return f"busy ({inst.task_state}); drain again when it has finished"
    if inst.vm_state not in (VmState.ACTIVE, VmState.STOPPED):
        return f"it is {inst.vm_state}: only an active or stopped VM is migrated (start or stop it first)"
    attached = list(inst.volumes.exclude(status=VolumeStatus.DELETED).values_list("name", flat=True))
    if attached:
        return (
            f"volume(s) {', '.join(sorted(attached))} attached: a volume is a file on {source.name} (local "
            "storage) and cannot move yet; detach it and drain again, or it stays"
        )
    kept = inst.snapshots.exclude(status="missing").count()
    if kept:
        return (
            f"it has {kept} snapshot(s), kept inside its disk on {source.name}: the migrated disk is "
            "flattened without them; delete them and drain again, or it stays"
        )
    return ""


def _event(inst: Instance, message: str, user: Any = None, ok: bool = True) -> None:
    record(
        "instance.migrate",
        inst,
        actor=user,
        actor_name="portal",
        outcome=Outcome.SUCCESS if ok else Outcome.FAILURE,
        message=message[:1000],
        request_id=inst.action_id,
    )


def _next_step(inst: Instance, ev: Evacuation, step: str, what: str) -> None:
    """Claim the next step: a new action id and deadline; the row says where it is."""
    ev.step = step
    ev.save(update_fields=["step"])
    inst.task_state = TaskState.MIGRATING
    inst.action_id = uuid.uuid4().hex
    seconds = deadlines.deadline_seconds(TaskState.MIGRATING)
    inst.task_deadline = timezone.now() + dt.timedelta(seconds=seconds)
    target = ev.target.name if ev.target else "-"
    inst.status_reason = f"drain of node {ev.source.name}: migrating to {target}: {what}"[:255]
    inst.save()


def begin(inst: Instance, source: ComputeNode, target: ComputeNode, reason: str, user: Any) -> str:
    """Start moving ``inst`` (inside the drain's transaction); returns the message for the report."""
    running = inst.vm_state == VmState.ACTIVE
    image = Image.objects.create(
        owner=inst.tenant,
        name=f"migrate-{inst.pk}",
        version=uuid.uuid4().hex[:12],
        description=f"disk of {inst.name} moving from {source.name} to {target.name}; deleted after the move",
        os=inst.image.os if inst.image else "",
        min_ram_mb=inst.image.min_ram_mb if inst.image else 0,
        source_instance=inst,
        hidden=True,
        status=ImageStatus.QUEUED,
        status_reason=f"waiting for node {source.name} to send the disk of {inst.name}",
    )
    ev = Evacuation.objects.create(
        instance=inst,
        source=source,
        target=target,
        mode=Evacuation.Mode.DRAIN,
        destroy_action_id=uuid.uuid4().hex,
        then_stop=not running,
        image=image,
    )
    if running:
        _next_step(inst, ev, Step.STOPPING, f"shutting it down on {source.name}")
        params = {"timeout": STOP_TIMEOUT, "clean": True}
        dispatch.send(
            source.queue, InstanceAction(str(inst.pk), Kind.VM, Action.STOP, inst.action_id, params)
        )
        what = f"shutting it down (power button, {STOP_TIMEOUT:g} s, never forced)"
    else:
        _send_disk(inst, ev)
        what = "it is stopped; sending its disk"
    message = f"from {source.name} to {target.name} (cold): {reason}; {what}"
    _event(inst, message, user)
    return message


def _send_disk(inst: Instance, ev: Evacuation) -> None:
    assert ev.image is not None
    _next_step(inst, ev, Step.SENDING, f"{ev.source.name} sends its disk")
    url = f"{settings.SKYPORT_PORTAL_URL}/api/v1/blobs/uploads/{ev.image.pk}"
    token = image_services.upload_token(ev.image)
    dispatch.send(ev.source.queue, SendDisk(str(inst.pk), inst.action_id, url, token))


def _open(inst: Instance) -> Evacuation | None:
    """The instance's migration in progress, locked."""
    return (
        Evacuation.objects.select_for_update(of=("self",))
        .filter(instance=inst, cleaned_at__isnull=True)
        .exclude(step=Step.DONE)
        .select_related("source", "target", "image")
        .first()
    )


def observed(inst: Instance, obs: Observation) -> str | None:
    """The observation of a migration step (inside ``apply_observation``), or None when it is not one."""
    if inst.task_state != TaskState.MIGRATING or obs.action_id != inst.action_id:
        return None
    ev = _open(inst)
    if ev is None:
        return None
    inst.power_state = obs.power_state
    if ev.step == Step.STOPPING and obs.action == Action.STOP:
        if not obs.ok or obs.power_state != PowerState.SHUTDOWN:
            why = f"{ev.source.name} could not shut it down cleanly (never forced off: that could lose data)"
            _give_up(inst, ev, f"{why}: {obs.message}", obs)
            return "migration-refused"
        _event(inst, f"shut down on {ev.source.name}")
        _send_disk(inst, ev)
        return "migration"
    if ev.step == Step.SENDING and obs.action == Action.SEND_DISK:
        if not obs.ok:
            _give_up(inst, ev, f"{ev.source.name} could not send its disk: {obs.message}", obs)
            return "migration-failed"
        sent = dict(obs.details)
        digest, size = sent.get("digest", "?"), sent.get("size", "?")
        took = f"export {sent.get('export_seconds', '?')} s, upload {sent.get('upload_seconds', '?')} s"
        _event(inst, f"{ev.source.name} sent its disk: {digest}, {size} bytes ({took})")
        ev.step = Step.IMPORTING
        ev.save(update_fields=["step"])
        inst.status_reason = f"drain of node {ev.source.name}: migrating: the portal checks its disk"[:255]
        inst.save()
        _after_import(inst, ev)
        return "migration"
    if ev.step == Step.CREATING and obs.action == Action.CREATE:
        if not obs.ok:
            _give_up(inst, ev, f"{obs.node} could not build it: {obs.message}", obs)
            return "migration-failed"
        _finish(inst, ev, obs)
        return "migration"
    return None


def image_settled(image_id: int) -> None:
    """The import of an upload has ended: a migration waiting for it goes on (or fails)."""
    with transaction.atomic():
        ev = (
            Evacuation.objects.select_for_update(of=("self",))
            .filter(image_id=image_id, step=Step.IMPORTING, cleaned_at__isnull=True)
            .select_related("source", "target", "image")
            .first()
        )
        if ev is None:
            return
        inst = Instance.objects.select_for_update().get(pk=ev.instance_id)
        _after_import(inst, ev)


def _after_import(inst: Instance, ev: Evacuation) -> None:
    """Both the disk and its import are in: build on the target (or give up if the import failed)."""
    image = Image.objects.filter(pk=ev.image_id).first() if ev.image_id is not None else None
    if image is None or image.status == ImageStatus.FAILED:
        why = image.status_reason if image else "its image was deleted"
        _give_up(inst, ev, f"the portal refused its disk: {why}", None)
        return
    artifact = image.artifact_for(Kind.VM) if image.status == ImageStatus.ACTIVE else None
    if artifact is None:
        return  # still importing: image_settled goes on
    target = ev.target
    assert target is not None
    try:
        spec = services.build_spec(inst)
    except Conflict as exc:
        _give_up(inst, ev, f"cannot build it on {target.name}: {exc}", None)
        return
    spec = migration.target_spec(spec, artifact.location(), artifact.digest)
    inst.node = target
    _next_step(inst, ev, Step.CREATING, f"{target.name} builds it on its disk")
    dispatch.send(target.queue, CreateInstance(spec, inst.action_id))
    if target.tunnel_address:  # each network's other nodes learn the new peer
        for net in dict.fromkeys(p.network for p in networks.nics(inst)):
            networks.sync_network(net, exclude=target)
    _event(inst, f"its disk is checked ({artifact.digest}); {target.name} builds it")


def _finish(inst: Instance, ev: Evacuation, obs: Observation) -> None:
    """The target runs it: the source's copy is destroyed, the hidden image deleted."""
    source, target = ev.source, ev.target
    assert target is not None
    old_why = inst.isolation_reason.split(": ", 1)[-1]
    inst.isolation_reason = f"vm on {target.name}: migrated from {source.name} ({old_why})"[:255]
    inst.task_state, inst.task_deadline = None, None
    inst.vm_state = states.POWER_TO_VM.get(obs.power_state, VmState.ACTIVE)
    inst.status_reason = ""
    inst.missing_since = None
    inst.save()
    dropped = forwards.forget(inst)
    image = ev.image
    ev.step, ev.image = Step.DONE, None
    ev.destroy_sent_at = timezone.now()
    ev.save(update_fields=["step", "image", "destroy_sent_at"])
    dispatch.send(source.queue, DeleteInstance(str(inst.pk), Kind.VM, ev.destroy_action_id))
    if image is not None:
        _drop_image(image)
    note = f"; {dropped} published port(s) on {source.name} removed" if dropped else ""
    _event(inst, f"running on {target.name} with its disk; destroying the copy on {source.name}{note}")
    from portal.cloud import evacuation  # the stop of a VM that was stopped: one rule for every move

    evacuation.rebuilt(inst, obs)


def _give_up(inst: Instance, ev: Evacuation, why: str, obs: Observation | None) -> None:
    """Put the VM back on its source as it was (restarted if it ran), with the reason."""
    source, target, step = ev.source, ev.target, ev.step
    was_running = not ev.then_stop
    if inst.node_id != source.pk and target is not None:  # the target may hold a partial copy
        left = Evacuation.objects.create(
            instance=inst,
            source=target,
            target=source,
            mode=Evacuation.Mode.DRAIN,
            destroy_action_id=uuid.uuid4().hex,
            destroy_sent_at=timezone.now(),
        )
        dispatch.send(target.queue, DeleteInstance(str(inst.pk), Kind.VM, left.destroy_action_id))
    image = ev.image
    ev.step, ev.image, ev.cleaned_at = Step.DONE, None, timezone.now()
    ev.save(update_fields=["step", "image", "cleaned_at"])
    if image is not None:
        _drop_image(image)
    inst.node = source
    inst.task_state, inst.task_deadline = None, None
    stopped_here = step != Step.STOPPING or (obs is not None and obs.power_state == PowerState.SHUTDOWN)
    if step == Step.STOPPING and obs is not None:
        inst.power_state = obs.power_state
        inst.vm_state = states.POWER_TO_VM.get(obs.power_state, VmState.ACTIVE)
    elif stopped_here:
        inst.power_state, inst.vm_state = PowerState.SHUTDOWN, VmState.STOPPED
    inst.status_reason = f"drain: not migrated to {target.name if target else '-'} ({step}): {why}"[:255]
    inst.save()
    _event(inst, f"{inst.status_reason}; it stays on {source.name}", ok=False)
    if was_running and inst.vm_state == VmState.STOPPED:
        services.dispatch_action(
            inst, Action.START, {}, None, f"it ran before the migration; on {source.name}"
        )
        inst.status_reason = f"drain: not migrated ({step}): {why}; started again on {source.name}"[:255]
        inst.save(update_fields=["status_reason", "updated_at"])


def timed_out(inst: Instance) -> bool:
    """The sweeper found the migration past its deadline: back to the source (True when it was one)."""
    ev = _open(inst)
    if ev is None:
        return False
    node = ev.target.name if ev.step == Step.CREATING and ev.target else ev.source.name
    _give_up(inst, ev, f"{node} did not report the {ev.step} step in time", None)
    return True


def _drop_image(image: Image) -> None:
    """Delete the hidden image and the blobs only it used (after commit, as any image delete)."""
    try:
        image_services.delete_image(image)
    except Conflict as exc:  # importing still: the maintenance sweep ends it; deleted then
        log.warning("hidden migration image %s kept for now: %s", image.pk, exc)
