"""Metering what the portal itself owns: volumes (GB while they exist) and published ports.

Why not samples: whether a volume exists and how big it is, or whether a
port is published, is decided by the portal (the node's observation settles
a volume's create, extend and delete; publishing and unpublishing a port is
a database row), so its :class:`ResourceEvent` list is exact and nothing is
lost while a node is silent.  A volume costs disk from the node's
confirmation of its create to the confirmation of its delete, attached or
not, its instance running or not; a published port costs from publishing
to unpublishing (or its instance's delete).

Rows: one :class:`UsageHour` per resource and hour (``subject``), rolled up
into :class:`UsageDay` like an instance's.  An open resource (not ended)
grows with time, so beat runs :func:`tick` every
``SKYPORT_METERING_TICK_SECONDS``: it rebuilds each open resource's hours
from its last row to now.  Every write goes through :func:`rebuild`, which
computes from the raw events with :func:`intervals.resource_hourly`, so an
incremental row and a recomputation (``recompute_usage``) cannot disagree.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import defaultdict
from collections.abc import Iterable

from django.db import IntegrityError, transaction
from django.db.models import Max
from django.utils import timezone

from portal.metering.intervals import HOUR, Change, Quantities, floor_hour, resource_hourly
from portal.metering.models import (
    QUANTITIES,
    ResourceEvent,
    UsageDay,
    UsageHour,
    UsageKind,
    UsageMonth,
)
from portal.metering.sampling import roll_months

#: the quantity each kind of resource fills, and whether its time is the row's coverage
_FIELDS = {"volume": ("disk_gb_ms", True), "port": ("address_ms", False)}


def volume_subject(volume_id: uuid.UUID | str) -> str:
    return f"volume:{volume_id}"


def port_subject(port_id: int) -> str:
    return f"port:{port_id}"


def _now_ms() -> dt.datetime:
    now = timezone.now()
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def record(
    subject: str,
    tenant_id: int,
    kind: str,
    amount: int,
    *,
    instance_id: uuid.UUID | None = None,
    at: dt.datetime | None = None,
) -> bool:
    """Store that ``subject`` holds ``amount`` from ``at`` (default now) and rebuild its rows from there.

    Runs inside the caller's transaction (the volume's or port's own
    change), so the event and the change commit together.  A second event of
    the same subject at the same millisecond is a duplicate and adds
    nothing, except an end (``amount`` 0), which wins: a resource created and
    removed within one millisecond has cost nothing.
    """
    now = _now_ms()
    at = now if at is None else min(at, now).replace(microsecond=at.microsecond // 1000 * 1000)
    try:
        with transaction.atomic():
            ResourceEvent.objects.create(
                subject=subject,
                tenant_id=tenant_id,
                instance_id=instance_id,
                kind=kind,
                at=at,
                amount=amount,
                recorded_at=now,
            )
    except IntegrityError:
        if amount or not ResourceEvent.objects.filter(subject=subject, at=at).exclude(amount=0).update(
            amount=0
        ):
            return False
    rebuild(subject, min(floor_hour(at), _resume(subject)), now)
    return True


def _resume(subject: str) -> dt.datetime:
    """Where ``subject``'s rows may be incomplete: its last hour row (the last rebuild ended in it).

    Without rows: the hour of its first event.
    """
    last: dt.datetime | None = UsageHour.objects.filter(subject=subject).aggregate(last=Max("hour"))["last"]
    if last is not None:
        return last
    first = ResourceEvent.objects.filter(subject=subject).order_by("at").values_list("at", flat=True)[0]
    return floor_hour(first)


def rebuild(subject: str, lo: dt.datetime, until: dt.datetime) -> int:
    """Recompute ``subject``'s hour rows from ``lo`` (a whole hour) to ``until`` and their days.

    Returns the number of hour rows written.  The subject's event rows are
    locked first, so a tick and a change of the same resource rebuild one
    after the other (PostgreSQL; SQLite serialises every write anyway).
    """
    hi = floor_hour(until) + HOUR
    with transaction.atomic():
        events = list(ResourceEvent.objects.select_for_update().filter(subject=subject).order_by("at"))
        UsageHour.objects.filter(subject=subject, hour__gte=lo, hour__lt=hi).delete()
        if not events:
            UsageDay.objects.filter(subject=subject, day__gte=lo.date()).delete()
            UsageMonth.objects.filter(subject=subject, month__gte=lo.date().replace(day=1)).delete()
            return 0
        field, covered = _FIELDS[subject.split(":", 1)[0]]
        changes = [Change(e.at, e.amount) for e in events]
        hours = resource_hourly(changes, field, until, lo, hi, covered=covered)
        last = events[-1]
        UsageHour.objects.bulk_create(
            UsageHour(
                subject=subject,
                instance_id=last.instance_id,
                tenant_id=last.tenant_id,
                kind=last.kind,
                hour=h,
                **q.as_dict(),
            )
            for h, q in sorted(hours.items())
        )
        _roll_days(subject, last, lo.date(), (hi - dt.timedelta(microseconds=1)).date())
    return len(hours)


def _roll_days(subject: str, last: ResourceEvent, first: dt.date, final: dt.date) -> None:
    start = dt.datetime.combine(first, dt.time(), tzinfo=dt.UTC)
    end = dt.datetime.combine(final, dt.time(), tzinfo=dt.UTC) + dt.timedelta(days=1)
    days: dict[dt.date, Quantities] = defaultdict(Quantities)
    for row in UsageHour.objects.filter(subject=subject, hour__gte=start, hour__lt=end).values(
        "hour", *QUANTITIES
    ):
        days[row.pop("hour").date()].add(Quantities(**row))
    UsageDay.objects.filter(subject=subject, day__gte=first, day__lte=final).delete()
    UsageDay.objects.bulk_create(
        UsageDay(
            subject=subject,
            instance_id=last.instance_id,
            tenant_id=last.tenant_id,
            kind=last.kind,
            day=d,
            **q.as_dict(),
        )
        for d, q in sorted(days.items())
    )
    roll_months(
        {"subject": subject},
        {"instance_id": last.instance_id, "tenant_id": last.tenant_id, "kind": last.kind},
        first,
        final,
    )


def open_subjects() -> list[str]:
    """Resources that have begun and not ended."""
    ended = ResourceEvent.objects.filter(amount=0).values("subject")
    return sorted(set(ResourceEvent.objects.exclude(subject__in=ended).values_list("subject", flat=True)))


def tick(now: dt.datetime | None = None) -> int:
    """Extend every open resource's rows up to ``now`` (from its last hour row); returns hour rows written."""
    now = now or _now_ms()
    written = 0
    for subject in open_subjects():
        written += rebuild(subject, _resume(subject), now)
    return written


def recompute(subjects: Iterable[str], now: dt.datetime | None = None) -> int:
    """Rebuild every row of ``subjects`` from their raw events up to ``now``; returns hour rows written."""
    now = now or _now_ms()
    written = 0
    for subject in subjects:
        first = (
            ResourceEvent.objects.filter(subject=subject).order_by("at").values_list("at", flat=True).first()
        )
        with transaction.atomic():
            UsageHour.objects.filter(subject=subject).delete()
            UsageDay.objects.filter(subject=subject).delete()
            UsageMonth.objects.filter(subject=subject).delete()
            if first is not None:
                written += rebuild(subject, floor_hour(first), now)
    return written


def volume_changed(volume_id: uuid.UUID, tenant_id: int, size_gb: int) -> None:
    """A volume exists with ``size_gb`` from now (its node confirmed create or extend), or is gone (0)."""
    record(volume_subject(volume_id), tenant_id, UsageKind.VOLUME, size_gb)


def port_published(port_id: int, tenant_id: int, instance_id: uuid.UUID, kind: str, at: dt.datetime) -> None:
    record(port_subject(port_id), tenant_id, kind, 1, instance_id=instance_id, at=at)


def port_unpublished(port_id: int, tenant_id: int, instance_id: uuid.UUID, kind: str) -> None:
    record(port_subject(port_id), tenant_id, kind, 0, instance_id=instance_id)
