"""A server-rendered bar chart of daily cost (SVG coordinates computed here, drawn by a template).

Why not a JavaScript chart: the portal has no front-end build; an SVG of
thirty rectangles is readable, printable and needs no script.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from decimal import Decimal

from portal.metering import rating, reports

WIDTH, HEIGHT, TOP = 620, 160, 10


@dataclasses.dataclass(frozen=True)
class Bar:
    day: dt.date
    cost: Decimal
    x: int
    y: int
    width: int
    height: int


@dataclasses.dataclass(frozen=True)
class MonthChart:
    bars: list[Bar]
    peak: Decimal
    so_far: Decimal
    forecast: Decimal
    currency: str
    width: int = WIDTH
    height: int = HEIGHT


def month(tenant_id: int, now: dt.datetime) -> MonthChart:
    """Cost per day of the current UTC month, the month so far and its linear forecast."""
    start, end = rating.month_bounds(now.date())
    report = reports.build(tenant_id, start, now, "day")
    costs = {line.key: line.cost.total for line in report.lines}
    days = (end - start).days
    slot = WIDTH // days
    peak = max(costs.values(), default=Decimal(0))
    bars = []
    for i in range(days):
        day = (start + dt.timedelta(days=i)).date()
        cost = costs.get(day.isoformat(), Decimal(0))
        h = int(cost / peak * (HEIGHT - TOP)) if peak else 0
        bars.append(Bar(day, rating.cents(cost), i * slot + 1, HEIGHT - h, slot - 2, h))
    so_far = report.total.cost.total
    return MonthChart(
        bars,
        rating.cents(peak),
        rating.cents(so_far),
        rating.cents(rating.forecast(so_far, now)),
        report.currency,
    )
