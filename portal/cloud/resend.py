"""A create or delete lost on its way to the node, or its observation on the way back: sent again.

kombu's Redis transport can lose a message on its way to a worker: it pops the
message (``BRPOP``) before it records it as unacknowledged, so a connection that
breaks in between (Redis restarted under load) loses it for good, and no
visibility timeout brings it back (seen in tests/faults, the burst of 100: one
create never reached the node, and its instance would have been failed at its
deadline, 11 minutes later by default).  The node's observation travels back
through the same transport and can be lost the same way.

The node's heartbeat lists the action ids of the instance messages it took in
the last ``taken_window`` seconds, and those it has handled (``done``: its
observation sent; compute/taken.py).  Reconcile picks the instances of the node
whose create or delete was claimed at least ``SKYPORT_RESEND_AFTER_SECONDS`` ago
(and within the node's window, or the node's silence says nothing) and

- is not among the ids the node took (the message was lost), or
- is among those it has handled, yet the row still waits (the observation was
  lost: the beat that says "done" left the node after the observation did);

and this module sends such a message again, with the same action id, when the
node's queue on the broker is empty (a message still queued is not lost) and no
message to the node waits unsent (portal/cloud/dispatch.py).  It does so at most
:data:`MAX_RESENDS` times per action, ``SKYPORT_RESEND_AFTER_SECONDS`` apart,
each recorded as a ``dispatch.resend`` event.  Sending a create or delete again
is harmless: spawn and destroy are idempotent by instance id, the node observes
again, and an observation of an action id already applied is ignored.

Only the lifecycle messages are rebuilt from the row (a create from the instance
as it is, a delete from its id); an action's parameters are not kept, so a lost
start, stop or snapshot still ends at its deadline.  A drain's create that waits
for the old copy to stop (``Evacuation.create_pending``) is not the node's to
take yet and is left alone.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable

from django.conf import settings
from django.db.models import Count, Max
from django.utils import timezone

from compute.spec import CreateInstance, DeleteInstance, Kind, NodeReport
from portal.audit.log import record
from portal.audit.models import Event
from portal.cloud import deadlines, dispatch
from portal.cloud.choices import TaskState, VmState
from portal.cloud.models import ComputeNode, Evacuation, Instance
from portal.cloud.services import build_spec
from portal.errors import Conflict

log = logging.getLogger(__name__)

#: the task states whose message can be rebuilt from the row and sent again
RESENDABLE = frozenset({TaskState.SPAWNING, TaskState.DELETING})
#: how many times one action's message is sent again at most
MAX_RESENDS = 3
ACTION = "dispatch.resend"


#: why a message is sent again (filled with the node, the task and the resend interval)
NOT_TAKEN = "{node} did not take the {task} message within {after:g} s"
NOT_OBSERVED = "{node} handled the {task} message, but its observation did not arrive within {after:g} s"


def unanswered(
    rows: Iterable[tuple[str, str | None, str, dt.datetime | None]], report: NodeReport, now: dt.datetime
) -> dict[str, str]:
    """The instances (pk, task state, action id, deadline) whose message or observation was lost, and why.

    No query: reconcile hands in the values it already read, and ``now`` is the beat's time.
    Empty unless the node reports what it took (``taken_window`` > 0).
    """
    if report.taken_window <= 0:
        return {}
    taken, done = set(report.taken), set(report.done)
    after = float(settings.SKYPORT_RESEND_AFTER_SECONDS)
    out = {}
    for pk, task_state, action_id, deadline in rows:
        if task_state not in RESENDABLE or deadline is None or not action_id:
            continue
        if action_id in done:
            why = NOT_OBSERVED
        elif action_id not in taken:
            why = NOT_TAKEN
        else:
            continue  # taken and still at work
        claimed = deadline - dt.timedelta(seconds=deadlines.deadline_seconds(task_state))
        age = (now - claimed).total_seconds()
        if after <= age <= report.taken_window - after:
            out[str(pk)] = why
    return out


def resend(
    node: ComputeNode, lost: dict[str, str], report: NodeReport, now: dt.datetime | None = None
) -> int:
    """Send again the messages of ``lost`` (from :func:`unanswered`); how many were sent.

    Outside any transaction: it asks the broker how long the node's queue is.
    """
    if not lost:
        return 0
    now = now or timezone.now()
    if dispatch.waiting_unsent(node.queue):
        return 0  # the sweep sends those first, in order
    waiting = dispatch.queued(node.queue)
    if waiting != 0:
        if waiting is None:
            log.info("not sending lost messages to %s again: its queue's length is unknown", node.name)
        return 0  # still queued, not lost (or the broker cannot say)
    after = dt.timedelta(seconds=float(settings.SKYPORT_RESEND_AFTER_SECONDS))
    pending = Evacuation.objects.filter(create_pending=True).values("instance_id")
    rows = (
        Instance.objects.filter(pk__in=list(lost), node=node, task_state__in=RESENDABLE)
        .exclude(vm_state=VmState.DELETED)
        .exclude(pk__in=pending)
        .select_related("image", "node", "tenant")
    )
    sent = 0
    for inst in rows:
        before = Event.objects.filter(
            object_id=str(inst.pk), action=ACTION, request_id=inst.action_id
        ).aggregate(n=Count("id"), last=Max("created_at"))
        if before["n"] >= MAX_RESENDS or (before["last"] and now - before["last"] < after):
            continue
        if inst.task_state == TaskState.DELETING:
            message: CreateInstance | DeleteInstance = DeleteInstance(
                str(inst.pk), Kind(inst.kind), inst.action_id
            )
        else:
            try:
                message = CreateInstance(build_spec(inst), inst.action_id)
            except Conflict as exc:  # its image deleted meanwhile: the deadline fails it
                log.warning("cannot build the lost create of %s again: %s", inst.pk, exc)
                continue
        record(
            ACTION,
            inst,
            actor_name="portal",
            message=(
                lost[str(inst.pk)].format(
                    node=node.name, task=message.TASK, after=settings.SKYPORT_RESEND_AFTER_SECONDS
                )
                + f"; its queue is empty: sent again ({before['n'] + 1} of {MAX_RESENDS})"
            ),
            request_id=inst.action_id,
        )
        dispatch.send(node.queue, message)
        sent += 1
    if sent:
        log.warning("sent %d lost message(s) to %s again", sent, node.name)
    return sent
