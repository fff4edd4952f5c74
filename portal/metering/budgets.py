"""Budget warnings: an audit Event when a tenant's month reaches 80 % and 100 % of its budget.

Why a periodic check and not one per sample: the cost of a month is a sum
over the day rollup, cheap once every few minutes and wasteful per
heartbeat.  Each threshold is announced once per month (``warned_percent``
is kept on the budget with its month, under a row lock, so two workers do
not both announce it).
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from django.db import transaction
from django.utils import timezone

from portal.audit.log import record
from portal.audit.models import Outcome
from portal.metering import rating, reports
from portal.metering.models import Budget

THRESHOLDS = (80, 100)


def check(now: dt.datetime | None = None) -> list[tuple[str, int]]:
    """Warn every tenant whose month crossed a threshold since the last check; returns the warnings."""
    now = now or timezone.now()
    month = now.date().replace(day=1)
    warned = []
    for budget_id in Budget.objects.values_list("pk", flat=True):
        with transaction.atomic():
            budget = Budget.objects.select_for_update().select_related("tenant").get(pk=budget_id)
            if budget.warned_month != month:
                budget.warned_month, budget.warned_percent = month, 0
            so_far, forecast, currency = reports.month_cost(budget.tenant_id, now)
            percent = so_far * 100 / budget.monthly_amount
            reached = max((t for t in THRESHOLDS if percent >= t), default=0)
            if reached > budget.warned_percent:
                budget.warned_percent = reached
                record(
                    f"budget.reached_{reached}",
                    budget.tenant,
                    tenant_id=budget.tenant_id,
                    actor_name="portal",
                    outcome=Outcome.FAILURE if reached >= 100 else Outcome.SUCCESS,
                    message=(
                        f"{budget.tenant.slug} used {rating.cents(so_far)} {currency} of its "
                        f"{budget.monthly_amount} {currency} budget for {month:%Y-%m} "
                        f"({percent.quantize(Decimal(1))} %); forecast {rating.cents(forecast)} {currency}"
                    ),
                )
                warned.append((budget.tenant.slug, reached))
            budget.save(update_fields=["warned_month", "warned_percent"])
    return warned
