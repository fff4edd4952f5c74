"""Prices applied to quantities: costs, a month so far and its linear forecast.

Why Decimal from integers: quantities are exact integer milliseconds, prices
are Decimals the operator typed; an amount is their product divided by the
unit's length, computed in ``Decimal`` and rounded to cents only when shown
(``cents``).  A price sheet applies to the UTC days from its
``effective_from`` to the next sheet's; a day is never split between sheets.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable
from decimal import ROUND_HALF_UP, Decimal

from portal.metering.intervals import Quantities
from portal.metering.models import MemoryBasis, PriceSheet

HOUR_MS = Decimal(3_600_000)
#: a billing month is 730 hours (365 x 24 / 12), as the public clouds count GB-months
MONTH_MS = Decimal(730) * HOUR_MS
GIB_MIB = Decimal(1024)
CENT = Decimal("0.01")
ZERO = Decimal(0)


def cents(amount: Decimal) -> Decimal:
    return amount.quantize(CENT, rounding=ROUND_HALF_UP)


@dataclasses.dataclass
class Cost:
    """Amounts per priced item (unrounded Decimals)."""

    memory: Decimal = ZERO
    vcpu: Decimal = ZERO
    disk: Decimal = ZERO
    addresses: Decimal = ZERO

    @property
    def total(self) -> Decimal:
        return self.memory + self.vcpu + self.disk + self.addresses

    def add(self, other: Cost) -> None:
        self.memory += other.memory
        self.vcpu += other.vcpu
        self.disk += other.disk
        self.addresses += other.addresses


def price(q: Quantities, sheet: PriceSheet | None) -> Cost:
    """What ``q`` costs at ``sheet``'s prices (nothing without a sheet)."""
    if sheet is None:
        return Cost()
    mib_ms = q.memory_mib_ms if sheet.memory_basis == MemoryBasis.ACTUAL else q.ram_mib_ms
    return Cost(
        memory=Decimal(mib_ms) * sheet.memory_gib_hour / (GIB_MIB * HOUR_MS),
        vcpu=Decimal(q.vcpu_ms) * sheet.vcpu_hour / HOUR_MS,
        disk=Decimal(q.disk_gb_ms) * sheet.disk_gb_month / MONTH_MS,
        addresses=Decimal(q.address_ms) * sheet.address_month / MONTH_MS,
    )


class Sheets:
    """The price sheets, read once, answering "which sheet applies on this day"."""

    def __init__(self, sheets: Iterable[PriceSheet] | None = None) -> None:
        rows = list(PriceSheet.objects.all() if sheets is None else sheets)
        self.sheets = sorted(rows, key=lambda s: s.effective_from)

    def on(self, day: dt.date) -> PriceSheet | None:
        found = None
        for sheet in self.sheets:
            if sheet.effective_from <= day:
                found = sheet
        return found

    @property
    def currency(self) -> str:
        return self.sheets[-1].currency if self.sheets else "EUR"

    def periods(self, first: dt.date, last: dt.date) -> list[tuple[dt.date, dt.date, PriceSheet | None]]:
        """``(from, to inclusive, sheet)`` covering ``first..last``, one per sheet in force."""
        bounds = [s.effective_from for s in self.sheets if first < s.effective_from <= last]
        starts = [first, *bounds]
        ends = [b - dt.timedelta(days=1) for b in bounds] + [last]
        return [(a, b, self.on(a)) for a, b in zip(starts, ends, strict=True)]


def month_bounds(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    start = dt.datetime(day.year, day.month, 1, tzinfo=dt.UTC)
    nxt = dt.datetime(day.year + day.month // 12, day.month % 12 + 1, 1, tzinfo=dt.UTC)
    return start, nxt


def forecast(so_far: Decimal, now: dt.datetime) -> Decimal:
    """The month's cost if it goes on as it went so far (linear in elapsed time)."""
    start, end = month_bounds(now.date())
    elapsed = Decimal((now - start).total_seconds())
    if elapsed <= 0:
        return so_far
    return so_far * Decimal((end - start).total_seconds()) / elapsed
