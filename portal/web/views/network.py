"""Security groups and published ports in the browser: the tenant's groups page and an instance's network.

Every change goes through the services the REST API uses (``portal.cloud.secgroups``:
``create_group``, ``add_rule``, ``remove_rule``, ``delete_group``, ``set_groups``;
``portal.cloud.forwards``: ``publish``, ``unpublish``), so the node gets the same
messages and the same refusals come back; pages check input with forms (rules with the
API's own ``secgroups.validate_rule``) and name the action for the audit Event.
"""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.db.models import Prefetch
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.views.decorators.http import require_POST

from portal.audit.record import describe, note_error
from portal.cloud import forwards, secgroups
from portal.cloud.models import Instance, PublishedPort, SecurityGroup, SecurityGroupRule
from portal.tenancy.choices import Role
from portal.tenancy.models import Tenant
from portal.web.access import (
    Refusal,
    actor,
    attempt,
    confirm,
    login_page,
    page,
    role_refusal,
    tenant_page,
)
from portal.web.forms import InstanceGroupsForm, PortForm, RuleForm, SecurityGroupForm
from portal.web.views.instances import _detail_page, _instance, _write_refusal


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
    describe(request, "securitygroup.create", tenant_id=tenant.pk)
    refused = _write_refusal(request, tenant.pk)
    if refused:
        return refused
    form = SecurityGroupForm(request.POST)
    if not form.is_valid():
        note_error(request, "the security group form has errors")
        return _groups_page(request, tenant, create=form, status=400)
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
    describe(request, "securitygrouprule.create", group, tenant_id=tenant.pk)
    refused = _write_refusal(request, tenant.pk)
    if refused:
        return refused
    form = RuleForm(request.POST, group=group, groups=_groups(request, tenant))
    if not form.is_valid():
        note_error(request, "the rule form has errors")
        return _groups_page(
            request,
            tenant,
            rule=form,
            error=f"The rule was not added to {group.name}; see below.",
            status=400,
        )
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
    posted = request.method == "POST"
    if posted:
        describe(
            request, "securitygrouprule.delete", rule, tenant_id=tenant.pk, message=f"{group.name}: {rule}"
        )
    refused = _write_refusal(request, tenant.pk)
    if refused:
        return refused
    if not posted:
        return confirm(
            request,
            f"Remove rule “{rule}” from {group.name}?",
            f"The running instances of {group.name} stop allowing this traffic at once.",
            "Remove rule",
            reverse("web:security-groups") + f"#group-{group.pk}",
        )
    outcome = attempt(request, lambda: secgroups.remove_rule(rule))
    if isinstance(outcome, Refusal):
        return _groups_page(request, tenant, error=outcome.message, status=outcome.status)
    messages.success(request, f"Removed from {group.name}: {rule}.")
    return _back(f"#group-{group.pk}")


@tenant_page
def group_delete(request: HttpRequest, tenant: Tenant, pk: int) -> HttpResponse:
    """GET: a confirmation page; POST: delete the group (refused while an instance uses it)."""
    group = _group(request, tenant, pk)
    posted = request.method == "POST"
    if posted:
        describe(request, "securitygroup.delete", group, tenant_id=tenant.pk)
    refused = _write_refusal(request, tenant.pk)
    if refused:
        return refused
    if not posted:
        return confirm(
            request,
            f"Delete security group {group.name}?",
            "Its rules go with it, and so do other groups' rules that name it. "
            "Refused while an instance uses it.",
            "Delete group",
            reverse("web:security-groups") + f"#group-{group.pk}",
        )
    outcome = attempt(request, lambda: secgroups.delete_group(group))
    if isinstance(outcome, Refusal):
        return _groups_page(request, tenant, error=outcome.message, status=outcome.status)
    messages.success(request, f"Deleted security group {group.name}.")
    return _back()


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
    posted = request.method == "POST"
    if posted:
        describe(request, "publishedport.delete", row, tenant_id=row.tenant_id, message=str(row))
    refused = _write_refusal(request, instance.tenant_id)
    if refused:
        return refused
    if not posted:
        return confirm(
            request,
            f"Unpublish {row.protocol}/{row.port} of {instance.name}?",
            f"{row.external.address}:{row.external_port} stops reaching it at once.",
            "Unpublish",
            reverse("web:instance", args=[instance.pk]) + "#network",
        )
    outcome = attempt(request, lambda: forwards.unpublish(row))
    if isinstance(outcome, Refusal):
        return _detail_page(request, instance, outcome.message, outcome.status)
    messages.success(request, f"Unpublished {row.protocol}/{row.port} of {instance.name}.")
    return _back_to(instance)
