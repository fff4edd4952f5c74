"""Instances: list, detail with live partials, launch with preview, actions, delete.

Every write goes through ``portal.cloud.services`` (create_instance, act,
delete_instance) exactly as the API does; pages only check input and roles
and name the action for the audit Event.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.contrib import messages
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.utils.cache import patch_vary_headers
from django.views.decorators.http import require_POST

from compute.spec import Action, Kind
from portal.audit.models import Event
from portal.audit.record import describe, not_a_change, note_error
from portal.cloud import disclosure, placement, services
from portal.cloud import logs as cloud_logs
from portal.cloud.choices import VmState
from portal.cloud.models import Instance
from portal.errors import DomainError
from portal.storage import snapshots
from portal.tenancy.choices import Role
from portal.tenancy.models import Tenant
from portal.web.access import (
    Ask,
    Refusal,
    actor,
    attempt,
    confirm,
    confirm_then_act,
    login_page,
    page,
    refuse,
    role_refusal,
    success,
    tenant_page,
    write_refusal,
)
from portal.web.forms import (
    InstanceFilterForm,
    InstanceGroupsForm,
    LaunchForm,
    PortForm,
    PublishForm,
    RevertForm,
    SnapshotForm,
)
from portal.web.presenters import (
    BUTTON_ACTIONS,
    action_allowed,
    action_refusal,
    delete_allowed,
    network_panel,
    quota_effect_rows,
)
from portal.web.views.tenant import paginate, query_without_page

#: htmx stops polling when a partial answers 286
STOP_POLLING = 286
POLL_SECONDS = 2
STATS_POLL_SECONDS = 5
#: after this long without a console answer the panel says so instead of "asking…"
CONSOLE_PATIENCE_SECONDS = 10
#: without JavaScript, pages with live states reload themselves this often (a meta refresh)
NOSCRIPT_REFRESH_SECONDS = 10


def filter_instances(qs: QuerySet[Instance], form: InstanceFilterForm) -> QuerySet[Instance]:
    """Apply the valid filters; without a state filter deleted instances are left out (as the API)."""
    form.is_valid()
    data: dict[str, Any] = getattr(form, "cleaned_data", {})
    qs = qs.filter(vm_state=data["state"]) if data.get("state") else qs.live()  # type: ignore[attr-defined]
    if data.get("kind"):
        qs = qs.filter(kind=data["kind"])
    if data.get("q"):
        qs = qs.filter(name__icontains=data["q"])
    if data.get("tenant"):
        qs = qs.filter(tenant=data["tenant"])
    if data.get("node"):
        qs = qs.filter(node=data["node"])
    return qs


def _tenant_instances(request: HttpRequest, tenant: Tenant) -> tuple[InstanceFilterForm, Any]:
    form = InstanceFilterForm(request.GET)
    qs: QuerySet[Instance] = Instance.objects.restrict(actor(request)).filter(tenant=tenant)
    qs = filter_instances(qs.select_related("node", "flavor", "image"), form)
    return form, paginate(request, qs)


#: the part of the instance list that a filter change replaces (rows and pagination)
RESULTS_TARGET = "instance-results"


@tenant_page
def instance_list(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    """The list page; the filter form's htmx request gets only the results, for the same URL.

    The filter form pushes its query to the address bar (``hx-push-url``), so the page's URL,
    the pagination links and the rows' polling all carry the filters.
    """
    form, page_obj = _tenant_instances(request, tenant)
    ctx = {
        "form": form,
        "page_obj": page_obj,
        "query": query_without_page(request),
        "rows_query": request.GET.urlencode(),
        "poll": POLL_SECONDS,
        "can_launch": role_refusal(actor(request), tenant.pk, Role.MEMBER) is None,
        "bulk_actions": BULK_ACTIONS.items(),
    }
    if request.headers.get("HX-Request") and request.headers.get("HX-Target") == RESULTS_TARGET:
        response = render(request, "web/partials/instance_results.html", ctx)
    else:
        response = page(request, "web/instances.html", ctx)
    patch_vary_headers(response, ["HX-Request", "HX-Target"])
    return response


@tenant_page
def instance_rows(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    """The polled table body of the instance list (same filters as the page)."""
    _form, page_obj = _tenant_instances(request, tenant)
    ctx = {
        "page_obj": page_obj,
        "rows_query": request.GET.urlencode(),
        "poll": POLL_SECONDS,
        "can_launch": role_refusal(actor(request), tenant.pk, Role.MEMBER) is None,
    }
    return render(request, "web/partials/instance_rows.html", ctx)


#: what the instance list does to several instances at once (value -> label)
BULK_ACTIONS = {"start": "Start", "stop": "Shut down", "reboot": "Reboot", "delete": "Delete"}
#: at most this many instances per bulk request (one page of the list holds fewer)
BULK_MAX = 100


@tenant_page
def instances_bulk(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    """GET: one confirmation page for the chosen instances (saying which the action skips and why);
    POST: the action on each, through the same services as one at a time, then back to the list."""
    data = request.POST if request.method == "POST" else request.GET
    action = data.get("action", "")
    if request.method == "POST":
        describe(request, f"instance.bulk_{action}"[:100], tenant_id=tenant.pk)
    refused = _write_refusal(request, tenant.pk)
    if refused:
        return refused
    ids = data.getlist("id")[:BULK_MAX]
    chosen: list[Instance] = []
    if action in BULK_ACTIONS and ids:
        qs = Instance.objects.restrict(actor(request)).filter(tenant=tenant).live()  # type: ignore[attr-defined]
        valid = [i for i in ids if _is_uuid(i)]
        chosen = list(qs.filter(pk__in=valid).select_related("node", "tenant").order_by("name"))
    if not chosen:
        note_error(request, "no instances or no action chosen")
        messages.error(request, "Choose one or more instances and an action.")
        return HttpResponseRedirect(reverse("web:instances"), status=303)
    label = BULK_ACTIONS[action]
    ready = [i for i in chosen if _bulk_allowed(i, action)]
    skipped = [i for i in chosen if i not in ready]
    if request.method != "POST":
        names = ", ".join(i.name for i in ready) or "none"
        body = f"{label}: {names}."
        if skipped:
            body += (
                " Skipped, their state does not allow it: "
                + ", ".join(f"{i.name} ({i.task_state or i.vm_state})" for i in skipped)
                + "."
            )
        if action == "delete":
            body += " The nodes destroy the workloads and their disks; this cannot be undone."
        fields = [("action", action)] + [("id", str(i.pk)) for i in ready]
        return confirm(
            request,
            f"{label} {len(ready)} instance{'s' if len(ready) != 1 else ''}?",
            body,
            f"{label} {len(ready)}",
            reverse("web:instances"),
            pairs=fields,
        )
    done: list[str] = []
    failed: list[str] = []
    for inst in ready:
        call = (
            (lambda i=inst: services.delete_instance(i, request.user))
            if action == "delete"
            else (lambda i=inst: services.act(i, action, {}, request.user))
        )
        outcome = attempt(request, call)
        (failed if isinstance(outcome, Refusal) else done).append(inst.name)
    describe(request, f"instance.bulk_{action}", tenant_id=tenant.pk, message=f"{label}: {', '.join(done)}")
    if done:
        messages.success(
            request, f"{label} sent for {', '.join(done)}; the list updates as the nodes report."
        )
    if failed or skipped:
        messages.error(request, f"Not done: {', '.join(failed + [i.name for i in skipped])}.")
    return HttpResponseRedirect(reverse("web:instances"), status=303)


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _bulk_allowed(instance: Instance, action: str) -> bool:
    return delete_allowed(instance) if action == "delete" else action_allowed(instance, Action(action))


def _instance(request: HttpRequest, pk: str) -> Instance:
    """The instance if the actor may see it, else 404 (bad ids and other tenants alike)."""
    qs = Instance.objects.restrict(actor(request)).select_related(
        "tenant", "node", "flavor", "image", "network", "created_by"
    )
    return get_object_or_404(qs, pk=pk)


def _status_context(request: HttpRequest, instance: Instance) -> dict[str, Any]:
    refusal = role_refusal(actor(request), instance.tenant_id, Role.MEMBER)
    return {
        "instance": instance,
        "buttons": [(a, action_allowed(instance, a)) for a in BUTTON_ACTIONS],
        "can_delete": delete_allowed(instance),
        "live": instance.vm_state != VmState.DELETED,
        "refusal": refusal,
        "poll": POLL_SECONDS,
        "noscript_refresh": NOSCRIPT_REFRESH_SECONDS,
        "can_snapshot": action_allowed(instance, Action.SNAPSHOT),
        "can_publish": action_allowed(instance, Action.PUBLISH),
    }


@login_page
def instance_detail(request: HttpRequest, pk: str) -> HttpResponse:
    instance = _instance(request, pk)
    return _detail_page(request, instance)


def _detail_page(
    request: HttpRequest,
    instance: Instance,
    error: str = "",
    status: int = 200,
    snapshot: Any = None,
    publish: Any = None,
    revert: Any = None,
    groups: InstanceGroupsForm | None = None,
    port: PortForm | None = None,
) -> HttpResponse:
    ctx = _status_context(request, instance)
    names = snapshots.revertible_names(instance) if instance.kind == Kind.VM else []
    net = network_panel(instance)
    attached = [str(g.pk) for g in net.attached]
    ctx |= {
        "error": error,
        "snapshot_form": snapshot or SnapshotForm(),
        "revert_form": revert or RevertForm(names=names),
        "snapshot_names": names,
        "publish_form": publish or PublishForm(tenant=instance.tenant),
        "net": net,
        "groups_form": groups or InstanceGroupsForm(groups=net.groups, initial={"security_groups": attached}),
        "port_form": port or PortForm(),
    }
    return page(request, "web/instance_detail.html", ctx, status=status)


@login_page
def instance_status(request: HttpRequest, pk: str) -> HttpResponse:
    """Polled partial: states, reason and the action buttons the state allows."""
    instance = _instance(request, pk)
    ctx = _status_context(request, instance)
    if instance.kind == Kind.VM:  # the buttons outside the panel come along (out of band)
        ctx |= {"oob": True, "snapshot_names": snapshots.revertible_names(instance)}
    return _polled(request, "web/partials/instance_status.html", instance, ctx)


def _polled(request: HttpRequest, template: str, instance: Instance, context: dict[str, Any]) -> HttpResponse:
    """A panel that polls itself while the instance exists; a deleted one answers 286 (htmx stops)."""
    live = instance.vm_state != VmState.DELETED
    response = render(request, template, {"instance": instance, "polling": live, **context})
    if not live:
        response.status_code = STOP_POLLING
    return response


@login_page
def instance_console(request: HttpRequest, pk: str) -> HttpResponse:
    """Polled partial: the console tail the node last sent (each poll asks for a fresh one) and events."""
    instance = _instance(request, pk)
    events = Event.objects.restrict(actor(request)).filter(object_type="instance", object_id=str(instance.pk))
    return _polled(
        request,
        "web/partials/instance_console.html",
        instance,
        {
            "console": services.console(instance),
            "events": events[:10],
            "poll": POLL_SECONDS,
            "console_patience": CONSOLE_PATIENCE_SECONDS,
        },
    )


#: lines the instance page's logs panel shows (the API gives up to 10000)
LOGS_PANEL_LINES = 100


@login_page
def instance_logs(request: HttpRequest, pk: str) -> HttpResponse:
    """Polled partial: a container's last lines, each marked with its time and stream.

    Asked of the node at each poll through the logs API's path (:mod:`portal.cloud.logs`);
    after a delete it shows the kept logs once and stops polling.
    """
    instance = _instance(request, pk)
    stream = request.GET.get("stream", "")
    stream = stream if stream in ("stdout", "stderr") else ""
    context: dict[str, Any] = {"poll": STATS_POLL_SECONDS, "stream": stream, "lines_wanted": LOGS_PANEL_LINES}
    try:
        # a short wait: a page that polls must not hold a server thread for long on a slow node
        answer = cloud_logs.read(instance, cloud_logs.Query(LOGS_PANEL_LINES, "", stream), wait=3)
        context["answer"] = answer
        context["lines"] = [(t[11:23], s, x) for t, s, x in answer.lines]  # HH:MM:SS.mmm of the UTC time
    except DomainError as exc:
        context["refusal"] = str(exc)
    return _polled(request, "web/partials/instance_logs.html", instance, context)


@login_page
def instance_terminal(request: HttpRequest, pk: str) -> HttpResponse:
    """The interactive console page: xterm.js over the relay's WebSocket (docs/console.md).

    A VM's serial console (write for members, view for viewers) or a shell in a
    container (members); the page asks the API for a ticket with the session cookie.
    """
    instance = _instance(request, pk)
    role = actor(request).role_in(instance.tenant_id)
    may_write = actor(request).can(instance.tenant_id, Role.MEMBER)
    # a VM's serial console: write or view; a container: a shell, for members only
    modes = {"vm": ("write", "view"), "container": ("exec", "")}[instance.kind]
    mode = modes[0] if may_write else modes[1]
    return render(
        request,
        "web/instance_terminal.html",
        {"instance": instance, "mode": mode, "role": role or ("operator" if may_write else "")},
    )


@login_page
def instance_stats(request: HttpRequest, pk: str) -> HttpResponse:
    """Polled partial: memory and CPU over the last heartbeats, as small inline charts."""
    instance = _instance(request, pk)
    data = services.stats(instance)
    points = data["samples"]
    samples = (
        {
            "memory": [p["memory_bytes"] / 2**20 for p in points],
            "cpu": [p["cpu_percent"] for p in points],
            "last": points[-1],
            "memory_mib": points[-1]["memory_bytes"] / 2**20,
            "limit_mib": data["memory_limit_bytes"] / 2**20,
            "count": len(points),
            "span": (points[-1]["at"] - points[0]["at"]).total_seconds(),
            "cpu_max": 100 * instance.vcpus,
        }
        if len(points) >= 2
        else None
    )
    return _polled(
        request,
        "web/partials/instance_stats.html",
        instance,
        {"samples": samples, "poll": STATS_POLL_SECONDS},
    )


def _write_refusal(request: HttpRequest, tenant_id: int) -> HttpResponse | None:
    refusal = role_refusal(actor(request), tenant_id, Role.MEMBER)
    return refuse(request, refusal) if refusal else None


@require_POST
@login_page
def instance_action(request: HttpRequest, pk: str) -> HttpResponse:
    instance = _instance(request, pk)
    action = request.POST.get("action", "")
    describe(request, f"instance.{action}"[:100], instance)
    refused = _write_refusal(request, instance.tenant_id)
    if refused:
        return refused
    if action == "revert":
        note_error(request, "revert goes through its confirmation page")
        return _detail_page(request, instance, REVERT_CONFIRMS, 400)
    params: dict[str, Any] = {}
    snapshot = None
    if action == "snapshot":
        snapshot = SnapshotForm(request.POST)
        if not snapshot.is_valid():
            note_error(request, "invalid snapshot name")
            return _detail_page(request, instance, "Check the snapshot name.", 400, snapshot)
        params["name"] = snapshot.cleaned_data["name"]
    if action == Action.STOP and request.POST.get("force") == "1":
        params["force"] = True
    outcome = attempt(request, lambda: snapshots.act(instance, action, params, request.user))
    if isinstance(outcome, Refusal):
        instance.refresh_from_db()
        return _detail_page(request, instance, outcome.message, outcome.status, snapshot)
    what = "Power off" if params.get("force") else action.capitalize()
    messages.success(request, f"{what} sent to {instance.node}; the state updates when it reports.")
    return HttpResponseRedirect(reverse("web:instance", args=[instance.pk]), status=303)


REVERT_CONFIRMS = 'Reverting asks for confirmation first: use the "Revert to snapshot" button.'


@login_page
def instance_revert(request: HttpRequest, pk: str) -> HttpResponse:
    """GET ?name=: a confirmation page naming the snapshot; POST: ask the node to revert the VM to it."""
    instance = _instance(request, pk)
    posted = request.method == "POST"
    refused = write_refusal(request, instance.tenant_id, "instance.revert", instance)
    if refused:
        return refused
    form = RevertForm(request.POST if posted else request.GET, names=snapshots.revertible_names(instance))
    if not form.is_valid():
        note_error(request, "unknown snapshot name")
        return _detail_page(request, instance, form.error_text(), 400, revert=form)
    name = form.cleaned_data["name"]

    def check() -> Refusal | None:
        unknown = attempt(request, lambda: snapshots.get(instance, name))
        if isinstance(unknown, Refusal):
            return unknown
        if action_allowed(instance, Action.REVERT):
            return None
        why = action_refusal(instance, Action.REVERT) or (
            f"{instance.name} cannot be reverted: it is {instance.task_state or instance.vm_state}."
        )
        return Refusal(why, 409)

    def refusal_page(refusal: Refusal) -> HttpResponse:
        instance.refresh_from_db()
        return _detail_page(request, instance, refusal.message, refusal.status, revert=form)

    back = reverse("web:instance", args=[instance.pk])
    return confirm_then_act(
        request,
        Ask(
            f"Revert {instance.name} to snapshot {name}?",
            f"What changed in {instance.name} since snapshot {name} was taken is lost. "
            "This cannot be undone.",
            "Revert to snapshot",
            back,
            fields={"name": name},
        ),
        act=lambda: snapshots.revert(instance, name, request.user),
        refused=refusal_page,
        done=lambda _: success(
            request, f"Revert to {name} sent to {instance.node}; the state updates when it reports.", back
        ),
        check=check,
    )


@login_page
def instance_snapshots(request: HttpRequest, pk: str) -> HttpResponse:
    """Partial: the VM's snapshots (name, status, size, time); the page's one revert form picks from them."""
    instance = _instance(request, pk)
    rows = list(instance.snapshots.all())
    context = {
        "instance": instance,
        "snapshots": rows,
    }
    return render(request, "web/partials/instance_snapshots.html", context)


@login_page
def snapshot_delete(request: HttpRequest, pk: str, name: str) -> HttpResponse:
    """GET: a confirmation page; POST: ask the node to delete the snapshot (the row goes when it reports)."""
    instance = _instance(request, pk)
    refused = write_refusal(request, instance.tenant_id, "snapshot.delete", instance, f"snapshot {name}")
    if refused:
        return refused

    def refusal_page(refusal: Refusal) -> HttpResponse:
        instance.refresh_from_db()
        return _detail_page(request, instance, refusal.message, refusal.status)

    back = reverse("web:instance", args=[instance.pk])
    return confirm_then_act(
        request,
        Ask(
            f"Delete snapshot {name} of {instance.name}?",
            "The snapshot is removed from the VM's disk; you can no longer revert to it.",
            "Delete snapshot",
            back,
        ),
        act=lambda: snapshots.delete(instance, name, request.user),
        refused=refusal_page,
        done=lambda _: success(
            request, f"Deleting snapshot {name} on {instance.node}; the list updates when done.", back
        ),
        check=lambda: attempt(request, lambda: snapshots.get(instance, name)),
    )


@login_page
def instance_delete(request: HttpRequest, pk: str) -> HttpResponse:
    """GET: a confirmation page; POST: ask the node to destroy the instance."""
    instance = _instance(request, pk)
    if request.method == "POST":
        describe(request, "instance.delete", instance)
    refused = _write_refusal(request, instance.tenant_id)
    if refused:
        return refused
    if request.method != "POST":
        return confirm(
            request,
            f"Delete instance {instance.name}?",
            "The node destroys the workload and its disk; this cannot be undone.",
            "Delete instance",
            reverse("web:instance", args=[instance.pk]),
        )
    outcome = attempt(request, lambda: services.delete_instance(instance, request.user))
    if isinstance(outcome, Refusal):
        instance.refresh_from_db()
        return _detail_page(request, instance, outcome.message, outcome.status)
    messages.success(
        request, f"Delete of {instance.name} requested; it leaves the list once its node reports."
    )
    # the instance's page would only offer forms for an instance on its way out: go to the list
    return HttpResponseRedirect(reverse("web:instances"), status=303)


def _launch_form(request: HttpRequest, tenant: Tenant, data: Any = None, preview: bool = False) -> LaunchForm:
    return LaunchForm(data, actor=actor(request), tenant=tenant, user=request.user, preview=preview)


@tenant_page
def launch(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    refusal = role_refusal(actor(request), tenant.pk, Role.MEMBER)
    if request.method != "POST":
        ctx = {"form": _launch_form(request, tenant), "refusal": refusal}
        return page(request, "web/launch.html", ctx)
    describe(request, "instance.create", tenant_id=tenant.pk)
    if refusal:
        return refuse(request, refusal)
    form = _launch_form(request, tenant, request.POST)
    if not form.is_valid():
        note_error(request, "the launch form has errors")
        return page(request, "web/launch.html", {"form": form}, status=400)
    outcome = attempt(request, lambda: services.create_instance(form.to_request(), request.user))
    if isinstance(outcome, Refusal):
        return page(
            request, "web/launch.html", {"form": form, "error": outcome.message}, status=outcome.status
        )
    instance = outcome
    describe(request, "instance.create", instance, message=instance.isolation_reason)
    messages.success(request, f"Launching {instance.name}: {instance.isolation_reason}.")
    return HttpResponseRedirect(reverse("web:instance", args=[instance.pk]), status=303)


@tenant_page
def launch_preview(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    """Partial: what ``placement.preview`` says about the form as filled in so far (a dry run).

    The form POSTs it (user data may be 16 KiB: too long for a query string, and the CSRF
    token does not belong in one); GET is still answered for links and old pages.
    """
    not_a_change(request)
    refusal = role_refusal(actor(request), tenant.pk, Role.MEMBER)
    ctx: dict[str, Any] = {"refusal": refusal}
    data = request.POST if request.method == "POST" else request.GET
    form = _launch_form(request, tenant, data, preview=True)
    if refusal is None and form.previewable():
        result = attempt(request, lambda: placement.preview(form.to_request()))
        if isinstance(result, Refusal):
            ctx["error"] = result.message
        else:
            ctx["preview"] = result
            ctx["rejected"] = disclosure.rejected_for(actor(request), result.rejected)
            ctx["quota_rows"] = quota_effect_rows(result.quota)
    ctx["form"] = form
    return render(request, "web/partials/launch_preview.html", ctx)
