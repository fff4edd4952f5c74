"""The volumes endpoint: tenant-scoped through the base viewset; writes return 202 while the node works."""

from __future__ import annotations

from typing import Any

from django.db import models
from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from compute.spec import VolumeFormat
from portal.api.viewsets import ScopedViewSet
from portal.audit.record import describe
from portal.cloud.choices import VmState
from portal.cloud.models import ComputeNode, Instance
from portal.errors import NotFound
from portal.storage import volumes
from portal.storage.api import serializers
from portal.storage.choices import VolumeStatus
from portal.storage.models import Volume
from portal.tenancy.choices import Role


class VolumeViewSet(ScopedViewSet):
    """Volumes of your tenants: persistent qcow2 disks for VMs or ext4 file systems for containers, on
    one node, attached to one instance at a time.

    Create, attach, detach, extend and delete return 202; ``status`` shows
    the node at work (creating, attaching, …) until it reports.
    """

    queryset = Volume.objects.select_related("tenant", "node", "instance")
    serializer_class = serializers.VolumeSerializer
    write_role = Role.MEMBER
    http_method_names = ["get", "post", "delete", "head", "options"]
    filterset_fields = {
        "tenant__slug": ["exact"],
        "status": ["exact"],
        "node__name": ["exact"],
        "name": ["exact", "icontains"],
        "instance": ["exact"],
    }
    search_fields = ["name"]
    ordering_fields = ["name", "created_at", "size_gb", "status"]

    def get_queryset(self) -> models.QuerySet[Any]:
        qs = super().get_queryset()
        if self.request.query_params.get("status") != VolumeStatus.DELETED and self.action == "list":
            qs = qs.live()  # type: ignore[attr-defined]
        return qs

    @extend_schema(responses={202: serializers.VolumeSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        body = self.get_serializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        tenant = data["tenant"]
        describe(request, "volume.create", tenant_id=tenant.pk)
        self.check_role(tenant.pk, self.write_role)
        node = None
        if "node" in data:
            node = ComputeNode.objects.filter(name=data["node"]["name"]).first()
            if node is None:
                raise ValidationError({"node": f"No node named {data['node']['name']!r}."})
        fmt = VolumeFormat(data["format"])
        volume = volumes.create(tenant, data["name"], data["size_gb"], node, request.user, fmt)
        describe(request, "volume.create", volume, message=f"{volume.size_gb} GB on {volume.node.name}")
        return Response(self.get_serializer(volume).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=serializers.VolumeAttachSerializer, responses={202: serializers.VolumeSerializer})
    @action(detail=True, methods=["post"], url_path="attach")
    def attach(self, request: Request, pk: str | None = None) -> Response:
        """Attach to a VM (hot when it runs) or a stopped container (at ``mount_path``) of the same
        tenant on the volume's node."""
        volume = self.get_object()
        body = serializers.VolumeAttachSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        describe(request, "volume.attach", volume)
        visible = Instance.objects.restrict(self.actor).exclude(vm_state=VmState.DELETED)
        instance = visible.filter(pk=body.validated_data["instance"]).first()
        if instance is None:
            raise NotFound(f"No instance {body.validated_data['instance']} that you can see.")
        volume = volumes.attach(volume, instance, request.user, body.validated_data.get("mount_path"))
        return Response(self.get_serializer(volume).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: serializers.VolumeSerializer})
    @action(detail=True, methods=["post"], url_path="detach")
    def detach(self, request: Request, pk: str | None = None) -> Response:
        """Detach from its VM (hot when it runs: the guest releases the disk) or its stopped container."""
        volume = self.get_object()
        describe(request, "volume.detach", volume)
        volume = volumes.detach(volume, request.user)
        return Response(self.get_serializer(volume).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=serializers.VolumeExtendSerializer, responses={202: serializers.VolumeSerializer})
    @action(detail=True, methods=["post"], url_path="extend")
    def extend(self, request: Request, pk: str | None = None) -> Response:
        """Grow a detached volume (quota checked); volumes never shrink."""
        volume = self.get_object()
        body = serializers.VolumeExtendSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        describe(request, "volume.extend", volume)
        volume = volumes.extend(volume, body.validated_data["size_gb"], request.user)
        return Response(self.get_serializer(volume).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(responses={202: serializers.VolumeSerializer})
    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Delete a detached volume and its data (409 while attached)."""
        volume = self.get_object()
        describe(request, "volume.delete", volume)
        volume = volumes.delete(volume, request.user)
        return Response(self.get_serializer(volume).data, status=status.HTTP_202_ACCEPTED)
