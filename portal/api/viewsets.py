"""The base viewset: tenant scoping and role checks applied once for every resource.

A subclass names its queryset and serializer and, where it differs from the
default, which role writes need.  Scoping comes from the model's
``TenantScopedQuerySet.restrict``: another tenant's object is a 404.
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.db import models
from rest_framework import permissions, viewsets
from rest_framework.exceptions import PermissionDenied
from rest_framework.request import Request

from portal.api.authentication import actor_for
from portal.audit.record import describe
from portal.tenancy.choices import Role
from portal.tenancy.querysets import Actor


class ScopedPermission(permissions.BasePermission):
    """Reads need membership (scoping does that); writes need a role or operator."""

    def has_permission(self, request: Request, view: Any) -> bool:
        if not (request.user and request.user.is_authenticated):
            return False
        if request.method in permissions.SAFE_METHODS:
            return True
        if getattr(view, "action", None) == "create":
            view.check_operator_action("create")
        return True

    def has_object_permission(self, request: Request, view: Any, obj: models.Model) -> bool:
        if request.method in permissions.SAFE_METHODS:
            return True
        describe(request, f"{obj._meta.model_name}.{view.action}", obj, tenant_id=view.tenant_id_of(obj))
        view.check_operator_action(view.action)
        view.check_role(view.tenant_id_of(obj), view.write_role)
        return True


class ScopedViewSet(viewsets.ModelViewSet):  # type: ignore[type-arg]
    """CRUD on a tenant-scoped model with auditing of every write."""

    permission_classes = [ScopedPermission]
    #: minimum role in the object's tenant for create/update/destroy
    write_role: ClassVar[str] = Role.MEMBER
    #: actions only operators (staff) may perform
    operator_actions: ClassVar[frozenset[str]] = frozenset()
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]

    @property
    def actor(self) -> Actor:
        return actor_for(self.request)

    def get_queryset(self) -> models.QuerySet[Any]:
        return super().get_queryset().restrict(self.actor)  # type: ignore[attr-defined,no-any-return]

    # -- checks -----------------------------------------------------------
    def tenant_id_of(self, obj: models.Model) -> int | None:
        return getattr(obj, "tenant_id", None)

    def check_operator_action(self, action: str | None) -> None:
        if action in self.operator_actions and not self.actor.is_operator:
            raise PermissionDenied(f"Only operators can {action} {self.noun_plural()}.")

    def check_role(self, tenant_id: int | None, min_role: str) -> None:
        actor = self.actor
        if actor.can(tenant_id, min_role):
            return
        have = actor.role_in(tenant_id)
        raise PermissionDenied(
            f"This needs the {Role(min_role).label.lower()} role in the tenant; "
            + (f"you are {Role(have).label.lower()}." if have else "you are not a member.")
        )

    def noun_plural(self) -> str:
        model = self.get_queryset().model
        return str(model._meta.verbose_name_plural)

    # -- auditing writes --------------------------------------------------
    def perform_create(self, serializer: Any) -> None:
        tenant = serializer.validated_data.get("tenant")
        if tenant is not None:
            self.check_role(tenant.pk, self.write_role)
        obj = serializer.save(**self.create_extra())
        describe(self.request, f"{obj._meta.model_name}.create", obj, tenant_id=self.tenant_id_of(obj))

    def create_extra(self) -> dict[str, Any]:
        """Fields set by the server on create (e.g. ``created_by``)."""
        return {}

    def perform_update(self, serializer: Any) -> None:
        obj = serializer.save()
        describe(self.request, f"{obj._meta.model_name}.update", obj, tenant_id=self.tenant_id_of(obj))

    def perform_destroy(self, instance: models.Model) -> None:
        describe(
            self.request,
            f"{instance._meta.model_name}.delete",
            instance,
            tenant_id=self.tenant_id_of(instance),
        )
        instance.delete()
