"""The operator console: nodes, tenants and quotas, all instances, drift, global events."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib import messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from portal.audit.models import Event
from portal.audit.record import describe, note_error
from portal.cloud import evacuation, metrics, placement, services, vm_migration
from portal.cloud.models import ComputeNode, Instance
from portal.tenancy.models import Quota, Tenant
from portal.web.access import Refusal, attempt, confirm, operator_page, page
from portal.web.forms import NodeTenancyForm, OpsEventFilterForm, OpsInstanceFilterForm, QuotaForm
from portal.web.presenters import node_loads, quota_bars
from portal.web.views.instances import filter_instances
from portal.web.views.tenant import filter_events, paginate, query_without_page


def _nodes_page(request: HttpRequest, error: str = "", status: int = 200) -> HttpResponse:
    nodes = list(ComputeNode.objects.select_related("owner").order_by("name"))
    return page(
        request,
        "web/ops/nodes.html",
        {
            "loads": node_loads(nodes),
            "tenants": Tenant.objects.filter(active=True).order_by("slug"),
            "now": timezone.now(),
            "error": error,
        },
        status=status,
    )


@operator_page
def nodes(request: HttpRequest) -> HttpResponse:
    return _nodes_page(request)


@operator_page
def node_detail(request: HttpRequest, name: str) -> HttpResponse:
    """One node: its instances, allocation (capacity x ratio), what its running workloads use
    according to the heartbeats (memory and CPU, summed), and its drain state with the instances
    still on it (a drain stops new placements; the instances stay until they are deleted)."""
    node = get_object_or_404(ComputeNode.objects.select_related("owner"), name=name)
    hosted = list(
        Instance.objects.live()
        .filter(node=node)
        .select_related("tenant", "flavor")
        .order_by("tenant__slug", "name")
    )
    memory = cpu = 0.0
    measured = 0
    for inst in hosted:
        points = metrics.samples(str(inst.pk))
        if points:
            measured += 1
            memory += points[-1]["memory_bytes"]
            cpu += points[-1]["cpu_percent"]
    return page(
        request,
        "web/ops/node.html",
        {
            "load": node_loads([node])[0],
            "host": metrics.host(node.name),
            "node": node,
            "instances": hosted,
            "measured": measured,
            "memory_used": memory,
            "ram_bytes": node.ram_mb * 2**20,
            "cpu_used": cpu,
            "cpu_capacity": node.vcpus * 100,
            "now": timezone.now(),
        },
    )


@require_POST
@operator_page
def node_tenancy(request: HttpRequest, name: str) -> HttpResponse:
    """Dedicate the node to a tenant or share it, through ``services.set_node_tenancy``."""
    node = get_object_or_404(ComputeNode, name=name)
    form = NodeTenancyForm(request.POST)
    if not form.is_valid():
        describe(request, "computenode.dedicate", node, tenant_id=None)
        note_error(request, "unknown tenant")
        return _nodes_page(request, "Choose an active tenant, or nobody to share the node.", 400)
    owner = form.cleaned_data["owner"]
    verb = f"dedicate to {owner.slug}" if owner else "share"
    describe(request, "computenode.dedicate" if owner else "computenode.share", node, message=verb)
    outcome = attempt(request, lambda: services.set_node_tenancy(node, owner))
    if isinstance(outcome, Refusal):
        return _nodes_page(request, outcome.message, outcome.status)
    messages.success(
        request, f"Node {node.name} is now " + (f"dedicated to {owner.slug}." if owner else "shared.")
    )
    return HttpResponseRedirect(reverse("web:ops-nodes"), status=303)


@operator_page
def node_drain(request: HttpRequest, name: str) -> HttpResponse:
    """GET: a confirmation page; POST: drain the node (no new instances), as ``manage.py node disable``."""
    node = get_object_or_404(ComputeNode, name=name)
    if request.method != "POST":
        hosted = Instance.objects.live().filter(node=node).count()
        return confirm(
            request,
            f"Drain node {node.name}?",
            f"The scheduler stops placing new instances on {node.name} until an operator enables it "
            f"again. Instances already there keep running ({hosted} now).",
            "Drain node",
            reverse("web:ops-nodes"),
        )
    if request.POST.get("enable") == "1":  # a nodes page from before enable had its own URL
        describe(request, "computenode.disable", node)
        note_error(request, "enable posted to drain")
        return _nodes_page(
            request, f"Nothing changed: reload the page and use Enable scheduling on {node.name}.", 400
        )
    return _set_enabled(request, node, enabled=False)


@require_POST
@operator_page
def node_enable(request: HttpRequest, name: str) -> HttpResponse:
    """Schedule onto a drained node again, as ``manage.py node enable`` (undoing a drain: no confirmation)."""
    return _set_enabled(request, get_object_or_404(ComputeNode, name=name), enabled=True)


def _set_enabled(request: HttpRequest, node: ComputeNode, enabled: bool) -> HttpResponse:
    describe(request, "computenode.enable" if enabled else "computenode.disable", node)
    services.set_node_enabled(node, enabled=enabled)
    messages.success(request, f"Node {node.name} is {node.status}: {node.status_reason}.")
    return HttpResponseRedirect(reverse("web:ops-nodes"), status=303)


@operator_page
def node_evacuate(request: HttpRequest, name: str) -> HttpResponse:
    """GET: a confirmation page; POST: rebuild the instances of a down node elsewhere (API: evacuate)."""
    node = get_object_or_404(ComputeNode, name=name)
    if request.method != "POST":
        hosted = Instance.objects.live().filter(node=node).count()
        return confirm(
            request,
            f"Evacuate node {node.name}?",
            f"Its {hosted} instance{'s' if hosted != 1 else ''} are rebuilt on other nodes, as the scheduler "
            f"places them (containers only on nodes dedicated to their tenant). "
            + evacuation.DATA_LOSS.format(node=node.name)
            + f" Only for a node that is lost: refused while {node.name} still sends heartbeats.",
            "Evacuate node",
            reverse("web:ops-node", args=[node.name]),
        )
    return _move_off(
        request,
        node,
        "computenode.evacuate",
        evacuation.evacuate,
        lambda move: f"{move.tenant}/{move.name}: {move.reason}" if move.result == "error" else None,
    )


@operator_page
def node_move(request: HttpRequest, name: str) -> HttpResponse:
    """GET: a confirmation page; POST: drain a live node and move its instances (API: drain)."""
    node = get_object_or_404(ComputeNode, name=name)
    if request.method != "POST":
        live = Instance.objects.live().filter(node=node)
        hosted, vms = live.filter(kind="container").count(), live.filter(kind="vm").count()
        return confirm(
            request,
            f"Move the instances off node {node.name}?",
            f"{node.name} is drained (no new instances). Each of its {hosted} container"
            f"{'s' if hosted != 1 else ''} is stopped there and started from its image on another node "
            f"dedicated to its tenant (its writable layer is not copied). Each of its {vms} VM"
            f"{'s' if vms != 1 else ''} is migrated cold: shut down cleanly (a guest that does not shut "
            f"down within {vm_migration.STOP_TIMEOUT:g} s stays, running), its disk copied to another "
            "node, started there again if it ran. A VM with volumes or snapshots stays on the node.",
            "Drain and move instances",
            reverse("web:ops-node", args=[node.name]),
        )
    return _move_off(
        request,
        node,
        "computenode.drain",
        evacuation.drain,
        lambda move: f"{move.tenant}/{move.name} stays: {move.reason}" if move.result == "stays" else None,
    )


def _move_off(
    request: HttpRequest,
    node: ComputeNode,
    action: str,
    run: Callable[[ComputeNode, Any], evacuation.Report],
    warning: Callable[[evacuation.Move], str | None],
) -> HttpResponse:
    """The POST of an evacuate or a drain: ``run(node, user)``, audited as ``action`` with its summary;
    a refusal on the nodes page, else the summary and a ``warning`` for each move that has one."""
    describe(request, action, node)
    outcome = attempt(request, lambda: run(node, request.user))
    if isinstance(outcome, Refusal):
        return _nodes_page(request, outcome.message, outcome.status)
    describe(request, action, node, message=outcome.summary())
    messages.success(request, f"{outcome.summary()}.")
    for move in outcome.moves:
        text = warning(move)
        if text:
            messages.warning(request, text)
    return HttpResponseRedirect(reverse("web:ops-node", args=[node.name]), status=303)


@operator_page
def tenants(request: HttpRequest) -> HttpResponse:
    rows = [
        (t, quota_bars(t.quota, placement.usage(t.pk)))
        for t in Tenant.objects.select_related("quota").order_by("slug")
    ]
    return page(request, "web/ops/tenants.html", {"rows": rows})


@operator_page
def tenant_quota(request: HttpRequest, slug: str) -> HttpResponse:
    tenant = get_object_or_404(Tenant, slug=slug)
    quota = get_object_or_404(Quota, tenant=tenant)
    form = QuotaForm(request.POST or None, instance=quota)
    status = 200
    if request.method == "POST":
        describe(request, "quota.update", quota, tenant_id=tenant.pk)
        if form.is_valid():
            form.save()
            messages.success(request, f"Quota of {tenant.slug} saved.")
            return HttpResponseRedirect(reverse("web:ops-tenants"), status=303)
        note_error(request, "the quota form has errors")
        status = 400
    bars = quota_bars(quota, placement.usage(tenant.pk))
    return page(request, "web/ops/quota.html", {"tenant": tenant, "form": form, "bars": bars}, status=status)


@operator_page
def instances(request: HttpRequest) -> HttpResponse:
    form = OpsInstanceFilterForm(request.GET)
    qs = filter_instances(Instance.objects.select_related("tenant", "node", "flavor", "image"), form)
    return page(
        request,
        "web/ops/instances.html",
        {"form": form, "page_obj": paginate(request, qs), "query": query_without_page(request)},
    )


@operator_page
def drift(request: HttpRequest) -> HttpResponse:
    """What reconcile found: workloads unknown to the portal (orphans) and drift events."""
    with_orphans = ComputeNode.objects.exclude(orphans=[]).order_by("name")
    missing = Instance.objects.live().filter(missing_since__isnull=False).select_related("tenant", "node")
    recent = Event.objects.filter(action__startswith="reconcile.").select_related("tenant")[:100]
    return page(request, "web/ops/drift.html", {"nodes": with_orphans, "missing": missing, "events": recent})


@operator_page
def events(request: HttpRequest) -> HttpResponse:
    form = OpsEventFilterForm(request.GET)
    qs = filter_events(Event.objects.select_related("tenant"), form)
    return page(
        request,
        "web/ops/events.html",
        {"form": form, "page_obj": paginate(request, qs), "query": query_without_page(request)},
    )
