"""Container logs through the node: ask, wait on a Redis list, answer; and follow for a while.

The portal never reads a node's disk and no node listens: a
:class:`~compute.spec.LogsRequest` goes to the node's queue like every other
message, and the node pushes its :class:`~compute.spec.LogsResult` onto a
Redis list this request waits on (BLPOP), as ``exec`` does
(:mod:`portal.console.services`).  A follow repeats that about once a second
from the newest line it has sent, for at most ``SKYPORT_LOG_FOLLOW_SECONDS``,
and only ``FOLLOW_SLOTS`` at once per web process so follows never take all of
gunicorn's threads.  Rules of the log itself (k8s-file, times, caps) are in
:mod:`compute.logs`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from django.conf import settings
from django.utils import timezone

from compute import logs
from compute.console.streams import NO_REDIS, redis_url
from compute.spec import Capability, Kind, LogsRequest, LogsResult, SpecError, from_json
from portal.cloud import dispatch
from portal.cloud.choices import NodeStatus, VmState
from portal.cloud.models import Instance
from portal.errors import Conflict, DomainError, NotFound

NODE_ANSWER_SECONDS = 10  # a node that takes longer is not answering
FOLLOW_POLL_SECONDS = 1.0
FOLLOW_SLOTS = 2  # follows at once per web process (gunicorn runs 4 threads in each)
_follow_slots = threading.BoundedSemaphore(FOLLOW_SLOTS)


class LogsRefused(Conflict):
    """This instance has no logs to read (a VM, a node without the logs capability, no node)."""

    code = "logs_refused"


class LogsGone(NotFound):
    code = "logs_gone"


class NodeSilent(DomainError):
    """The node did not answer in time (the view answers 504)."""

    code = "node_timeout"


class TooManyFollows(DomainError):
    code = "too_many_follows"


@dataclasses.dataclass(frozen=True)
class Query:
    """What the client asked for, checked (``stream`` "" = both, ``since`` "" = from the start)."""

    tail: int | None = None
    since: str = ""
    stream: str = ""


@dataclasses.dataclass(frozen=True)
class Answer:
    lines: tuple[tuple[str, str, str], ...]
    truncated: bool
    retained: bool
    node: str


def _wait_redis(reply: str, timeout: float) -> dict[str, Any] | None:
    from portal.console.services import redis_client

    got: Any = redis_client().blpop([reply], timeout=max(1, int(timeout)))
    return None if got is None else json.loads(got[1])


#: how a request waits for the node's answer (tests swap in their own node)
wait_reply: Callable[[str, float], dict[str, Any] | None] = _wait_redis


def check_readable(instance: Instance) -> None:
    """Refuse an instance whose logs cannot be read, with the sentence saying why."""
    if instance.kind == Kind.VM:
        raise LogsRefused(
            f"{instance.name} is a VM: VMs have no stdout/stderr logs; read its serial console "
            f"at /api/v1/instances/{instance.pk}/console/ instead."
        )
    if instance.node is None:
        raise LogsRefused(f"{instance.name} never reached a node, so it has no logs.")
    if instance.node.status == NodeStatus.DOWN:
        raise LogsRefused(
            f"Node {instance.node.name} is down (no heartbeat), so {instance.name}'s logs, "
            "which are kept there, cannot be read now."
        )
    if redis_url(settings.CELERY_BROKER_URL) is None:
        raise LogsRefused(NO_REDIS[0].upper() + NO_REDIS[1:] + ".")
    if Capability.LOGS not in instance.capabilities:
        raise LogsRefused(
            f"The container driver of node {instance.node.name} does not report the logs "
            f"capability (an older node?), so {instance.name}'s logs cannot be read."
        )
    if instance.vm_state == VmState.DELETED:
        hours = settings.SKYPORT_LOG_RETENTION_HOURS
        deleted = instance.deleted_at or timezone.now()
        if timezone.now() - deleted > dt.timedelta(hours=hours):
            raise LogsGone(
                f"The logs of {instance.name} were kept for {hours} h after its delete "
                f"({deleted:%Y-%m-%d %H:%M} UTC) and are gone."
            )


def read(instance: Instance, query: Query, skip: int = 0, wait: float = NODE_ANSWER_SECONDS) -> Answer:
    """Ask the instance's node for the lines ``query`` selects and wait up to ``wait`` s for its answer."""
    check_readable(instance)
    assert instance.node is not None
    reply = f"skyport:logs:{uuid.uuid4()}"
    try:
        request = LogsRequest(
            str(instance.pk), Kind(instance.kind), reply, query.tail, query.since, query.stream, skip
        )
    except SpecError as exc:  # the view checked the parameters; a bug if this happens
        raise LogsRefused(str(exc)) from None
    dispatch.send(instance.node.queue, request)
    data = wait_reply(reply, wait)
    if data is None:
        raise NodeSilent(f"Node {instance.node.name} did not answer within {wait:.0f} s.")
    result = from_json(LogsResult, data)
    if result.error:
        raise LogsGone(f"No logs of {instance.name} on node {instance.node.name}: {result.error}")
    return Answer(result.lines, result.truncated, result.retained, instance.node.name)


def follow(instance: Instance, query: Query, clock: Callable[[], float] = time.monotonic) -> Iterator[bytes]:
    """NDJSON: the lines ``query`` selects, then new ones as they come, for at most the follow limit.

    Each line is ``{"time", "stream", "text"}``; the last one is
    ``{"end": "<why>"}`` (the time limit, a node that stopped answering, or
    the logs going away).  Raises :class:`TooManyFollows` before the first
    byte when this process already serves ``FOLLOW_SLOTS`` follows.
    """
    check_readable(instance)
    if not _follow_slots.acquire(blocking=False):
        raise TooManyFollows(
            f"This web process already streams {FOLLOW_SLOTS} log follows; read without follow=1 "
            "or try again shortly."
        )
    try:
        first = read(instance, query)
    except BaseException:
        _follow_slots.release()
        raise
    return _stream(instance, query, first, clock)


def _stream(instance: Instance, query: Query, first: Answer, clock: Callable[[], float]) -> Iterator[bytes]:
    limit = settings.SKYPORT_LOG_FOLLOW_SECONDS
    deadline = clock() + limit
    try:
        lines = first.lines
        cursor, seen = _cursor(lines, query.since, 0)
        yield from (_ndjson(line) for line in lines)
        why = f"follow limit of {limit} s reached; ask again with since= the last time to go on"
        while clock() < deadline:
            time.sleep(min(FOLLOW_POLL_SECONDS, max(0.0, deadline - clock())))
            try:
                new = read(instance, Query(None, cursor, query.stream), skip=seen).lines
            except DomainError as exc:
                why = str(exc)
                break
            cursor, seen = _cursor(new, cursor, seen)
            for line in new:
                yield _ndjson(line)
        yield (json.dumps({"end": why}) + "\n").encode()
    finally:
        _follow_slots.release()


def _cursor(lines: tuple[tuple[str, str, str], ...], since: str, seen: int) -> tuple[str, int]:
    """Where the next poll starts: the newest time sent and how many lines of that time were sent."""
    if not lines:
        return since, seen
    newest = lines[-1][0]
    at_newest = sum(1 for line in lines if line[0] == newest)
    if since and logs.parse_time(since) == logs.parse_time(newest):
        at_newest += seen
    return newest, at_newest


def _ndjson(line: tuple[str, str, str]) -> bytes:
    return (json.dumps({"time": line[0], "stream": line[1], "text": line[2]}) + "\n").encode()
