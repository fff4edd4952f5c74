"""Turning heartbeats and observations into samples, and samples into hour and day rows.

Why here and not in the control tasks: the control worker only says "this
node reported this" (``record_report``) or "this observation was applied"
(``record_observation``); everything about time, duplicates and gaps is
decided here.  A sample's time is the node's clock bounded by the portal's
receive time, truncated to milliseconds; ``(instance, at)`` is unique, so a
duplicate delivery inserts nothing and changes nothing.  A new sample
rebuilds only the hours between its neighbours, from the raw samples, with
the same function ``recompute`` uses, so the incremental rows and a full
recomputation cannot disagree.  A heartbeat's interval goes to the hour rows;
the day and month rows follow them at :func:`roll` (``RollupMark``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import math
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db import IntegrityError, connection, transaction
from django.db.models import Exists, Min, OuterRef, QuerySet, Subquery, Sum
from django.db.models.functions import TruncDate, TruncMonth
from django.utils import timezone

from compute.spec import InventoryItem, Kind, NodeReport, Observation, PowerState
from portal.cloud.models import Instance
from portal.metering.intervals import HOUR, Point, Quantities, floor_hour, hourly
from portal.metering.models import (
    INSTANCE_SUBJECT,
    QUANTITIES,
    RollupMark,
    SampleSource,
    UsageDay,
    UsageHour,
    UsageMonth,
    UsageSample,
)

log = logging.getLogger(__name__)


def gap_ms() -> int:
    """Samples farther apart than this many milliseconds leave a gap: N missed heartbeats, after the
    heartbeat sample period when it is longer than a beat (:func:`beat_due`)."""
    beats = settings.SKYPORT_METERING_GAP_BEATS * settings.SKYPORT_HEARTBEAT_SECONDS
    return int((beats + beat_period()) * 1000)


def beat_period() -> float:
    """Seconds between a node's sampled heartbeats, or 0 when every beat is sampled (a period of
    ``SKYPORT_METERING_BEAT_SECONDS`` up to one heartbeat)."""
    period = float(settings.SKYPORT_METERING_BEAT_SECONDS)
    return period if period > settings.SKYPORT_HEARTBEAT_SECONDS else 0.0


#: the last sampled beat of each node in the cache: (its sample time, its running set's digest)
_BEAT_KEY = "metering:beat:{}"


def _beat_digest(report: NodeReport) -> str:
    """What a sample must not wait for: which of the node's instances run, which of its drivers are down."""
    running = sorted(i.instance_id for i in report.inventory if i.power_state == PowerState.RUNNING)
    blind = sorted(d.kind.value for d in report.drivers if not d.ok)
    return hashlib.blake2b(" ".join([*running, "|", *blind]).encode(), digest_size=16).hexdigest()


def beat_due(node: str, at: dt.datetime, digest: str, last: tuple[float, str] | None, period: float) -> bool:
    """Whether a beat of ``node`` at ``at`` with running set ``digest`` is sampled, after the node's
    last sampled beat ``last`` (its time and digest; None: none known), ``period`` (> 0) apart.

    Once every ``SKYPORT_METERING_BEAT_SECONDS`` (60) of the node's beats, not every beat: the
    samples of the beats between add nothing to what the instances cost but rows (20,000
    instances at 5 s are 14 M samples an hour) and most of a beat's work in the control worker
    (bench/scale.py).  The first beat after each tick of the node's own minute is sampled; each
    node's minute starts at its own offset (:func:`beat_phase`), so nodes that started together,
    or whose last sampled beats the cache lost together, do not all sample in the same
    seconds (bench/scale.py: 500 nodes started at once had a lag p99 of 2.6 s, every sampled
    beat in one 5 s of each minute).  A beat is sampled at once, whatever the period, when the
    set of running instances or of drivers down differs from the last sampled beat's (a crash,
    a start the portal did not order), and a beat older than the last sampled one is not
    sampled (a late beat: the samples around it cover its time).  Starts, stops and deletes the
    portal ordered are exact whatever the period: their observations are samples of their own.
    Without a last sampled beat (the cache lost it, or cannot be read) the beat is sampled.
    """
    if last is None or digest != last[1]:
        return True
    phase = beat_phase(node, period)
    return math.floor((at.timestamp() - phase) / period) > math.floor((last[0] - phase) / period)


def beat_phase(node: str, period: float) -> float:
    """Where in each period the node's sampled beats fall (seconds, from a hash of its name)."""
    spread = int.from_bytes(hashlib.blake2b(node.encode(), digest_size=8).digest(), "big")
    return spread % max(1, round(period * 1000)) / 1000


def _last_sampled(node: str) -> tuple[float, str] | None:
    """The node's last sampled beat from the cache: None when there is none or the cache fails
    (it only saves work: without it the beat is sampled)."""
    try:
        last = cache.get(_BEAT_KEY.format(node))
    except Exception as exc:  # the cache's client raises its own errors (redis.ConnectionError ...)
        log.warning("cannot read the last sampled beat of %s: %s", node, exc)
        return None
    return last if isinstance(last, tuple) and len(last) == 2 else None


def _keep_sampled(node: str, at: dt.datetime, digest: str) -> None:
    try:
        cache.set(_BEAT_KEY.format(node), (at.timestamp(), digest), 24 * 3600)
    except Exception as exc:  # the next beat samples again, no harm
        log.warning("cannot keep the last sampled beat of %s: %s", node, exc)


def retention() -> dt.timedelta:
    """How long raw samples are kept (``SKYPORT_METERING_SAMPLE_DAYS``); their rows are kept for ever."""
    return dt.timedelta(days=settings.SKYPORT_METERING_SAMPLE_DAYS)


def too_old(at: dt.datetime, received: dt.datetime) -> bool:
    """Whether a sample arrived more than the retention after it was taken (a message held that
    long in a broker): the prune may have removed its neighbours, so it could only be misbilled."""
    return received - at > retention()


def pruned_until() -> dt.datetime | None:
    """Where the prune has got to: the rows of the hours before it are final (None: nothing pruned)."""
    return RollupMark.objects.filter(pk=1).values_list("pruned_until", flat=True).first()


def sample_time(node_time: float, received: dt.datetime) -> dt.datetime:
    """The node's time, never later than the portal received it, in whole milliseconds (UTC)."""
    at = dt.datetime.fromtimestamp(node_time, tz=dt.UTC) if node_time else received
    at = min(at, received)
    return at.replace(microsecond=at.microsecond // 1000 * 1000)


def _point(s: UsageSample) -> Point:
    return Point(
        at=s.at,
        running=s.running,
        vcpus=s.vcpus,
        ram_mb=s.ram_mb,
        disk_gb=s.disk_gb,
        memory_bytes=s.memory_bytes,
        cpu_time_ns=s.cpu_time_ns,
        deleted=s.deleted,
    )


def add_sample(
    instance: Instance,
    at: dt.datetime,
    received: dt.datetime,
    source: str,
    node: str,
    *,
    running: bool,
    deleted: bool = False,
    memory_bytes: int = 0,
    cpu_time_ns: int = 0,
) -> bool:
    """Store one sample and rebuild the hours it changes; False when nothing was stored (it was
    already, or it arrived too late: :func:`too_old`)."""
    if too_old(at, received):
        log.warning("refusing a sample of %s taken at %s: older than the samples kept", instance.pk, at)
        return False
    # no savepoint of its own inside a caller's transaction (an observation's, a beat's): nothing
    # here is caught and carried on from but the insert's IntegrityError, which has its own
    with transaction.atomic(savepoint=False):
        serialise([instance.pk])
        try:
            with transaction.atomic():
                _sample(
                    instance,
                    at,
                    received,
                    source,
                    node,
                    running=running,
                    deleted=deleted,
                    memory_bytes=memory_bytes,
                    cpu_time_ns=cpu_time_ns,
                ).save(force_insert=True)
        except IntegrityError:
            return False
        samples = UsageSample.objects.filter(instance=instance).exclude(at=at)
        neighbours = list(samples.filter(at__lt=at).order_by("-at").values_list("at", flat=True)[:1])
        neighbours += samples.filter(at__gt=at).order_by("at").values_list("at", flat=True)[:1]
        if not neighbours:
            # its first sample (a create's observation): no interval yet, no row can change
            return True
        span = [*neighbours, at]
        rebuild(instance, floor_hour(min(span)), floor_hour(max(span)) + HOUR)
        return True


def _sample(
    instance: Instance,
    at: dt.datetime,
    received: dt.datetime,
    source: str,
    node: str,
    *,
    running: bool,
    deleted: bool = False,
    memory_bytes: int = 0,
    cpu_time_ns: int = 0,
) -> UsageSample:
    """A sample of ``instance`` (its allocations as they are now), not saved yet."""
    return UsageSample(
        instance=instance,
        at=at,
        received_at=received,
        source=source,
        node=node,
        running=running,
        deleted=deleted,
        vcpus=instance.vcpus,
        ram_mb=instance.ram_mb,
        disk_gb=instance.disk_gb,
        memory_bytes=memory_bytes,
        cpu_time_ns=cpu_time_ns,
    )


def serialise(instance_ids: Iterable[Any]) -> None:
    """Make the metering writes of these instances wait for each other's, until this transaction ends.

    Two samples of one instance (a heartbeat and an observation) rebuild the same hour rows by
    delete and insert, so they must not interleave.  Locking the instance rows did that, but every
    heartbeat then locked (and dirtied) every instance row of its node, the control worker's limit
    as nodes grew (bench/scale.py).  PostgreSQL: transaction advisory locks keyed by the instance
    id, taken in key order (no deadlock between two beats).  SQLite has one writer at a time.

    The roll (:func:`roll`) waits for them and they for it: a beat reads the roll's mark and adds
    to the day rows of the hours before it only, so the roll must not move the mark in between.
    """
    if connection.vendor != "postgresql":
        return  # SQLite: transactions begin IMMEDIATE (settings), one writer at a time
    keys = sorted({(uuid.UUID(str(i)).int >> 64) & (2**63 - 1) for i in instance_ids})
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock_shared(%s, %s)", ROLL_LOCK)
        if keys:
            cursor.execute(
                "SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) AS k ORDER BY k", [keys]
            )


#: the two-key advisory lock of the roll (a key space apart from the instances' one-key locks)
ROLL_LOCK = (0x534B59, 1)


def rolled_until() -> dt.datetime | None:
    """The roll's mark: the instances' day and month rows wholly before it are exact (None: none are)."""
    return RollupMark.objects.filter(pk=1).values_list("until", flat=True).first()


def _mark_alone() -> RollupMark:
    """The mark's row, locked, with the roll's lock taken alone (PostgreSQL: the beats and rebuilds
    in flight, which hold it shared, finish first); inside the caller's transaction."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", ROLL_LOCK)
    mark, _ = RollupMark.objects.select_for_update().get_or_create(pk=1)
    return mark


#: instances per slice of the roll: ~0.2 s of the beats held up on this 2-core machine
ROLL_SLICE = 500


def roll(now: dt.datetime | None = None, slice_size: int = ROLL_SLICE, max_slices: int | None = None) -> int:
    """Move the mark to the start of the current hour; returns the day rows written.

    The day rows of the instances with hour rows between the old mark and the
    new one are summed again from all the hours of their days, and their month
    rows from the days of their months (a rebuild's rule, set-based: one
    statement per level and slice).  The instances go in slices of
    ``slice_size`` by id, each slice its own transaction under the roll's lock,
    so the beats wait for one slice, never for the whole roll (at 10,000
    instances the single transaction held them for 4.24 s, docs/benchmarks.md).
    ``RollupMark.rolled_through`` says how far the roll got, so a beat in between
    knows which rows it adds to, and a roll stopped half-way (``max_slices``, or
    a worker that died) is finished by the next.  Idempotent; the beat runs it
    every few minutes (``SKYPORT_METERING_ROLL_SECONDS``).
    """
    target = floor_hour(now or timezone.now())
    written = 0
    slices = 0
    while max_slices is None or slices < max_slices:
        with transaction.atomic():
            mark = _mark_alone()
            if mark.rolling_to is None:
                if mark.until is not None and mark.until >= target:
                    return written
                mark.rolling_to, mark.rolled_through = target, None
            done, rows = _roll_slice(mark, slice_size)
            written += rows
            if done:
                mark.until, mark.rolling_to, mark.rolled_through = mark.rolling_to, None, None
            mark.save(update_fields=["until", "rolling_to", "rolled_through"])
        slices += 1
    return written


def _roll_slice(mark: RollupMark, size: int) -> tuple[bool, int]:
    """Sum the day and month rows up to ``mark.rolling_to`` of the next ``size`` instances (by id)
    after ``mark.rolled_through`` that have hours since ``mark.until``; moves ``rolled_through``.
    Returns whether this was the last slice and the day rows written."""
    goal = mark.rolling_to
    assert goal is not None
    hours = UsageHour.objects.filter(subject=INSTANCE_SUBJECT, instance__isnull=False)
    start = mark.until or hours.aggregate(first=Min("hour"))["first"]
    if start is None or start >= goal:
        return True, 0
    after = {} if mark.rolled_through is None else {"instance_id__gt": mark.rolled_through}
    ids = list(
        hours.filter(hour__gte=start, hour__lt=goal, **after)
        .order_by("instance_id")
        .values_list("instance_id", flat=True)
        .distinct()[: size + 1]
    )
    last = len(ids) <= size
    chunk = ids[:size]
    # the slice is every id up to its last one: an instance in that range with no hours yet is
    # rolled too (its later beats add to its day rows), whether it has hours or not
    mark.rolled_through = None if last else chunk[-1]
    if not chunk:
        return last, 0
    first, end = start.date(), (goal - dt.timedelta(microseconds=1)).date()
    written = _sum_days(chunk, first, end)
    _sum_months(chunk, month_start(first), month_start(end))
    return last, written


def prune(now: dt.datetime | None = None, batch: int = 5000) -> int:
    """Delete the raw samples older than the retention; returns how many.

    The hour, day and month rows stay: they are exact for the hours before the prune's mark
    (``RollupMark.pruned_until``, the retention's start rounded down to the hour), which no
    rebuild or recompute touches from then on.  Each instance keeps its newest sample before the
    mark, where the interval that crosses it starts.  The mark moves first, under the roll's lock
    (PostgreSQL: the beats and rebuilds in flight finish first), then the samples go in batches
    of ``batch``, each a short transaction of its own: the beats are never held up for long.
    """
    target = floor_hour((now or timezone.now()) - retention())
    with transaction.atomic():
        mark = _mark_alone()
        if mark.pruned_until is None or mark.pruned_until < target:
            mark.pruned_until = target
            mark.save(update_fields=["pruned_until"])
        target = mark.pruned_until
    newest = (
        UsageSample.objects.filter(instance=OuterRef("instance_id"), at__lt=target)
        .order_by("-at")
        .values("pk")[:1]
    )
    doomed = UsageSample.objects.filter(at__lt=target).exclude(pk=Subquery(newest))
    deleted = 0
    lower: dt.datetime | None = None
    while True:
        # a window of about ``batch`` samples, by time: one DELETE of a range of the ``at`` index
        # (each window starts where the last ended, never over its dead rows), its own transaction
        since = {} if lower is None else {"at__gte": lower}
        window = doomed.filter(**since)
        taken = UsageSample.objects.filter(at__lt=target, **since)
        edge = list(taken.order_by("at").values_list("at", flat=True)[batch : batch + 1])  # the index alone
        if edge and lower is not None and edge[0] <= lower:
            # more than ``batch`` samples at ``lower`` itself (the beats of many nodes in the same
            # millisecond): this window takes all of them, up to the next later time
            edge = list(taken.filter(at__gt=lower).order_by("at").values_list("at", flat=True)[:1])
        upper = edge[0] if edge else target
        with transaction.atomic():
            deleted += window.filter(at__lt=upper).delete()[0]
        if not edge:
            break
        lower = upper
    if deleted:
        log.info("pruned %d usage samples taken before %s", deleted, target)
    return deleted


def _sum_days(instances: list[Any], first: dt.date, last: dt.date) -> int:
    """The day rows ``first..last`` of ``instances`` (ids), summed from their hours."""
    lo = dt.datetime.combine(first, dt.time(), tzinfo=dt.UTC)
    hi = dt.datetime.combine(last, dt.time(), tzinfo=dt.UTC) + dt.timedelta(days=1)
    mine = {"subject": INSTANCE_SUBJECT, "instance_id__in": instances}
    UsageDay.objects.filter(day__gte=first, day__lte=last, **mine).delete()
    hours = UsageHour.objects.filter(hour__gte=lo, hour__lt=hi, **mine)
    return _store_sums(UsageDay, "day", hours.annotate(period=TruncDate("hour", tzinfo=dt.UTC)))


def _sum_months(instances: list[Any], first: dt.date, last: dt.date) -> None:
    """The month rows ``first..last`` (first days) of ``instances``, summed from their days."""
    hi = next_month(last)
    mine = {"subject": INSTANCE_SUBJECT, "instance_id__in": instances}
    UsageMonth.objects.filter(month__gte=first, month__lt=hi, **mine).delete()
    days = UsageDay.objects.filter(day__gte=first, day__lt=hi, **mine)
    _store_sums(UsageMonth, "month", days.annotate(period=TruncMonth("day")))


def _store_sums(model: Any, period: str, rows: QuerySet[Any]) -> int:
    """Insert into ``model`` the sums of ``rows`` (annotated with their ``period``) per instance
    and period, as the instances' own rows; returns how many."""
    sums = rows.values("instance_id", "tenant_id", "kind", "period").annotate(**sum_fields()).order_by()
    made = model.objects.bulk_create(
        (
            model(
                instance_id=r["instance_id"],
                subject=INSTANCE_SUBJECT,
                tenant_id=r["tenant_id"],
                kind=r["kind"],
                **{period: r["period"]},
                **{k: r[k] or 0 for k in QUANTITIES},
            )
            for r in sums
        ),
        batch_size=500,
    )
    return len(made)


def rebuild(instance: Instance, lo: dt.datetime, hi: dt.datetime) -> None:
    """Recompute the instance's hour rows in ``[lo, hi)`` (whole hours) and its day rows there.

    Never before :func:`pruned_until`: those hours' samples are gone, their rows are final.
    """
    final = pruned_until()
    if final is not None and lo < final:
        lo = final
        if lo >= hi:
            return
    samples = UsageSample.objects.filter(instance=instance)
    inside = list(samples.filter(at__gte=lo, at__lt=hi).order_by("at"))
    before = samples.filter(at__lt=lo).order_by("-at").first()
    after = samples.filter(at__gte=hi).order_by("at").first()
    points = [_point(s) for s in ([before] if before else []) + inside + ([after] if after else [])]
    hours = hourly(points, gap_ms(), lo, hi)
    with transaction.atomic():
        UsageHour.objects.filter(
            instance=instance, subject=INSTANCE_SUBJECT, hour__gte=lo, hour__lt=hi
        ).delete()
        UsageHour.objects.bulk_create(
            UsageHour(
                instance=instance, tenant_id=instance.tenant_id, kind=instance.kind, hour=h, **q.as_dict()
            )
            for h, q in sorted(hours.items())
        )
        _roll_days(instance, lo.date(), (hi - dt.timedelta(microseconds=1)).date())


def _roll_days(instance: Instance, first: dt.date, last: dt.date) -> None:
    """Day rows from the hour rows of the days ``first..last``."""
    start = dt.datetime.combine(first, dt.time(), tzinfo=dt.UTC)
    end = dt.datetime.combine(last, dt.time(), tzinfo=dt.UTC) + dt.timedelta(days=1)
    days: dict[dt.date, Quantities] = defaultdict(Quantities)
    for row in UsageHour.objects.filter(
        instance=instance, subject=INSTANCE_SUBJECT, hour__gte=start, hour__lt=end
    ).values("hour", *QUANTITIES):
        days[row.pop("hour").date()].add(Quantities(**row))
    UsageDay.objects.filter(
        instance=instance, subject=INSTANCE_SUBJECT, day__gte=first, day__lte=last
    ).delete()
    UsageDay.objects.bulk_create(
        UsageDay(instance=instance, tenant_id=instance.tenant_id, kind=instance.kind, day=d, **q.as_dict())
        for d, q in sorted(days.items())
    )
    roll_months(
        {"instance": instance, "subject": INSTANCE_SUBJECT},
        {"instance": instance, "tenant_id": instance.tenant_id, "kind": instance.kind},
        first,
        last,
    )


def month_start(day: dt.date) -> dt.date:
    return day.replace(day=1)


def next_month(day: dt.date) -> dt.date:
    """The first day of the month after ``day``'s."""
    return day.replace(year=day.year + day.month // 12, month=day.month % 12 + 1, day=1)


def roll_months(where: dict[str, Any], fields: dict[str, Any], first: dt.date, last: dt.date) -> None:
    """Month rows of one subject (``where``) from its day rows of the months touching ``first..last``.

    Like the days from the hours: the touched months are deleted and summed
    again from the day rows, so a rebuild is idempotent and the month rows
    always equal their days.  ``fields`` are the rows' instance, tenant and kind.
    """
    lo = month_start(first)
    hi = next_month(last)
    months: dict[dt.date, Quantities] = defaultdict(Quantities)
    for row in UsageDay.objects.filter(day__gte=lo, day__lt=hi, **where).values("day", *QUANTITIES):
        months[month_start(row.pop("day"))].add(Quantities(**row))
    UsageMonth.objects.filter(month__gte=lo, month__lt=hi, **where).delete()
    subject = where.get("subject", "")
    UsageMonth.objects.bulk_create(
        UsageMonth(subject=subject, month=m, **fields, **q.as_dict()) for m, q in sorted(months.items())
    )


def recompute(instances: Iterable[Instance]) -> int:
    """Rebuild every hour and day row of ``instances`` from their raw samples; returns hours written.

    After a prune, only the rows from :func:`pruned_until` on: the earlier ones are final (their
    samples are gone) and are kept as they are; the day and month rows that straddle it are summed
    again from the kept hours and days.
    """
    written = 0
    final = pruned_until()
    for instance in instances:
        span = UsageSample.objects.filter(instance=instance).order_by("at").values_list("at", flat=True)
        first, last = span.first(), span.last()
        mine = {"instance": instance, "subject": INSTANCE_SUBJECT}
        with transaction.atomic():
            if final is None:
                UsageHour.objects.filter(**mine).delete()
                UsageDay.objects.filter(**mine).delete()
                UsageMonth.objects.filter(**mine).delete()
            else:
                UsageHour.objects.filter(hour__gte=final, **mine).delete()
                UsageDay.objects.filter(day__gte=final.date(), **mine).delete()
                UsageMonth.objects.filter(month__gte=month_start(final.date()), **mine).delete()
            hi = floor_hour(last) + HOUR if last is not None else None
            if final is not None and (hi is None or hi <= final):
                # no sample after the prune's mark: the day and month rows it straddles again
                _roll_days(instance, final.date(), final.date())
            elif first is not None and hi is not None:
                rebuild(instance, floor_hour(first), hi)  # which starts no earlier than the mark
        written += UsageHour.objects.filter(instance=instance, subject=INSTANCE_SUBJECT).count()
    return written


def record_report(report: NodeReport, received: dt.datetime) -> int:
    """One sample per instance the portal places on the reporting node; returns how many were new.

    An instance the node lists is sampled with its power state and counters;
    one it does not list (while its driver works) is sampled as not running;
    one whose driver is down is not sampled at all: that time becomes a gap.
    Beats that arrive late (a control worker restart, a broker backlog) are
    still samples of their own time.

    A constant number of queries per beat, whatever the node holds (``bench/scale.py``: one
    query set per instance per beat was the control plane's limit): the beat's samples are
    inserted together, and where a sample is its instance's newest (the normal case) the one
    new interval, from the previous sample to it, is *added* to the hour rows, and to the day
    and month rows only where :func:`roll` has passed its hour (the roll sums the others later).
    The rules are per interval (``intervals.hourly`` sums its intervals' pieces), so the rows
    are what a rebuild from the raw samples gives, to the millisecond.  A sample that is not
    the newest (a late beat, a duplicate) or an instance with a delete sample goes the
    rebuilding way, :func:`add_sample`.
    """
    at = sample_time(report.sent_at, received)
    if too_old(at, received):
        log.warning(
            "refusing the samples of a beat of %s taken at %s: older than the samples kept", report.node, at
        )
        return 0
    period = beat_period()  # 0: every beat is sampled, late ones too; nothing to decide or keep
    digest, last = (_beat_digest(report), _last_sampled(report.node)) if period else ("", None)
    if period and not beat_due(report.node, at, digest, last, period):
        return 0
    seen = {item.instance_id: item for item in report.inventory}
    blind = {d.kind for d in report.drivers if not d.ok}
    new = _record_beat(report, at, received, seen, blind)
    # a late beat sampled for its running set does not move the node's minute back
    if period and (last is None or last[0] <= at.timestamp()):
        _keep_sampled(report.node, at, digest)
    return new


def _record_beat(
    report: NodeReport,
    at: dt.datetime,
    received: dt.datetime,
    seen: dict[str, InventoryItem],
    blind: set[Kind],
) -> int:
    with transaction.atomic():
        live = list(
            Instance.objects.live()
            .filter(node__name=report.node, created_at__lte=at)
            .exclude(kind__in=blind)
            .order_by("pk")
            .only("id", "tenant_id", "kind", "vcpus", "ram_mb", "disk_gb")  # a beat reads no more
            .annotate(
                last_at=Subquery(
                    UsageSample.objects.filter(instance=OuterRef("pk")).order_by("-at").values("at")[:1]
                ),
                ended=Exists(UsageSample.objects.filter(instance=OuterRef("pk"), deleted=True)),
            )
        )
        if not live:
            return 0
        serialise(inst.pk for inst in live)  # all at once, in key order: no row lock on the instances

        def reading(inst: Instance) -> dict[str, Any]:
            item = seen.get(str(inst.pk))
            return {
                "running": item is not None and item.power_state == PowerState.RUNNING,
                "memory_bytes": item.memory_bytes if item else 0,
                "cpu_time_ns": item.cpu_time_ns if item else 0,
            }

        # The annotations were read before the locks: a beat that got in meanwhile is seen by
        # the insert (unique key) and sends this one the rebuilding way.
        last = {i.pk: getattr(i, "last_at", None) for i in live}

        def is_newest(i: Instance) -> bool:
            before = last[i.pk]
            return not getattr(i, "ended", True) and (before is None or before < at)

        newest: list[Instance] = []
        others: list[Instance] = []
        for inst in live:
            (newest if is_newest(inst) else others).append(inst)
        try:
            with transaction.atomic():
                _append(newest, last, at, received, report.node, reading)
        except IntegrityError:
            others, newest = live, []
        new = len(newest)
        for inst in others:
            new += add_sample(inst, at, received, SampleSource.HEARTBEAT, report.node, **reading(inst))
    return new


def _append(
    instances: list[Instance],
    last: dict[Any, dt.datetime | None],
    at: dt.datetime,
    received: dt.datetime,
    node: str,
    reading: Callable[[Instance], dict[str, Any]],
) -> None:
    """Insert a sample at ``at`` for each of ``instances`` (newer than its ``last``) and add its interval."""
    if not instances:
        return
    samples = [_sample(i, at, received, SampleSource.HEARTBEAT, node, **reading(i)) for i in instances]
    fields = [f.name for f in dataclasses.fields(Point) if f.name != "at"]  # Point's own order
    previous: dict[tuple[Any, dt.datetime | None], Point] = {
        (instance_id, at_): Point(at_, *rest)
        for instance_id, at_, *rest in UsageSample.objects.filter(
            instance__in=[i for i in instances if last[i.pk] is not None],
            at__in={last[i.pk] for i in instances if last[i.pk] is not None},
        ).values_list("instance_id", "at", *fields)
    }
    UsageSample.objects.bulk_create(samples)
    hours: dict[tuple[Any, dt.datetime], Quantities] = {}
    for sample, inst in zip(samples, instances, strict=True):
        prev = previous.get((inst.pk, last[inst.pk]))
        if prev is None:
            continue  # its first sample: no interval yet
        for hour, q in hourly([prev, _point(sample)], gap_ms()).items():
            hours[(inst.pk, hour)] = q
    by_pk = {inst.pk: inst for inst in instances}
    days: dict[tuple[Any, dt.date], Quantities] = defaultdict(Quantities)
    months: dict[tuple[Any, dt.date], Quantities] = defaultdict(Quantities)
    mark = RollupMark.objects.filter(pk=1).first()  # under serialise()'s lock: no slice rolls meanwhile
    for (pk, hour), q in hours.items():
        rolled = mark.rolled_for(pk) if mark is not None else None
        if rolled is not None and hour < rolled:  # a late beat: the roll has passed its hour
            days[(pk, hour.date())].add(q)
            months[(pk, month_start(hour.date()))].add(q)
    _accumulate(UsageHour, "hour", hours, by_pk)
    _accumulate(UsageDay, "day", days, by_pk)
    _accumulate(UsageMonth, "month", months, by_pk)


def _accumulate(
    model: Any,
    period: str,
    deltas: dict[tuple[Any, Any], Quantities],
    instances: dict[Any, Instance],
) -> None:
    """Add ``deltas`` ((instance pk, period) -> quantities) to the instances' own rows of ``model``.

    Existing rows get ``field = field + delta`` in one statement per 90 rows (``WITH v(...) AS
    (VALUES ...) UPDATE ... FROM v``, SQLite and PostgreSQL alike): Django's ``bulk_update``
    builds a CASE expression per row and field, which cost ~100 ms of CPU for the 40 rows of a
    beat, more than everything else in the beat together."""
    if not deltas:
        return
    found = model.objects.filter(
        subject=INSTANCE_SUBJECT,
        instance__in=[instances[pk] for pk in {pk for pk, _ in deltas}],
        **{f"{period}__in": {key for _, key in deltas}},
    ).values_list("id", "instance_id", period)
    existing = {(instance_id, key): row_id for row_id, instance_id, key in found}
    updates: list[list[int]] = []
    created: list[Any] = []
    for (pk, key), q in deltas.items():
        row_id = existing.get((pk, key))
        if row_id is not None:
            updates.append([row_id, *(getattr(q, f) for f in QUANTITIES)])
            continue
        inst = instances[pk]
        created.append(
            model(
                instance=inst,
                subject=INSTANCE_SUBJECT,
                tenant_id=inst.tenant_id,
                kind=inst.kind,
                **{period: key},
                **q.as_dict(),
            )
        )
    table = connection.ops.quote_name(model._meta.db_table)
    columns = ", ".join(QUANTITIES)
    assign = ", ".join(f"{f} = {table}.{f} + v.{f}" for f in QUANTITIES)
    row = "(" + ", ".join(["CAST(%s AS BIGINT)"] * (len(QUANTITIES) + 1)) + ")"
    with connection.cursor() as cursor:
        for i in range(0, len(updates), 90):
            chunk = updates[i : i + 90]
            cursor.execute(  # names from the model, values as parameters
                f"WITH v(id, {columns}) AS (VALUES {', '.join([row] * len(chunk))}) "  # noqa: S608
                f"UPDATE {table} SET {assign} FROM v WHERE {table}.id = v.id",
                [value for r in chunk for value in r],
            )
    if created:
        model.objects.bulk_create(created)


def record_observation(instance: Instance, obs: Observation, received: dt.datetime) -> bool:
    """A sample at the instant an applied observation says the workload changed state."""
    if not obs.ok:
        return False
    deleted = obs.action == "delete"
    return add_sample(
        instance,
        sample_time(obs.observed_at, received),
        received,
        SampleSource.OBSERVATION,
        obs.node,
        running=obs.power_state == PowerState.RUNNING and not deleted,
        deleted=deleted,
    )


def totals(rows: Iterable[dict[str, Any]]) -> Quantities:
    out = Quantities()
    for row in rows:
        out.add(Quantities(**{k: row[k] or 0 for k in QUANTITIES}))
    return out


def sum_fields() -> dict[str, Sum]:
    return {k: Sum(k) for k in QUANTITIES}
