"""The volumes endpoint: tenant-scoped through the base viewset; writes return 202 while the node works."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import IO, Any, cast

from django.db import models
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from compute.spec import VolumeFormat
from portal.api.exceptions import http_status
from portal.audit.record import describe
from portal.cloud.choices import VmState
from portal.cloud.models import ComputeNode, Instance
from portal.errors import DomainError, NotFound
from portal.images.services import UploadError
from portal.storage import backups as backup_service
from portal.storage import moves, volume_snapshots, volumes
from portal.storage.api import serializers
from portal.storage.api.backup_actions import UUID, BackupEvents, BackupViewSet
from portal.storage.choices import VolumeStatus
from portal.storage.models import Volume
from portal.tenancy.choices import Role


class VolumeViewSet(BackupViewSet):
    """Volumes of your tenants: persistent qcow2 disks for VMs or ext4 file systems for containers, on
    one node, attached to one instance at a time.

    Create, attach, detach, extend and delete return 202; ``status`` shows
    the node at work (creating, attaching, …) until it reports.
    """

    queryset = Volume.objects.select_related("tenant", "node", "instance", "move_node", "backup_policy")
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
    backup_source = "volume"
    backup_events = BackupEvents(
        start="volume.backup",
        delete="volume.backup.delete",
        restore="volume.restore",
        policy="volume.backup_policy",
    )

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

    @extend_schema(request=serializers.VolumeMoveSerializer, responses={202: serializers.VolumeSerializer})
    @action(detail=True, methods=["post"], url_path="move")
    def move(self, request: Request, pk: str | None = None) -> Response:
        """Copy a detached volume to another node through the portal (``moving`` with progress); it is
        ``available`` there once the target verified the content, and the source copy is dropped."""
        volume = self.get_object()
        body = serializers.VolumeMoveSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        describe(request, "volume.move", volume)
        node = ComputeNode.objects.filter(name=body.validated_data["node"]).first()
        if node is None:
            raise ValidationError({"node": f"No node named {body.validated_data['node']!r}."})
        volume = moves.move(volume, node, request.user)
        return Response(self.get_serializer(volume).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        methods=["get"],
        responses={200: serializers.BackupSerializer(many=True)},
        summary="The backups",
    )
    @extend_schema(methods=["get"], responses={200: serializers.BackupSerializer(many=True)})
    @extend_schema(
        methods=["post"], request=None, responses={202: serializers.BackupSerializer}, summary="Back up now"
    )
    @action(
        detail=True, methods=["get", "post"], url_path="backups", pagination_class=None, filter_backends=[]
    )
    def backups(self, request: Request, pk: str | None = None) -> Response:
        """List the volume's backups (newest first), or back the detached volume up now (202 ``creating``)."""
        return self.list_or_start_backup(request, backup_service.start)

    @extend_schema(request=serializers.RestoreSerializer, responses={202: serializers.VolumeSerializer})
    @action(detail=True, methods=["post"], url_path=rf"backups/(?P<bid>{UUID})/restore")
    def restore(self, request: Request, pk: str | None = None, bid: str = "") -> Response:
        """Restore a backup into a new volume of the tenant (quota and node checked as a create)."""
        return self.restore_from(request, bid)

    @extend_schema(methods=["get"], responses={200: serializers.BackupPolicySerializer})
    @extend_schema(
        methods=["post"],
        request=serializers.BackupPolicySerializer,
        responses={200: serializers.BackupPolicySerializer},
    )
    @extend_schema(methods=["delete"], responses={204: None})
    @action(detail=True, methods=["get", "post", "delete"], url_path="backup-policy")
    def backup_policy(self, request: Request, pk: str | None = None) -> Response:
        """The volume's scheduled backups: every ``interval_hours``, keep ``retention`` (POST sets,
        DELETE stops them; existing backups stay)."""
        return self.get_set_or_remove_policy(request)

    @extend_schema(responses={202: serializers.VolumeSerializer})
    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Delete a detached volume and its data (409 while attached)."""
        volume = self.get_object()
        describe(request, "volume.delete", volume)
        volume = volumes.delete(volume, request.user)
        return Response(self.get_serializer(volume).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(methods=["get"], responses={200: serializers.VolumeSnapshotSerializer(many=True)})
    @extend_schema(
        methods=["post"],
        request=serializers.SnapshotCreateSerializer,
        responses={202: serializers.VolumeSnapshotSerializer},
    )
    @action(
        detail=True, methods=["get", "post"], url_path="snapshots", pagination_class=None, filter_backends=[]
    )
    def snapshots(self, request: Request, pk: str | None = None) -> Response:
        """The volume's snapshots, oldest first, with size and time; POST {"name"} takes one (202,
        ``creating``) of a detached volume or one whose instance is stopped."""
        volume = self.get_object()
        if request.method == "GET":
            return Response(serializers.VolumeSnapshotSerializer(volume.snapshots.all(), many=True).data)
        body = serializers.SnapshotCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        name = body.validated_data["name"]
        describe(request, "volume.snapshot", volume, message=f"snapshot {name}")
        snap = volume_snapshots.take(volume, name, request.user)
        return Response(serializers.VolumeSnapshotSerializer(snap).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(methods=["get"], responses={200: serializers.VolumeSnapshotSerializer})
    @extend_schema(methods=["delete"], responses={202: serializers.VolumeSnapshotSerializer})
    @action(detail=True, methods=["get", "delete"], url_path=r"snapshots/(?P<name>[a-z0-9-]{1,63})")
    def snapshot(self, request: Request, name: str, pk: str | None = None) -> Response:
        """One snapshot; DELETE removes it on the node (202, ``deleting``; 404 when it is not listed)."""
        volume = self.get_object()
        if request.method == "GET":
            return Response(serializers.VolumeSnapshotSerializer(volume_snapshots.get(volume, name)).data)
        describe(request, "volume.delete_snapshot", volume, message=f"snapshot {name}")
        snap = volume_snapshots.delete(volume, name, request.user)
        return Response(serializers.VolumeSnapshotSerializer(snap).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: serializers.VolumeSnapshotSerializer})
    @action(detail=True, methods=["post"], url_path=r"snapshots/(?P<name>[a-z0-9-]{1,63})/revert")
    def revert_snapshot(self, request: Request, name: str, pk: str | None = None) -> Response:
        """Return a detached volume to this snapshot (202; 404 unknown, 409 while attached or busy)."""
        volume = self.get_object()
        describe(request, "volume.revert", volume, message=f"snapshot {name}")
        snap = volume_snapshots.revert(volume, name, request.user)
        return Response(serializers.VolumeSnapshotSerializer(snap).data, status=status.HTTP_202_ACCEPTED)


def _accept_put(
    request: HttpRequest,
    object_id: uuid.UUID,
    read_token: Callable[[str], tuple[str, str, str] | None],
    wrong_token: str,
    accept: Callable[[str, str, str, IO[bytes], int | None], tuple[str, int]],
) -> HttpResponse:
    """A node's PUT of content with an ``Upload`` token that ``read_token`` reads as (object id, action
    id, backup id); ``accept(object id, action id, backup id, body, length)`` stores it;
    ``wrong_token`` answers a token for another object."""
    if request.method != "PUT":
        return JsonResponse({"message": "Use PUT."}, status=405)
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    allowed = read_token(token.strip()) if scheme == "Upload" else None
    if allowed is None:
        return JsonResponse(
            {"message": "Send 'Authorization: Upload <token>' from the node's send task."}, status=401
        )
    oid, action_id, backup = allowed
    if oid != str(object_id):
        return JsonResponse({"message": wrong_token}, status=403)
    length_header = request.META.get("CONTENT_LENGTH") or ""
    length = int(length_header) if length_header.isdigit() else None
    try:
        digest, size = accept(oid, action_id, backup, cast(IO[bytes], request), length)
    except UploadError as exc:
        return JsonResponse({"message": str(exc)}, status=exc.status)
    except DomainError as exc:
        return JsonResponse({"message": str(exc), "code": exc.code}, status=http_status(exc))
    return JsonResponse({"digest": digest, "size": size}, status=201)


def _accept_volume(
    vid: str, action_id: str, backup: str, body: IO[bytes], length: int | None
) -> tuple[str, int]:
    if backup:
        return backup_service.accept_content(backup, action_id, body, length)
    return moves.accept_content(vid, action_id, body, length)


def _accept_instance_disk(
    iid: str, action_id: str, backup: str, body: IO[bytes], length: int | None
) -> tuple[str, int]:
    return backup_service.accept_content(backup, action_id, body, length)


@csrf_exempt
def volume_content(request: HttpRequest, volume_id: uuid.UUID) -> HttpResponse:
    """PUT a volume's content for a move or a backup, by its node (``Authorization: Upload <token>``)."""
    return _accept_put(
        request, volume_id, moves.read_token, "This transfer token is for another volume.", _accept_volume
    )


@csrf_exempt
def instance_backup_content(request: HttpRequest, instance_id: uuid.UUID) -> HttpResponse:
    """PUT a stopped VM's flattened disk for a backup, by its node (``Authorization: Upload <token>``)."""
    return _accept_put(
        request,
        instance_id,
        backup_service.read_instance_token,
        "This backup token is for another instance.",
        _accept_instance_disk,
    )
