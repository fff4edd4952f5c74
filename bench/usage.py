"""Usage API over a year: p50/p95 for a tenant with 1,000 instances among 10,000, against the bare SQL.

    .venv/bin/python bench/usage.py [--instances 10000] [--tenant-instances 1000] [--days 365]
                                    [--hour-days 1] [--requests 20] [--volumes 0]

A scratch SQLite database (WAL) holds ``--instances`` instances in ten
tenants, one of them ("big") with ``--tenant-instances``; every instance
has a day-rollup row for each of the last ``--days`` days, a month-rollup row
for each month of them (the sum of its days), and hour rows for
the last ``--hour-days`` days (today's hours are what a report up to now
reads besides the days); ``--volumes`` adds that many volumes to "big"
(a day row each, without instance: the per-instance report reads them
apart).  Rows are written with ``bulk_create``.  Then
``GET /api/v1/usage/?tenant=big&from=<a year ago>&to=<now>&group_by=...``
runs through the whole Django stack in this process (session auth, scoping,
the report, JSON) ``--requests`` times per grouping; the bare baseline is the
single aggregate SQL statement over the day rows that the report's main
query amounts to, run on the same connection.

The full hour table of a year (8,760 rows per instance, 87.6 M rows for
10,000 instances) is not seeded: a report never reads hour rows of whole
days, so only their index depth would change (log of the row count).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import secrets
import shutil
import statistics
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BASE = Path("/tmp") / f"skyport-bench-usage-{secrets.token_hex(4)}"
os.environ.update(
    DJANGO_SETTINGS_MODULE="portal.settings",
    SKYPORT_VAR_DIR=str(BASE / "var"),
    SKYPORT_SECRET_KEY=secrets.token_urlsafe(50),
    SKYPORT_ALLOWED_HOSTS="testserver",
    # never used (the bench sends no task), but the settings accept only a real broker scheme
    CELERY_BROKER_URL="redis://127.0.0.1:6379/13",
)
os.environ.pop("DATABASE_URL", None)

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection, transaction  # noqa: E402
from django.test import Client  # noqa: E402
from django.utils import timezone  # noqa: E402

from portal.cloud import networks  # noqa: E402
from portal.cloud.models import Flavor, Instance  # noqa: E402
from portal.metering.models import PriceSheet, UsageDay, UsageHour, UsageMonth  # noqa: E402
from portal.tenancy.models import Membership, Tenant  # noqa: E402

H = 3_600_000
BATCH = 20_000


def _quantities(i: int, hours: int) -> dict[str, int]:
    running = hours * H if i % 4 else hours * H // 2  # a quarter of the instances run half the time
    return {
        "covered_ms": hours * H,
        "running_ms": running,
        "vcpu_ms": running * (1 + i % 4),
        "ram_mib_ms": running * 512 * (1 + i % 4),
        "memory_mib_ms": running * 300,
        "disk_gb_ms": hours * H * 10,
        "cpu_ms": running // 10,
    }


def populate(
    n: int, big: int, days: int, hour_days: int, volumes: int = 0
) -> tuple[dt.datetime, dt.datetime, float]:
    call_command("migrate", verbosity=0)
    with connection.cursor() as c:
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=OFF")  # a scratch database: seeding speed, not durability
    PriceSheet.objects.create(
        effective_from=dt.date(2000, 1, 1), memory_gib_hour="0.01", vcpu_hour="0.02", disk_gb_month="0.10"
    )
    flavor = Flavor.objects.create(name="m1.small", vcpus=1, ram_mb=512, disk_gb=10)
    tenants = [Tenant.objects.create(slug="big", name="Big")]
    tenants += [Tenant.objects.create(slug=f"t{k}", name=f"T{k}") for k in range(1, 10)]
    user = get_user_model().objects.create_user("bench", password=secrets.token_urlsafe(12))
    Membership.objects.create(user=user, tenant=tenants[0], role="viewer")
    owners = [tenants[0]] * big + [tenants[1 + k % 9] for k in range(n - big)]
    nets = {t.pk: networks.default_network(t) for t in tenants}
    Instance.objects.bulk_create(
        [
            Instance(
                id=uuid.uuid4(),
                tenant=t,
                name=f"i{k}",
                kind="vm" if k % 3 else "container",
                isolation_reason="bench",
                flavor=flavor,
                network=nets[t.pk],
                vcpus=1,
                ram_mb=512,
                disk_gb=10,
                vm_state="active",
            )
            for k, t in enumerate(owners)
        ],
        batch_size=2000,
    )
    rows = list(Instance.objects.values_list("pk", "tenant_id", "kind"))
    # volumes of the big tenant: rows without instance, a subject each, 20 GB all day
    subjects = [f"volume:{uuid.uuid4()}" for _ in range(volumes)]
    now = timezone.now()
    today = now.date()
    start = dt.datetime.combine(today - dt.timedelta(days=days), dt.time(), tzinfo=dt.UTC)
    began = time.perf_counter()
    day_rows = []
    for d in range(days):
        day = today - dt.timedelta(days=days - d)
        for i, (pk, tenant_id, kind) in enumerate(rows):
            day_rows.append(
                UsageDay(instance_id=pk, tenant_id=tenant_id, kind=kind, day=day, **_quantities(i, 24))
            )
            if len(day_rows) >= BATCH:
                with transaction.atomic():
                    UsageDay.objects.bulk_create(day_rows)
                day_rows = []
    volume_q = {"covered_ms": 24 * H, "disk_gb_ms": 24 * H * 20}
    for d in range(days):
        day = today - dt.timedelta(days=days - d)
        day_rows += [
            UsageDay(subject=s, tenant=tenants[0], kind="volume", day=day, **volume_q) for s in subjects
        ]
    with transaction.atomic():
        UsageDay.objects.bulk_create(day_rows, batch_size=BATCH)
    # the month rollup: each month's row is the sum of its seeded days (what sampling.roll_months writes)
    month_days: dict[dt.date, int] = {}
    for d in range(days):
        month = (today - dt.timedelta(days=days - d)).replace(day=1)
        month_days[month] = month_days.get(month, 0) + 1
    month_rows = [
        UsageMonth(instance_id=pk, tenant_id=tenant_id, kind=kind, month=m, **_quantities(i, 24 * n))
        for i, (pk, tenant_id, kind) in enumerate(rows)
        for m, n in month_days.items()
    ]
    month_rows += [
        UsageMonth(
            subject=s,
            tenant=tenants[0],
            kind="volume",
            month=m,
            covered_ms=24 * H * n,
            disk_gb_ms=24 * H * 20 * n,
        )
        for s in subjects
        for m, n in month_days.items()
    ]
    with transaction.atomic():
        UsageMonth.objects.bulk_create(month_rows, batch_size=BATCH)
    hour_rows = []
    first_hour = dt.datetime.combine(today - dt.timedelta(days=hour_days - 1), dt.time(), tzinfo=dt.UTC)
    hour = first_hour
    while hour < now:
        for i, (pk, tenant_id, kind) in enumerate(rows):
            hour_rows.append(
                UsageHour(instance_id=pk, tenant_id=tenant_id, kind=kind, hour=hour, **_quantities(i, 1))
            )
            if len(hour_rows) >= BATCH:
                with transaction.atomic():
                    UsageHour.objects.bulk_create(hour_rows)
                hour_rows = []
        hour += dt.timedelta(hours=1)
    with transaction.atomic():
        UsageHour.objects.bulk_create(hour_rows)
    with connection.cursor() as c:
        c.execute("ANALYZE")
    return start, now, time.perf_counter() - began


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=10_000)
    ap.add_argument("--tenant-instances", type=int, default=1_000)
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--hour-days", type=int, default=1)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--volumes", type=int, default=0, help="volumes of the big tenant (a day row each)")
    args = ap.parse_args()
    BASE.mkdir(parents=True, exist_ok=True)
    try:
        start, now, seed_s = populate(
            args.instances, args.tenant_instances, args.days, args.hour_days, args.volumes
        )
        days_n, hours_n = UsageDay.objects.count(), UsageHour.objects.count()
        months_n = UsageMonth.objects.count()
        db = Path(str(settings.DATABASES["default"]["NAME"]))
        size = db.stat().st_size / 2**30 if db.exists() else 0.0
        c = Client()
        c.force_login(get_user_model().objects.get(username="bench"))
        q = {"tenant": "big", "from": start.isoformat(), "to": now.isoformat()}
        results = []
        for group in ("instance", "kind", "day", "month"):
            times = []
            for _ in range(args.requests):
                t = time.perf_counter()
                r = c.get("/api/v1/usage/", q | {"group_by": group})
                times.append(time.perf_counter() - t)
                assert r.status_code == 200, r.content[:300]
            lines = len(r.json()["lines"])
            results.append((f"GET /api/v1/usage/ group_by={group}", lines, times))
        big_id = Tenant.objects.get(slug="big").pk
        sql = (
            "SELECT instance_id, SUM(running_ms), SUM(vcpu_ms), SUM(ram_mib_ms), SUM(disk_gb_ms) "
            "FROM metering_usageday WHERE tenant_id = %s AND day >= %s AND day < %s GROUP BY instance_id"
        )
        times = []
        for _ in range(args.requests):
            t = time.perf_counter()
            with connection.cursor() as cur:
                cur.execute(sql, [big_id, start.date().isoformat(), now.date().isoformat()])
                got = cur.fetchall()
            times.append(time.perf_counter() - t)
        results.append(("bare SQL: SUM over the tenant's day rows by instance", len(got), times))
        print(
            f"\nUsage API over {args.days} days: {args.instances} instances, {args.tenant_instances} in the "
            f"tenant; {months_n:,} month rows, {days_n:,} day rows, {hours_n:,} hour rows, "
            f"SQLite {size:.2f} GiB, "
            f"seeded in {seed_s:.0f} s; {args.requests} requests each"
        )
        print("| request | lines | p50 (ms) | p95 (ms) |")
        print("|---|---:|---:|---:|")
        for label, lines, ts in results:
            print(f"| {label} | {lines} | {statistics.median(ts) * 1000:.0f} | {pct(ts, 95) * 1000:.0f} |")
    finally:
        shutil.rmtree(BASE, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
