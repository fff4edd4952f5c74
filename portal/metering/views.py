"""Usage pages: the tenant's usage this month, a printable monthly statement, the operators' overview.

Why the statement is addressed by tenant slug: it is a document to print and
send; another tenant's slug (or one that does not exist) is a 404 for
anyone who is not a member, the same answer as the API's.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from django import forms
from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse
from django.utils import timezone

from portal.audit.record import describe, note_error
from portal.metering import chart, rating, reports
from portal.metering.models import Budget, PriceSheet
from portal.tenancy.models import Tenant
from portal.web.access import actor, login_page, operator_page, page, tenant_page
from portal.web.forms import NoSuffix


class PriceSheetForm(NoSuffix, forms.ModelForm):  # type: ignore[type-arg]
    class Meta:
        model = PriceSheet
        fields = [
            "effective_from",
            "currency",
            "memory_gib_hour",
            "memory_basis",
            "vcpu_hour",
            "disk_gb_month",
            "address_month",
            "note",
        ]
        labels = {
            "memory_gib_hour": "Memory, per GiB-hour",
            "vcpu_hour": "vCPU, per vCPU-hour",
            "disk_gb_month": "Disk, per GB-month (730 h)",
            "address_month": "Published port (address:port), per month (730 h)",
        }
        widgets = {"effective_from": forms.DateInput(attrs={"type": "date"})}

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        for name in ("memory_gib_hour", "vcpu_hour", "disk_gb_month", "address_month"):
            value = data.get(name)
            if value is not None and value < 0:
                self.add_error(name, "A price cannot be negative.")
        return data


def _months_back(now: dt.datetime, n: int) -> list[dt.date]:
    first = now.date().replace(day=1)
    out = []
    for _ in range(n):
        out.append(first)
        first = (first - dt.timedelta(days=1)).replace(day=1)
    return out


@tenant_page
def usage(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    now = timezone.now()
    start, _ = rating.month_bounds(now.date())
    month = chart.month(tenant.pk, now)
    report = reports.build(tenant.pk, start, now, "instance")
    budget = Budget.objects.filter(tenant=tenant).first()
    return page(
        request,
        "web/usage.html",
        {
            "chart": month,
            "report": report,
            "lines": [line.as_dict() for line in report.lines],
            "budget": budget,
            "months": _months_back(now, 6),
            "tenant": tenant,
        },
    )


@login_page
def statement(request: HttpRequest, slug: str, year: int, month: int) -> HttpResponse:
    tenant = Tenant.objects.restrict(actor(request)).filter(slug=slug).first()
    if tenant is None or not 1 <= month <= 12 or not 2000 <= year <= 9999:
        raise Http404("No such statement.")
    start = dt.datetime(year, month, 1, tzinfo=dt.UTC)
    _, end = rating.month_bounds(start.date())
    until = min(end, max(timezone.now(), start + dt.timedelta(hours=1)))
    by_instance = reports.build(tenant.pk, start, until, "instance")
    by_day = reports.build(tenant.pk, start, until, "day")
    return page(
        request,
        "web/statement.html",
        {
            "tenant": tenant,
            "start": start,
            "end": end,
            "complete": until >= end,
            "report": by_instance,
            "lines": [line.as_dict() for line in by_instance.lines],
            "days": [line.as_dict() for line in by_day.lines],
            "total": by_instance.total.as_dict(),
            "sheets": rating.Sheets().periods(start.date(), (end - dt.timedelta(days=1)).date()),
        },
    )


@operator_page
def ops_usage(request: HttpRequest) -> HttpResponse:
    form = PriceSheetForm(request.POST or None)
    status = 200
    if request.method == "POST":
        if form.is_valid():
            sheet = form.save(commit=False)
            sheet.created_by = request.user
            sheet.save()
            describe(request, "pricesheet.create", sheet, tenant_id=None)
            messages.success(request, f"Prices from {sheet.effective_from} saved.")
            return HttpResponseRedirect(reverse("web:ops-usage"), status=303)
        describe(request, "pricesheet.create", None, tenant_id=None)
        note_error(request, "the price form has errors")
        status = 400
    now = timezone.now()
    start, _ = rating.month_bounds(now.date())
    budgets = dict(Budget.objects.values_list("tenant_id", "monthly_amount"))
    costs = {int(line.key): line.cost.total for line in reports.build(None, start, now, "tenant").lines}
    tenants = {t.pk: t for t in Tenant.objects.filter(pk__in=[*costs, *budgets])}
    table = []
    for tenant_id in sorted(tenants, key=lambda pk: tenants[pk].slug):
        so_far = costs.get(tenant_id, rating.ZERO)
        budget = budgets.get(tenant_id)
        table.append(
            {
                "tenant": tenants[tenant_id],
                "so_far": rating.cents(so_far),
                "forecast": rating.cents(rating.forecast(so_far, now)),
                "budget": budget,
                "percent": int(so_far * 100 / budget) if budget else None,
            }
        )
    return page(
        request,
        "web/ops/usage.html",
        {"table": table, "sheets": PriceSheet.objects.all()[:20], "form": form, "month": start},
        status=status,
    )
