"""Tenant pages that only read: dashboard, images, the audit log."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.core.paginator import Paginator
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone

from portal.audit.models import Event, Outcome
from portal.cloud import placement
from portal.cloud.choices import VmState
from portal.cloud.models import ComputeNode, Instance
from portal.images.models import Image
from portal.metering import chart
from portal.tenancy.choices import Role
from portal.tenancy.models import Quota, Tenant
from portal.web.access import actor, current_tenant, login_page, page, role_refusal, tenant_page
from portal.web.forms import EventFilterForm
from portal.web.presenters import image_delete_refusal, quota_bars

PAGE_SIZE = 50


@login_page
def dashboard(request: HttpRequest) -> HttpResponse:
    tenant = current_tenant(request)
    if tenant is None:
        if actor(request).is_operator:
            return redirect("web:ops-nodes")
        return page(request, "web/no_tenant.html", {})
    quota = Quota.objects.get(tenant=tenant)
    counts = dict(
        Instance.objects.filter(tenant=tenant).values_list("vm_state").annotate(n=Count("id")).order_by()
    )
    return page(
        request,
        "web/dashboard.html",
        {
            "bars": quota_bars(quota, placement.usage(tenant.pk)),
            "counts": [(s, counts.get(s, 0)) for s in VmState.values if s != VmState.DELETED],
            "busy": Instance.objects.filter(tenant=tenant, task_state__isnull=False).count(),
            "dedicated": ComputeNode.objects.filter(owner=tenant).values_list("name", flat=True),
            "events": Event.objects.restrict(actor(request)).filter(tenant=tenant)[:8],
            "can_launch": role_refusal(actor(request), tenant.pk, Role.MEMBER) is None,
            "chart": chart.month(tenant.pk, timezone.now()),
        },
    )


def _visible_images(request: HttpRequest, tenant: Tenant) -> QuerySet[Image]:
    return (
        Image.objects.restrict(actor(request))
        .filter(Q(owner__isnull=True) | Q(owner=tenant))
        .select_related("owner")
        .prefetch_related("artifacts")
    )


@tenant_page
def images(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    refusal = role_refusal(actor(request), tenant.pk, Role.MEMBER)
    return page(
        request, "web/images.html", {"images": _visible_images(request, tenant), "upload_refusal": refusal}
    )


@tenant_page
def image_detail(request: HttpRequest, tenant: Tenant, pk: int) -> HttpResponse:
    image = get_object_or_404(Image.objects.restrict(actor(request)).prefetch_related("artifacts"), pk=pk)
    refusal = image_delete_refusal(actor(request), image)
    return page(request, "web/image_detail.html", {"image": image, "delete_refusal": refusal})


def filter_events(qs: QuerySet[Event], form: EventFilterForm) -> QuerySet[Event]:
    """Apply the valid filters of ``form`` (invalid ones are shown as errors and ignored)."""
    form.is_valid()
    data = getattr(form, "cleaned_data", {})
    if data.get("action"):
        qs = qs.filter(action__startswith=data["action"])
    if data.get("outcome"):
        qs = qs.filter(outcome=data["outcome"])
    if data.get("q"):
        qs = qs.filter(Q(object_repr__icontains=data["q"]) | Q(message__icontains=data["q"]))
    if data.get("tenant"):
        qs = qs.filter(tenant=data["tenant"])
    return qs


def paginate(request: HttpRequest, qs: QuerySet[Event] | QuerySet[Instance]) -> object:
    """A page of ``qs``; a bad page number gives the nearest page, never an error."""
    return Paginator(qs, PAGE_SIZE).get_page(request.GET.get("page"))


def query_without_page(request: HttpRequest) -> str:
    params = request.GET.copy()
    params.pop("page", None)
    return params.urlencode()


@tenant_page
def events(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    form = EventFilterForm(request.GET)
    qs = Event.objects.restrict(actor(request)).filter(tenant=tenant).select_related("tenant")
    return page(
        request,
        "web/events.html",
        {
            "form": form,
            "page_obj": paginate(request, filter_events(qs, form)),
            "query": query_without_page(request),
        },
    )


#: how far back the task area looks for finished work
TASK_WINDOW = dt.timedelta(minutes=15)


def _tasks(request: HttpRequest, tenant: Tenant, limit: int) -> dict[str, Any]:
    """Work in flight and what nodes reported lately, for the task area (every page) and /tasks/."""
    who = actor(request)
    since = timezone.now() - TASK_WINDOW
    running = list(
        Instance.objects.restrict(who)
        .filter(tenant=tenant, task_state__isnull=False)
        .order_by("-updated_at")[:limit]
    )
    importing = list(
        Image.objects.restrict(who)
        .filter(owner=tenant, status__in=("queued", "importing"))
        .order_by("-pk")[:limit]
    )
    finished = list(
        Event.objects.restrict(who)
        .filter(tenant=tenant, created_at__gte=since, action__startswith="node.")
        .order_by("-created_at")[:limit]
    )
    return {
        "running": running,
        "importing": importing,
        "finished": finished,
        "active": len(running) + len(importing),
        "failures": sum(1 for e in finished if e.outcome != Outcome.SUCCESS),
        "window_minutes": int(TASK_WINDOW.total_seconds() // 60),
    }


@tenant_page
def tasks_panel(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    """The task area of every page (polled): running actions, imports, nodes' recent outcomes."""
    return render(request, "web/partials/tasks.html", _tasks(request, tenant, 5))


@tenant_page
def tasks(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    """The task log: the same, longer; without JavaScript the header links here."""
    return page(request, "web/tasks.html", _tasks(request, tenant, 50))
