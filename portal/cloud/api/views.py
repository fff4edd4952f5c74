from __future__ import annotations

from typing import Any

from django.db import models
from drf_spectacular.utils import extend_schema
from rest_framework import permissions, status
from rest_framework.exceptions import PermissionDenied
from rest_framework.request import Request
from rest_framework.response import Response

from portal.api.exceptions import Conflict
from portal.api.viewsets import ScopedViewSet
from portal.audit.record import describe
from portal.cloud import services
from portal.cloud.api import serializers
from portal.cloud.models import ComputeNode, Flavor, Instance
from portal.tenancy.choices import Role


class FlavorViewSet(ScopedViewSet):
    """Public flavors and your tenants' private ones; operators manage them."""

    queryset = Flavor.objects.select_related("tenant")
    serializer_class = serializers.FlavorSerializer
    operator_actions = frozenset({"create", "update", "partial_update", "destroy"})
    filterset_fields = {
        "name": ["exact"],
        "vcpus": ["exact", "gte", "lte"],
        "ram_mb": ["gte", "lte"],
        "is_public": ["exact"],
        "tenant__slug": ["exact"],
    }
    search_fields = ["name"]
    ordering_fields = ["name", "vcpus", "ram_mb", "disk_gb"]


class IsOperator(permissions.BasePermission):
    message = "Only operators can see and manage compute nodes."

    def has_permission(self, request: Request, view: Any) -> bool:
        return bool(request.user and request.user.is_authenticated and view.actor.is_operator)


class ComputeNodeViewSet(ScopedViewSet):
    """Compute nodes (operators only)."""

    queryset = ComputeNode.objects.select_related("owner")
    serializer_class = serializers.ComputeNodeSerializer
    permission_classes = [IsOperator]
    filterset_fields = {
        "tenancy": ["exact"],
        "status": ["exact"],
        "owner__slug": ["exact"],
        "name": ["exact"],
    }
    search_fields = ["name"]
    ordering_fields = ["name", "status", "last_heartbeat"]
    lookup_field = "name"

    def get_queryset(self) -> models.QuerySet[Any]:
        return ComputeNode.objects.select_related("owner")

    def tenant_id_of(self, obj: models.Model) -> int | None:
        return None

    def perform_destroy(self, instance: models.Model) -> None:
        assert isinstance(instance, ComputeNode)
        if instance.instances.live().exists():
            raise Conflict(f"Node {instance.name} still hosts instances; move or delete them first.")
        super().perform_destroy(instance)


class InstanceViewSet(ScopedViewSet):
    """Instances of your tenants.  Members create and delete; viewers read."""

    queryset = Instance.objects.select_related("tenant", "flavor", "node", "created_by")
    serializer_class = serializers.InstanceSerializer
    write_role = Role.MEMBER
    filterset_fields = {
        "tenant__slug": ["exact"],
        "kind": ["exact"],
        "vm_state": ["exact"],
        "task_state": ["exact", "isnull"],
        "power_state": ["exact"],
        "node__name": ["exact"],
        "name": ["exact", "icontains"],
    }
    search_fields = ["name", "image"]
    ordering_fields = ["name", "created_at", "vm_state", "kind"]

    def get_queryset(self) -> models.QuerySet[Any]:
        qs = super().get_queryset()
        if self.request.query_params.get("vm_state") != "deleted" and self.action == "list":
            qs = qs.live()  # type: ignore[attr-defined]
        return qs

    def perform_create(self, serializer: Any) -> None:
        data = serializer.validated_data
        self.check_role(data["tenant"].pk, self.write_role)
        instance = services.create_instance(
            services.Request(
                tenant=data["tenant"],
                name=data["name"],
                image=data["image"],
                flavor=data["flavor"],
                requested_kind=data["requested_kind"],
            ),
            self.request.user,
        )
        serializer.instance = instance
        describe(self.request, "instance.create", instance, message=instance.isolation_reason)

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        try:
            return super().create(request, *args, **kwargs)
        except Conflict:
            if "tenant" in request.data:
                describe(request, "instance.create", message="refused")
            raise

    @extend_schema(responses={204: None})
    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        instance = self.get_object()
        describe(request, "instance.delete", instance)
        services.delete_instance(instance)
        return Response(status=status.HTTP_204_NO_CONTENT)

    def perform_update(self, serializer: Any) -> None:
        if set(serializer.validated_data) - {"name"}:
            raise PermissionDenied("Only the name of an instance can be changed.")
        super().perform_update(serializer)
