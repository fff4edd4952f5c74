"""Usage metering: raw samples, hourly, daily and monthly rollups, the price sheet and budgets.

Why three levels: a :class:`UsageSample` is what a node said (or what an
observation settled) at one instant and is the only source of truth; the
:class:`UsageHour` rows are derived from the samples (and can be rebuilt from
them at any time, ``manage.py recompute_usage``); the :class:`UsageDay` rows
are derived from the hours so a year of a large tenant is read from 365 rows
per instance instead of 8,760, and the :class:`UsageMonth` rows from the days
(12 rows per instance and year).  Quantities are integers in milliseconds
(``ram_mib_ms`` = MiB allocated x milliseconds running), so sums are exact on
every database; money is only ever computed from them in ``Decimal``.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import Q

from portal.tenancy.models import Tenant
from portal.tenancy.querysets import TenantScopedQuerySet

#: the quantity fields an hour and a day row share, in the order reports show them
QUANTITIES = (
    "covered_ms",
    "running_ms",
    "vcpu_ms",
    "ram_mib_ms",
    "memory_mib_ms",
    "disk_gb_ms",
    "address_ms",
    "cpu_ms",
    "gap_ms",
)


class UsageKind(models.TextChoices):
    """What a usage row is of: an instance's own usage (and its published ports) or a volume."""

    VM = "vm", "Virtual machine"
    CONTAINER = "container", "Container"
    VOLUME = "volume", "Volume"


#: ``subject`` of an instance's own rows (its samples); resources have ``volume:<uuid>``/``port:<id>``
INSTANCE_SUBJECT = ""


class SampleSource(models.TextChoices):
    HEARTBEAT = "heartbeat", "Heartbeat"
    OBSERVATION = "observation", "Observation"


class UsageSample(models.Model):
    """What was true of one instance at one instant: the raw input of all metering.

    ``at`` is the node's time clamped to the portal's receive time (a node
    cannot report the future), truncated to milliseconds; it is the
    idempotency key with the instance, so a redelivered heartbeat or
    observation adds nothing.  Allocations come from the instance row,
    ``memory_bytes`` and ``cpu_time_ns`` from the node (0: not read).
    ``deleted`` marks the end: nothing after it is billed.
    """

    instance = models.ForeignKey("cloud.Instance", on_delete=models.CASCADE, related_name="usage_samples")
    at = models.DateTimeField()
    received_at = models.DateTimeField()
    source = models.CharField(max_length=16, choices=SampleSource.choices)
    node = models.CharField(max_length=63)
    running = models.BooleanField()
    deleted = models.BooleanField(default=False)
    vcpus = models.PositiveIntegerField()
    ram_mb = models.PositiveIntegerField()
    disk_gb = models.PositiveIntegerField()
    memory_bytes = models.BigIntegerField(default=0)
    cpu_time_ns = models.BigIntegerField(default=0)

    class Meta:
        ordering = ["instance", "at"]
        constraints = [models.UniqueConstraint(fields=["instance", "at"], name="usage_sample_once")]
        indexes = [
            # Every heartbeat asks, for each instance on the node, whether it has a delete sample.
            # Without this the answer scanned all of the instance's samples (720 an hour at 5 s
            # beats): 25 ms per instance at 100,000 samples on PostgreSQL, growing for ever.
            models.Index(fields=["instance"], condition=models.Q(deleted=True), name="usage_sample_deleted"),
            # The prune (portal.metering.sampling.prune) reads the oldest samples, a batch at a time.
            models.Index(fields=["at"], name="usage_sample_at"),
        ]

    def __str__(self) -> str:
        return f"{self.instance_id}@{self.at:%Y-%m-%d %H:%M:%S.%f}"


class ResourceEvent(models.Model):
    """A portal-owned resource began, changed size or ended: the raw input of volume and port metering.

    ``subject`` names the resource (``volume:<uuid>``, ``port:<id>``);
    ``amount`` is what it holds from ``at`` until its next event: GB of a
    volume, 1 for a published port, 0 once it is gone.  The portal itself
    decides these facts (the node's observation settling a volume, a port
    published or unpublished), so no node sample is needed; ``at`` is the
    portal's clock when it applied the change, in whole milliseconds.
    ``(subject, at)`` is unique: a change recorded twice adds nothing.
    """

    subject = models.CharField(max_length=48)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    instance = models.ForeignKey(
        "cloud.Instance", null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    kind = models.CharField(max_length=16, choices=UsageKind.choices)
    at = models.DateTimeField()
    amount = models.PositiveIntegerField(help_text="GB of a volume, 1 for a published port; 0: gone")
    recorded_at = models.DateTimeField()

    class Meta:
        ordering = ["subject", "at"]
        constraints = [models.UniqueConstraint(fields=["subject", "at"], name="resource_event_once")]

    def __str__(self) -> str:
        return f"{self.subject}={self.amount}@{self.at:%Y-%m-%d %H:%M:%S.%f}"


class UsageQuerySet(TenantScopedQuerySet["UsageHour"]):
    pass


class _Rollup(models.Model):
    """Quantities of one subject over one period; every field is derived from samples or resource events.

    An instance's own row (``subject`` "") comes from its samples; a
    published port's row (``port:<id>``) carries the port's instance and
    kind, so it adds to the instance's line; a volume's row
    (``volume:<uuid>``, kind ``volume``) has no instance: a volume belongs to
    the tenant and outlives the instances it is attached to.
    """

    instance = models.ForeignKey(
        "cloud.Instance", null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    subject = models.CharField(
        max_length=48,
        blank=True,
        default=INSTANCE_SUBJECT,
        db_default=INSTANCE_SUBJECT,
        help_text="'' for the instance's own usage, else the resource: volume:<uuid> or port:<id>",
    )
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    kind = models.CharField(max_length=16, choices=UsageKind.choices)
    covered_ms = models.BigIntegerField(default=0, help_text="time between samples closer than the gap")
    running_ms = models.BigIntegerField(default=0)
    vcpu_ms = models.BigIntegerField(default=0, help_text="vCPUs allocated x ms running")
    ram_mib_ms = models.BigIntegerField(default=0, help_text="MiB allocated x ms running")
    memory_mib_ms = models.BigIntegerField(default=0, help_text="MiB actually used x ms running")
    disk_gb_ms = models.BigIntegerField(default=0, help_text="GB allocated x ms covered (until delete)")
    address_ms = models.BigIntegerField(default=0, help_text="published ports x ms published")
    cpu_ms = models.BigIntegerField(default=0, help_text="CPU time the node accounted")
    gap_ms = models.BigIntegerField(default=0, help_text="time between samples farther apart than the gap")

    objects = UsageQuerySet.as_manager()

    class Meta:
        abstract = True


class UsageHour(_Rollup):
    """One subject's usage within one UTC hour."""

    hour = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["instance", "hour"], condition=Q(subject=INSTANCE_SUBJECT), name="usage_hour_once"
            ),
            models.UniqueConstraint(
                fields=["subject", "hour"],
                condition=~Q(subject=INSTANCE_SUBJECT),
                name="usage_hour_subject_once",
            ),
        ]
        indexes = [
            models.Index(fields=["tenant", "hour"], name="usage_hour_tenant"),
            # a volume's rows (no instance): the per-instance report reads them apart, by volume
            models.Index(fields=["tenant", "hour"], condition=Q(instance=None), name="usage_hour_volume"),
            # the roll's question, which instances have hours in the hours that closed: without it
            # a scan of every hour row ever written (bench/roll_history.py)
            models.Index(
                fields=["hour", "instance"], condition=Q(subject=INSTANCE_SUBJECT), name="usage_hour_roll"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.instance_id} {self.hour:%Y-%m-%d %H}h"


class UsageDay(_Rollup):
    """One subject's usage within one UTC day: the sum of its hours."""

    day = models.DateField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["instance", "day"], condition=Q(subject=INSTANCE_SUBJECT), name="usage_day_once"
            ),
            models.UniqueConstraint(
                fields=["subject", "day"],
                condition=~Q(subject=INSTANCE_SUBJECT),
                name="usage_day_subject_once",
            ),
        ]
        indexes = [
            models.Index(fields=["tenant", "day"], name="usage_day_tenant"),
            models.Index(fields=["tenant", "day"], condition=Q(instance=None), name="usage_day_volume"),
        ]

    def __str__(self) -> str:
        return f"{self.instance_id} {self.day}"


class UsageMonth(_Rollup):
    """One subject's usage within one UTC month (``month``: its first day): the sum of its days.

    Why: a year's report of a large tenant reads 12 rows per instance instead of 365.
    """

    month = models.DateField(help_text="the first day of the UTC month")

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["instance", "month"], condition=Q(subject=INSTANCE_SUBJECT), name="usage_month_once"
            ),
            models.UniqueConstraint(
                fields=["subject", "month"],
                condition=~Q(subject=INSTANCE_SUBJECT),
                name="usage_month_subject_once",
            ),
        ]
        indexes = [
            models.Index(fields=["tenant", "month"], name="usage_month_tenant"),
            models.Index(fields=["tenant", "month"], condition=Q(instance=None), name="usage_month_volume"),
        ]

    def __str__(self) -> str:
        return f"{self.instance_id} {self.month:%Y-%m}"


class RollupMark(models.Model):
    """How far the instances' day and month rows are rolled from their hours (one row, ``pk`` 1).

    Why: a heartbeat adds its interval to the instance's hour row only; adding it
    to the day and month rows as well tripled the rows a beat writes
    (``bench/scale.py``).  The day and month rows of the days and months wholly
    before ``until`` are exact; :func:`portal.metering.sampling.roll` moves
    ``until`` to the last whole hour, recomputing the day and month rows it
    passes from their hours, and reports read the time from ``until`` on from
    hour rows.  A late sample of an hour before ``until`` still updates its day
    and month rows.  Null: nothing is rolled, reports read only hour rows.

    ``rolling_to`` and ``rolled_through``: a roll under way, in slices of instances by id, each
    slice its own short transaction (a roll of every instance at once held the beats for seconds,
    ``bench/roll_history.py``).  The instances whose id is at most ``rolled_through`` have their
    day and month rows summed up to ``rolling_to``; a late beat of theirs adds to those rows for
    the hours before ``rolling_to``, the others' for the hours before ``until``.  ``until`` moves
    to ``rolling_to`` with the last slice.  Null: no roll is under way.

    ``pruned_until``: the raw samples before it are gone but each instance's newest
    (:func:`portal.metering.sampling.prune`), so the hour, day and month rows before it are
    final: no rebuild or recompute starts earlier.  Null: no sample was ever pruned.
    """

    until = models.DateTimeField(null=True, blank=True)
    rolling_to = models.DateTimeField(null=True, blank=True)
    rolled_through = models.UUIDField(null=True, blank=True)
    pruned_until = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"rolled until {self.until}"

    def rolled_for(self, instance_id: Any) -> dt.datetime | None:
        """How far ``instance_id``'s day and month rows are summed from its hours."""
        through = self.rolled_through
        if self.rolling_to is not None and through is not None and instance_id <= through:
            return self.rolling_to
        return self.until


class MemoryBasis(models.TextChoices):
    ALLOCATED = "allocated", "Allocated memory"
    ACTUAL = "actual", "Memory actually used"


class PriceSheet(models.Model):
    """The operator's prices from ``effective_from`` (a UTC date) until the next sheet's."""

    effective_from = models.DateField(unique=True)
    currency = models.CharField(max_length=3, default="EUR")
    memory_gib_hour = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal(0))
    memory_basis = models.CharField(max_length=16, choices=MemoryBasis.choices, default=MemoryBasis.ALLOCATED)
    vcpu_hour = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal(0))
    disk_gb_month = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal(0))
    address_month = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal(0))
    note = models.CharField(max_length=255, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-effective_from"]
        constraints = [
            models.CheckConstraint(
                condition=Q(memory_gib_hour__gte=0)
                & Q(vcpu_hour__gte=0)
                & Q(disk_gb_month__gte=0)
                & Q(address_month__gte=0),
                name="price_not_negative",
            )
        ]

    def __str__(self) -> str:
        return f"prices from {self.effective_from}"


class BudgetQuerySet(TenantScopedQuerySet["Budget"]):
    pass


class Budget(models.Model):
    """A tenant's monthly budget; ``warned_*`` keeps which warning was already given this month."""

    tenant = models.OneToOneField(Tenant, on_delete=models.CASCADE, related_name="budget")
    monthly_amount = models.DecimalField(max_digits=14, decimal_places=2)
    warned_month = models.DateField(null=True, blank=True)
    warned_percent = models.PositiveSmallIntegerField(default=0)

    objects = BudgetQuerySet.as_manager()

    class Meta:
        constraints = [models.CheckConstraint(condition=Q(monthly_amount__gt=0), name="budget_positive")]

    def __str__(self) -> str:
        return f"budget of {self.tenant_id}: {self.monthly_amount}"


def hour_floor(at: dt.datetime) -> dt.datetime:
    return at.replace(minute=0, second=0, microsecond=0)
