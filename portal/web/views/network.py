"""Networks, security groups and published ports in the browser: the tenant's networks and groups pages
and an instance's network.

Every change goes through the services the REST API uses (``portal.cloud.networks``:
``create_network``, ``delete_network``; ``portal.cloud.secgroups``:
``create_group``, ``add_rule``, ``remove_rule``, ``delete_group``, ``set_groups``;
``portal.cloud.forwards``: ``publish``, ``unpublish``), so the node gets the same
messages and the same refusals come back; pages check input with forms (rules with the
API's own ``secgroups.validate_rule``) and name the action for the audit Event.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from django import forms
from django.contrib import messages
from django.db import models
from django.db.models import Prefetch
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.views.decorators.http import require_POST

from portal.api.exceptions import http_status
from portal.audit.record import describe, note_error
from portal.cloud import forwards, networks, secgroups
from portal.cloud.models import Instance, Network, Port, PublishedPort, SecurityGroup, SecurityGroupRule
from portal.errors import DomainError
from portal.tenancy.choices import Role
from portal.tenancy.models import Quota, Tenant
from portal.web.access import (
    Ask,
    Refusal,
    actor,
    attempt,
    confirm_then_act,
    login_page,
    page,
    role_refusal,
    success,
    tenant_page,
    write_refusal,
)
from portal.web.forms import InstanceGroupsForm, NetworkForm, PortForm, RuleForm, SecurityGroupForm
from portal.web.views.instances import _detail_page, _instance, _write_refusal


def _networks(request: HttpRequest, tenant: Tenant) -> list[Network]:
    """The tenant's networks with the live instances on each (``nics``): two queries whatever their number."""
    live = (
        Port.objects.exclude(instance__vm_state="deleted")
        .select_related("instance")
        .order_by("instance__name")
    )
    return list(
        Network.objects.restrict(actor(request))
        .filter(tenant=tenant)
        .prefetch_related(Prefetch("ports", queryset=live, to_attr="nics"))
        .order_by("name")
    )


def _networks_page(
    request: HttpRequest,
    tenant: Tenant,
    *,
    form: NetworkForm | None = None,
    error: str = "",
    status: int = 200,
) -> HttpResponse:
    nets = _networks(request, tenant)
    quota = Quota.objects.filter(tenant=tenant).first()
    context = {
        "networks": nets,
        "limit": quota.networks if quota else Quota.defaults().get("networks", 5),
        "form": form or NetworkForm(),
        "refusal": role_refusal(actor(request), tenant.pk, Role.MEMBER),
        "error": error,
        "pool": networks.pool(),
    }
    return page(request, "web/networks.html", context, status=status)


_Form = TypeVar("_Form", bound=forms.Form)


def _posted_form(
    request: HttpRequest,
    tenant: Tenant,
    action: str,
    what: str,
    make: Callable[[], _Form],
    invalid: Callable[[_Form], HttpResponse],
    obj: models.Model | None = None,
) -> _Form | HttpResponse:
    """A POSTed change in the tenant: named ``action`` (on ``obj``) for the audit Event and refused for
    anyone but a member; else the form ``make()`` builds, or the page ``invalid(form)`` when it has
    errors (the Event keeps "the <what> form has errors")."""
    refused = write_refusal(request, tenant.pk, action, obj)
    if refused:
        return refused
    form = make()
    if not form.is_valid():
        note_error(request, f"the {what} form has errors")
        return invalid(form)
    return form


@tenant_page
def networks_page(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    """GET: the tenant's networks and the instances on them; POST: create a network."""
    if request.method != "POST":
        return _networks_page(request, tenant)
    form = _posted_form(
        request,
        tenant,
        "network.create",
        "network",
        lambda: NetworkForm(request.POST),
        lambda form: _networks_page(request, tenant, form=form, status=400),
    )
    if isinstance(form, HttpResponse):
        return form
    data = form.cleaned_data
    try:
        net = networks.create_network(tenant, data["name"], data["cidr"], data["prefix_length"])
    except DomainError as exc:  # a taken name, an overlap, the quota: next to its field
        note_error(request, str(exc))
        field = next(iter(getattr(exc, "errors", None) or {}), None)
        form.add_error(field, str(exc))
        return _networks_page(request, tenant, form=form, status=http_status(exc))
    describe(request, "network.create", net, tenant_id=tenant.pk, message=f"{net.name} {net.cidr}")
    messages.success(request, f"Created network {net.name} ({net.cidr}); choose it when you launch.")
    return HttpResponseRedirect(reverse("web:networks") + f"#network-{net.pk}", status=303)


@tenant_page
def network_delete(request: HttpRequest, tenant: Tenant, pk: int) -> HttpResponse:
    """GET: a confirmation page; POST: delete the network (refused while an instance uses it)."""
    net = get_object_or_404(Network.objects.restrict(actor(request)).filter(tenant=tenant), pk=pk)
    refused = write_refusal(request, tenant.pk, "network.delete", net)
    if refused:
        return refused
    return confirm_then_act(
        request,
        Ask(
            f"Delete network {net.name} ({net.cidr})?",
            "Its nodes remove its bridge, tunnel, resolver and rules. Refused while an instance uses it.",
            "Delete network",
            reverse("web:networks") + f"#network-{net.pk}",
        ),
        act=lambda: networks.delete_network(net),
        refused=lambda refusal: _networks_page(request, tenant, error=refusal.message, status=refusal.status),
        done=lambda _: success(request, f"Deleted network {net.name}.", reverse("web:networks")),
    )


def _groups(request: HttpRequest, tenant: Tenant) -> list[SecurityGroup]:
    """The tenant's groups with their rules and live instances: four queries whatever their number."""
    return list(
        SecurityGroup.objects.restrict(actor(request))
        .filter(tenant=tenant)
        .prefetch_related(
            Prefetch("rules", queryset=SecurityGroupRule.objects.select_related("remote_group")),
            Prefetch(
                "instances", queryset=Instance.objects.live().order_by("name"), to_attr="live_instances"
            ),
        )
        .order_by("name")
    )


def _group(request: HttpRequest, tenant: Tenant, pk: int) -> SecurityGroup:
    """A group of the current tenant, else 404 (other tenants' groups and bad ids alike)."""
    return get_object_or_404(SecurityGroup.objects.restrict(actor(request)).filter(tenant=tenant), pk=pk)


def _groups_page(
    request: HttpRequest,
    tenant: Tenant,
    *,
    create: SecurityGroupForm | None = None,
    rule: RuleForm | None = None,
    error: str = "",
    status: int = 200,
) -> HttpResponse:
    groups = _groups(request, tenant)
    refusal = role_refusal(actor(request), tenant.pk, Role.MEMBER)
    rows = [
        (g, rule if rule is not None and rule.group.pk == g.pk else RuleForm(group=g, groups=groups))
        for g in groups
    ]
    context = {
        "rows": rows,
        "create_form": create or SecurityGroupForm(),
        "refusal": refusal,
        "error": error,
    }
    return page(request, "web/security_groups.html", context, status=status)


def _back(anchor: str = "") -> HttpResponseRedirect:
    return HttpResponseRedirect(reverse("web:security-groups") + anchor, status=303)


@tenant_page
def security_groups(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    """GET: the tenant's groups and their rules; POST: create a group."""
    if request.method != "POST":
        return _groups_page(request, tenant)
    form = _posted_form(
        request,
        tenant,
        "securitygroup.create",
        "security group",
        lambda: SecurityGroupForm(request.POST),
        lambda form: _groups_page(request, tenant, create=form, status=400),
    )
    if isinstance(form, HttpResponse):
        return form
    data = form.cleaned_data
    group = attempt(request, lambda: secgroups.create_group(tenant, data["name"], data["description"]))
    if isinstance(group, Refusal):
        form.add_error("name", group.message)
        return _groups_page(request, tenant, create=form, status=group.status)
    describe(request, "securitygroup.create", group, tenant_id=tenant.pk)
    messages.success(request, f"Created security group {group.name}; it allows nothing until you add rules.")
    return _back(f"#group-{group.pk}")


@require_POST
@tenant_page
def rule_add(request: HttpRequest, tenant: Tenant, pk: int) -> HttpResponse:
    group = _group(request, tenant, pk)
    form = _posted_form(
        request,
        tenant,
        "securitygrouprule.create",
        "rule",
        lambda: RuleForm(request.POST, group=group, groups=_groups(request, tenant)),
        lambda form: _groups_page(
            request,
            tenant,
            rule=form,
            error=f"The rule was not added to {group.name}; see below.",
            status=400,
        ),
        group,
    )
    if isinstance(form, HttpResponse):
        return form
    data = form.cleaned_data
    rule = attempt(request, lambda: secgroups.add_rule(group, **data))
    if isinstance(rule, Refusal):
        return _groups_page(request, tenant, rule=form, error=rule.message, status=rule.status)
    describe(request, "securitygrouprule.create", rule, tenant_id=tenant.pk, message=f"{group.name}: {rule}")
    messages.success(request, f"Added to {group.name}: {rule}. Its running instances have it now.")
    return _back(f"#group-{group.pk}")


@tenant_page
def rule_delete(request: HttpRequest, tenant: Tenant, pk: int) -> HttpResponse:
    """GET: a confirmation page; POST: remove the rule (live on the group's instances)."""
    rule = get_object_or_404(
        SecurityGroupRule.objects.select_related("group", "remote_group").filter(
            group__in=SecurityGroup.objects.restrict(actor(request)).filter(tenant=tenant)
        ),
        pk=pk,
    )
    group = rule.group
    refused = write_refusal(request, tenant.pk, "securitygrouprule.delete", rule, f"{group.name}: {rule}")
    if refused:
        return refused
    back = reverse("web:security-groups") + f"#group-{group.pk}"
    return confirm_then_act(
        request,
        Ask(
            f"Remove rule “{rule}” from {group.name}?",
            f"The running instances of {group.name} stop allowing this traffic at once.",
            "Remove rule",
            back,
        ),
        act=lambda: secgroups.remove_rule(rule),
        refused=lambda refusal: _groups_page(request, tenant, error=refusal.message, status=refusal.status),
        done=lambda _: success(request, f"Removed from {group.name}: {rule}.", back),
    )


@tenant_page
def group_delete(request: HttpRequest, tenant: Tenant, pk: int) -> HttpResponse:
    """GET: a confirmation page; POST: delete the group (refused while an instance uses it)."""
    group = _group(request, tenant, pk)
    refused = write_refusal(request, tenant.pk, "securitygroup.delete", group)
    if refused:
        return refused
    return confirm_then_act(
        request,
        Ask(
            f"Delete security group {group.name}?",
            "Its rules go with it, and so do other groups' rules that name it. "
            "Refused while an instance uses it.",
            "Delete group",
            reverse("web:security-groups") + f"#group-{group.pk}",
        ),
        act=lambda: secgroups.delete_group(group),
        refused=lambda refusal: _groups_page(request, tenant, error=refusal.message, status=refusal.status),
        done=lambda _: success(
            request, f"Deleted security group {group.name}.", reverse("web:security-groups")
        ),
    )


def _for_write(request: HttpRequest, pk: str, action: str) -> tuple[Instance, HttpResponse | None]:
    """The instance a POST changes (404 if not visible), named for the audit, and the role refusal if any."""
    instance = _instance(request, pk)
    describe(request, action, instance)
    return instance, _write_refusal(request, instance.tenant_id)


def _back_to(instance: Instance) -> HttpResponseRedirect:
    return HttpResponseRedirect(reverse("web:instance", args=[instance.pk]) + "#network", status=303)


@require_POST
@login_page
def instance_groups(request: HttpRequest, pk: str) -> HttpResponse:
    """Set exactly the chosen groups on the instance (``secgroups.set_groups``, live on its node)."""
    instance, refused = _for_write(request, pk, "instance.security_groups")
    if refused:
        return refused
    groups = list(SecurityGroup.objects.filter(tenant_id=instance.tenant_id).order_by("name"))
    form = InstanceGroupsForm(request.POST, groups=groups)
    if not form.is_valid():
        note_error(request, "unknown security group")
        return _detail_page(request, instance, "Choose security groups of this tenant.", 400, groups=form)
    chosen = form.chosen()
    outcome = attempt(request, lambda: secgroups.set_groups(instance, chosen))
    if isinstance(outcome, Refusal):
        return _detail_page(request, instance, outcome.message, outcome.status, groups=form)
    names = ", ".join(g.name for g in chosen)
    describe(request, "instance.security_groups", instance, message=names)
    messages.success(
        request, f"Security groups of {instance.name}: {names or 'none'}; its node applies them now."
    )
    return _back_to(instance)


@require_POST
@login_page
def port_publish(request: HttpRequest, pk: str) -> HttpResponse:
    """Publish a port of the instance on its node (``forwards.publish``, as the API's POST)."""
    instance, refused = _for_write(request, pk, "publishedport.create")
    if refused:
        return refused
    form = PortForm(request.POST)
    if not form.is_valid():
        note_error(request, "the port form has errors")
        return _detail_page(request, instance, "Check the port to publish.", 400, port=form)
    data: dict[str, Any] = form.cleaned_data
    row = attempt(
        request, lambda: forwards.publish(instance, data["protocol"], data["port"], data["external_port"])
    )
    if isinstance(row, Refusal):
        instance.refresh_from_db()
        return _detail_page(request, instance, row.message, row.status, port=form)
    describe(request, "publishedport.create", row, tenant_id=row.tenant_id, message=str(row))
    messages.success(
        request,
        f"Published {row.protocol}/{row.port} of {instance.name}: connect to "
        f"{row.external.address}:{row.external_port}.",
    )
    return _back_to(instance)


@login_page
def port_unpublish(request: HttpRequest, pk: str, port: int) -> HttpResponse:
    """GET: a confirmation page; POST: unpublish (``forwards.unpublish``; the node drops the rule)."""
    instance = _instance(request, pk)
    row = get_object_or_404(
        PublishedPort.objects.select_related("external", "instance"), instance=instance, pk=port
    )
    # the port's tenant is its instance's (forwards.publish)
    refused = write_refusal(request, instance.tenant_id, "publishedport.delete", row, str(row))
    if refused:
        return refused
    back = reverse("web:instance", args=[instance.pk]) + "#network"
    return confirm_then_act(
        request,
        Ask(
            f"Unpublish {row.protocol}/{row.port} of {instance.name}?",
            f"{row.external.address}:{row.external_port} stops reaching it at once.",
            "Unpublish",
            back,
        ),
        act=lambda: forwards.unpublish(row),
        refused=lambda refusal: _detail_page(request, instance, refusal.message, refusal.status),
        done=lambda _: success(request, f"Unpublished {row.protocol}/{row.port} of {instance.name}.", back),
    )
