from __future__ import annotations

from typing import Any

from django.db import models
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework.exceptions import PermissionDenied
from rest_framework.request import Request
from rest_framework.response import Response

from portal.api.authentication import user_id_of
from portal.api.viewsets import ScopedViewSet
from portal.audit.record import describe
from portal.errors import Conflict
from portal.tenancy.api import serializers
from portal.tenancy.choices import Role
from portal.tenancy.models import APIToken, Membership, Quota, SSHKey, Tenant


class TenantViewSet(ScopedViewSet):
    """Tenants you belong to; operators create and delete them, tenant admins rename."""

    queryset = Tenant.objects.all()
    serializer_class = serializers.TenantSerializer
    write_role = Role.ADMIN
    operator_actions = frozenset({"create", "destroy"})
    filterset_fields = ["slug", "active"]
    search_fields = ["slug", "name"]
    ordering_fields = ["slug", "name", "created_at"]
    lookup_field = "slug"

    def tenant_id_of(self, obj: models.Model) -> int | None:
        return obj.pk  # type: ignore[no-any-return]

    def perform_update(self, serializer: Any) -> None:
        if "active" in serializer.validated_data and not self.actor.is_operator:
            raise PermissionDenied("Only operators can enable or disable a tenant.")
        super().perform_update(serializer)


class MembershipViewSet(ScopedViewSet):
    """Members of your tenants; tenant admins add, change and remove them."""

    queryset = Membership.objects.select_related("user", "tenant")
    serializer_class = serializers.MembershipSerializer
    write_role = Role.ADMIN
    filterset_fields = {"tenant__slug": ["exact"], "role": ["exact"], "user__username": ["exact"]}
    search_fields = ["user__username", "tenant__slug"]
    ordering_fields = ["created_at", "role"]

    @extend_schema(request=serializers.MembershipRoleSerializer)
    def partial_update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().partial_update(request, *args, **kwargs)

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Refuse those who may add members nowhere before the body is looked at (403, not a 400
        that says which names they could add)."""
        actor = self.actor
        if not actor.is_operator and not any(actor.can(t, self.write_role) for t in actor.tenant_ids):
            self.check_role(actor.tenant_ids[0] if actor.tenant_ids else None, self.write_role)
        return super().create(request, *args, **kwargs)

    def perform_update(self, serializer: Any) -> None:
        if serializer.validated_data.get("role", Role.ADMIN) != Role.ADMIN:
            self._keep_an_admin(serializer.instance, "can no longer be demoted")
        super().perform_update(serializer)

    def perform_destroy(self, instance: models.Model) -> None:
        assert isinstance(instance, Membership)
        self._keep_an_admin(instance, "cannot be removed")
        super().perform_destroy(instance)

    @staticmethod
    def _keep_an_admin(membership: Membership, what: str) -> None:
        """A tenant keeps at least one admin: nobody could manage its members otherwise, and an
        admin removing their own last membership locks themselves out (409)."""
        if membership.role != Role.ADMIN:
            return
        others = Membership.objects.filter(tenant_id=membership.tenant_id, role=Role.ADMIN).exclude(
            pk=membership.pk
        )
        if not others.exists():
            raise Conflict(
                f"{membership.user} is the only admin of {membership.tenant} and {what}: "
                "make another member admin first."
            )


class QuotaViewSet(ScopedViewSet):
    """Quota limits and current usage per tenant; operators change limits."""

    queryset = Quota.objects.select_related("tenant")
    serializer_class = serializers.QuotaSerializer
    operator_actions = frozenset({"create", "update", "partial_update", "destroy"})
    http_method_names = ["get", "patch", "head", "options"]
    filterset_fields = {"tenant__slug": ["exact"]}
    ordering_fields = ["tenant__slug"]


class SSHKeyViewSet(ScopedViewSet):
    """Your own SSH public keys (other users' keys do not exist for you)."""

    queryset = SSHKey.objects.all()
    serializer_class = serializers.SSHKeySerializer
    http_method_names = ["get", "post", "delete", "head", "options"]
    filterset_fields = ["name", "fingerprint"]
    search_fields = ["name"]
    ordering_fields = ["name", "created_at"]

    def get_queryset(self) -> models.QuerySet[Any]:
        return SSHKey.objects.filter(user_id=user_id_of(self.request))

    def tenant_id_of(self, obj: models.Model) -> int | None:
        return None

    def check_role(self, tenant_id: int | None, min_role: str) -> None:
        """Keys belong to the user, not a tenant: the queryset already limits them."""

    def create_extra(self) -> dict[str, Any]:
        return {"user": self.request.user}


class APITokenViewSet(ScopedViewSet):
    """Your API tokens; the key is shown once, at creation. DELETE revokes."""

    queryset = APIToken.objects.all()
    serializer_class = serializers.APITokenSerializer
    http_method_names = ["get", "post", "delete", "head", "options"]
    filterset_fields = ["name"]
    ordering_fields = ["created_at", "expires_at"]

    def get_queryset(self) -> models.QuerySet[Any]:
        qs = APIToken.objects.filter(user_id=user_id_of(self.request)).select_related("membership__tenant")
        token = self.request.auth
        if isinstance(token, APIToken) and token.membership_id is not None:
            qs = qs.filter(membership_id=token.membership_id)
        return qs

    def tenant_id_of(self, obj: models.Model) -> int | None:
        return None

    def check_role(self, tenant_id: int | None, min_role: str) -> None:
        """Any member may hold tokens for their own membership."""

    def perform_destroy(self, instance: models.Model) -> None:
        assert isinstance(instance, APIToken)
        describe(self.request, "apitoken.revoke", instance)
        if instance.revoked_at is None:
            instance.revoked_at = timezone.now()
            instance.save(update_fields=["revoked_at"])
