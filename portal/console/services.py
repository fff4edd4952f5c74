"""Console sessions: mint a ticket, redeem it once, end the session; non-interactive exec.

Every rule a console follows is here, free of HTTP and WebSockets: the API
view mints, the relay (:mod:`portal.console.relay`) redeems and ends.  A
ticket is bound to one user, tenant, instance and mode; the mode's role is
checked when it is minted (viewers may only ``view``).  Starting and ending a
session are audit events (``console.start``, ``console.end`` with the
duration).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import secrets
import time
import uuid
from typing import Any

import redis
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from compute.console.streams import NO_REDIS, redis_url
from compute.spec import Capability, ConsoleMode, ConsoleOpen, ExecRequest, ExecResult, Kind, from_json
from portal.audit import log
from portal.cloud import dispatch
from portal.cloud.choices import VmState
from portal.cloud.models import Instance
from portal.console.models import ConsoleSession
from portal.errors import Conflict
from portal.tenancy.choices import Role
from portal.tenancy.querysets import Actor


class ConsoleRefused(Conflict):
    """The instance cannot have this console now (state, kind, node capability)."""

    code = "console_refused"


class RoleTooLow(Exception):
    """The actor's role does not allow this mode (the API answers 403 with the sentence)."""


class TicketRefused(Exception):
    """A ticket that cannot be redeemed; ``str()`` says why in one sentence."""


#: the least role each mode needs in the instance's tenant
MODE_ROLE = {ConsoleMode.VIEW: Role.VIEWER, ConsoleMode.WRITE: Role.MEMBER, ConsoleMode.EXEC: Role.MEMBER}


def _hash(ticket: str) -> str:
    return hashlib.sha256(ticket.encode()).hexdigest()


def redis_client() -> redis.Redis:
    """The Redis both the relay and the nodes reach (the broker's)."""
    url = redis_url(settings.CELERY_BROKER_URL)
    if url is None:
        raise ConsoleRefused(NO_REDIS[0].upper() + NO_REDIS[1:] + ".")
    return redis.Redis.from_url(url)


def _check_usable(instance: Instance, capability: Capability, what: str) -> None:
    if redis_url(settings.CELERY_BROKER_URL) is None:
        raise ConsoleRefused(NO_REDIS[0].upper() + NO_REDIS[1:] + ".")
    if instance.vm_state != VmState.ACTIVE or instance.node is None:
        raise ConsoleRefused(
            f"Instance {instance.name} is {instance.vm_state}: {what} needs an active, running instance."
        )
    if capability not in instance.capabilities:
        raise ConsoleRefused(
            f"The {instance.kind} driver of node {instance.node.name} does not report the "
            f"{capability.value} capability, so {what} is not available for {instance.name}."
        )


def mint(
    actor: Actor, user: Any, instance: Instance, mode: ConsoleMode, command: tuple[str, ...]
) -> tuple[ConsoleSession, str]:
    """A new session and its ticket (returned once; only its hash is kept)."""
    need = MODE_ROLE[mode]
    if not actor.can(instance.tenant_id, need):
        raise RoleTooLow(
            f"A {mode.value} console needs the {Role(need).label.lower()} role in the tenant; "
            f"you are {Role(actor.role_in(instance.tenant_id) or Role.VIEWER).label.lower()}."
        )
    if instance.kind == Kind.VM and mode is ConsoleMode.EXEC:
        raise ConsoleRefused(
            f"{instance.name} is a VM: use its serial console (mode view or write); exec is for containers."
        )
    if instance.kind == Kind.CONTAINER and mode is not ConsoleMode.EXEC:
        raise ConsoleRefused(
            f"{instance.name} is a container: open a shell with mode exec (it has no serial console)."
        )
    _check_usable(instance, Capability.TERMINAL, "an interactive console")
    ticket = secrets.token_urlsafe(32)
    session = ConsoleSession.objects.create(
        tenant_id=instance.tenant_id,
        instance=instance,
        user=user,
        mode=mode.value,
        command=list(command),
        ticket_hash=_hash(ticket),
        expires_at=timezone.now() + dt.timedelta(seconds=settings.SKYPORT_CONSOLE_TICKET_SECONDS),
    )
    return session, ticket


def redeem(ticket: str) -> ConsoleSession:
    """Mark the ticket used (once: a conditional UPDATE) and ask the node for the session's hub."""
    now = timezone.now()
    digest = _hash(ticket)
    with transaction.atomic():
        claimed = ConsoleSession.objects.filter(
            ticket_hash=digest, started_at__isnull=True, expires_at__gt=now
        ).update(started_at=now)
        session = (
            ConsoleSession.objects.select_related("instance__node", "user").filter(ticket_hash=digest).first()
        )
        if session is None:
            raise TicketRefused("unknown console ticket")
        if not claimed:
            raise TicketRefused(
                "console ticket already used" if session.started_at else "console ticket expired"
            )
        instance = session.instance
        if instance.tenant_id != session.tenant_id:
            raise TicketRefused("the ticket is not for this tenant's instance")
        try:
            _check_usable(instance, Capability.TERMINAL, "an interactive console")
        except ConsoleRefused as exc:
            raise TicketRefused(str(exc)) from None
        assert instance.node is not None
        mode = ConsoleMode(session.mode)
        # a VM's hub is shared and always writable: the relay drops a viewer's input
        hub_mode = ConsoleMode.WRITE if mode is ConsoleMode.VIEW else mode
        dispatch.send(
            instance.node.queue,
            ConsoleOpen(str(instance.pk), Kind(instance.kind), session.hub, hub_mode, tuple(session.command)),
        )
        log.record(
            "console.start",
            instance,
            actor=session.user,
            message=f"{session.mode} console session {session.pk} started",
        )
    return session


def end(session: ConsoleSession, reason: str) -> None:
    """Record the end of a session and how long it lasted."""
    now = timezone.now()
    started = session.started_at or now
    seconds = round((now - started).total_seconds(), 1)
    ConsoleSession.objects.filter(pk=session.pk).update(ended_at=now, end_reason=reason[:255])
    log.record(
        "console.end",
        session.instance,
        actor=session.user,
        message=f"{session.mode} console session {session.pk} ended after {seconds} s: {reason}",
    )


# ---------------------------------------------------------------- non-interactive exec


@dataclasses.dataclass(frozen=True)
class ExecAnswer:
    result: ExecResult | None
    waited: float


def run_exec(instance: Instance, command: tuple[str, ...], timeout: float, max_bytes: int) -> ExecAnswer:
    """Send an :class:`ExecRequest` to the node and wait for its result on a Redis list."""
    _check_usable(instance, Capability.EXEC, "exec")
    assert instance.node is not None
    reply = f"skyport:exec:{uuid.uuid4()}"
    request = ExecRequest(str(instance.pk), Kind(instance.kind), command, reply, timeout, max_bytes)
    started = time.monotonic()
    dispatch.send(instance.node.queue, request)
    # the node answers within ``timeout`` plus its start-up; beyond that it is not answering
    got: Any = redis_client().blpop([reply], timeout=max(1, int(timeout + 10)))
    if got is None:
        return ExecAnswer(None, time.monotonic() - started)
    result = from_json(ExecResult, json.loads(got[1]))
    return ExecAnswer(result, time.monotonic() - started)
