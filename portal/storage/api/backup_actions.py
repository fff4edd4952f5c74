"""The backup actions a volume and a VM's root disk share: list, back up now, one backup, restore, policy.

``/volumes/ID/backups…`` and ``/instances/ID/backups…`` keep the same rows
with the same rules and answers; what differs is named by the viewset: the
field of :class:`~portal.storage.models.Backup` that points at its object,
the audit events, the service that starts a backup, and each action's
docstring (its OpenAPI description), which is why the actions whose
description differs stay in the viewsets as one-line calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from portal.api.viewsets import ScopedViewSet
from portal.audit.record import describe
from portal.cloud.models import ComputeNode, Instance
from portal.errors import NotFound
from portal.storage import backups as backup_service
from portal.storage.api.serializers import (
    BackupPolicySerializer,
    BackupSerializer,
    RestoreSerializer,
    VolumeSerializer,
)
from portal.storage.models import Backup, BackupPolicy, Volume

#: an id in a path: only a well-formed UUID matches (anything else is a 404, not a 400)
UUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@dataclasses.dataclass(frozen=True)
class BackupEvents:
    """The audit events of the backup actions on one kind of object."""

    start: str
    delete: str
    restore: str
    policy: str


class BackupViewSet(ScopedViewSet):
    """A viewset whose objects have backups (``Backup.<backup_source>``) and a backup policy."""

    #: the field of Backup and BackupPolicy that names this viewset's object, also the noun in
    #: messages: "volume" or "instance"
    backup_source: str
    backup_events: BackupEvents

    def _backup(self, source: Volume | Instance, bid: str) -> Backup:
        backup = Backup.objects.filter(**{self.backup_source: source}, pk=bid).first()
        if backup is None:
            raise NotFound(f"No backup {bid} of {self.backup_source} {source.name}.")
        return backup

    def list_or_start_backup(self, request: Request, start: Callable[[Any, Any], Backup]) -> Response:
        """GET the object's backups (newest first); POST starts one with ``start(object, user)`` (202)."""
        source = self.get_object()
        if request.method == "POST":
            describe(request, self.backup_events.start, source)
            backup = start(source, request.user)
            return Response(BackupSerializer(backup).data, status=status.HTTP_202_ACCEPTED)
        rows = Backup.objects.filter(**{self.backup_source: source}).select_related("blob")
        return Response(BackupSerializer(rows, many=True).data)

    @extend_schema(methods=["get"], responses={200: BackupSerializer})
    @extend_schema(methods=["delete"], responses={204: None})
    @action(detail=True, methods=["get", "delete"], url_path=rf"backups/(?P<bid>{UUID})")
    def backup(self, request: Request, pk: str | None = None, bid: str = "") -> Response:
        """One backup; DELETE removes it and its blob unless another backup or image shares it."""
        source = self.get_object()
        backup = self._backup(source, bid)
        if request.method == "DELETE":
            describe(request, self.backup_events.delete, source, message=f"backup {backup.pk}")
            backup_service.delete(backup)
            return Response(status=status.HTTP_204_NO_CONTENT)
        return Response(BackupSerializer(backup).data)

    def restore_from(self, request: Request, bid: str) -> Response:
        """Restore backup ``bid`` of the object into a new volume (202)."""
        source = self.get_object()
        backup = self._backup(source, bid)
        body = RestoreSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        describe(request, self.backup_events.restore, source, message=f"backup {backup.pk}")
        node = None
        if "node" in body.validated_data:
            node = ComputeNode.objects.filter(name=body.validated_data["node"]).first()
            if node is None:
                raise ValidationError({"node": f"No node named {body.validated_data['node']!r}."})
        new = backup_service.restore(backup, body.validated_data["name"], node, request.user)
        return Response(
            VolumeSerializer(new, context={"request": request}).data, status=status.HTTP_202_ACCEPTED
        )

    def get_set_or_remove_policy(self, request: Request) -> Response:
        """GET the object's backup policy (404 without one), POST sets it, DELETE removes it (204)."""
        source = self.get_object()
        policy = BackupPolicy.objects.filter(**{self.backup_source: source}).first()
        if request.method == "POST":
            body = BackupPolicySerializer(data=request.data)
            body.is_valid(raise_exception=True)
            describe(request, self.backup_events.policy, source)
            data = body.validated_data
            policy = backup_service.set_policy(source, data["interval_hours"], data["retention"])
            return Response(BackupPolicySerializer(policy).data)
        if policy is None:
            raise NotFound(f"{self.backup_source.capitalize()} {source.name} has no backup policy.")
        if request.method == "DELETE":
            describe(request, self.backup_events.policy, source, message="removed")
            policy.delete()
            return Response(status=status.HTTP_204_NO_CONTENT)
        return Response(BackupPolicySerializer(policy).data)
