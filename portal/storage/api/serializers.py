"""Snapshots and volumes on the wire: what the lists show and what creates and actions accept."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from compute.mountpath import MAX_MOUNT_PATH, MountPathError, check_mount_path
from portal.api.fields import DefaultTenantMixin, TenantField
from portal.api.strict import StrictCharField, StrictIntegerField, StrictModelSerializer, StrictRegexField
from portal.cloud.naming import NAME_RE, NAME_RULE
from portal.storage.choices import VolumeFormatChoice, VolumeStatus
from portal.storage.models import Backup, BackupPolicy, Snapshot, Volume, VolumeSnapshot

#: the largest volume (the node's qemu-img limit for the spec is 16384)
MAX_VOLUME_GB = 16384


class AttachmentSerializer(serializers.Serializer):  # type: ignore[type-arg]
    instance = serializers.UUIDField()
    device = serializers.CharField(allow_null=True, help_text="Guest disk (vdc…) of a VM once attached")
    mount_path = serializers.CharField(allow_null=True, help_text="Where a container mounts it")
    status = serializers.CharField()


class SnapshotSerializer(StrictModelSerializer[Snapshot]):
    class Meta:
        model = Snapshot
        fields = ["name", "instance_id", "status", "status_reason", "size_bytes", "taken_at", "created_at"]
        read_only_fields = fields


class VolumeSnapshotSerializer(StrictModelSerializer[VolumeSnapshot]):
    size_bytes = serializers.IntegerField(
        read_only=True,
        help_text="Data the snapshot holds: what a qcow2 copy of it needs (qemu-img measure), or the "
        "blocks of the ext4 copy; shared blocks count in full",
    )

    class Meta:
        model = VolumeSnapshot
        fields = ["name", "volume_id", "status", "status_reason", "size_bytes", "taken_at", "created_at"]
        read_only_fields = fields


class SnapshotCreateSerializer(serializers.Serializer):  # type: ignore[type-arg]
    name = StrictRegexField(NAME_RE, max_length=63, error_messages={"invalid": NAME_RULE})


class BackupPolicySerializer(StrictModelSerializer[BackupPolicy]):
    interval_hours = StrictIntegerField(
        min_value=1, max_value=8760, help_text="Back up every this many hours"
    )
    retention = StrictIntegerField(min_value=1, max_value=100, help_text="Keep the newest this many backups")

    class Meta:
        model = BackupPolicy
        fields = ["interval_hours", "retention", "last_result", "updated_at"]
        read_only_fields = ["last_result", "updated_at"]


class BackupSerializer(StrictModelSerializer[Backup]):
    digest = serializers.CharField(source="blob_id", allow_null=True, read_only=True)
    format = serializers.CharField(read_only=True, help_text="The volume's format: qcow2 or ext4")

    class Meta:
        model = Backup
        fields = [
            "id", "volume", "instance", "volume_name", "format", "size_gb", "status", "status_reason",
            "scheduled", "digest", "size_bytes", "created_at", "finished_at",
        ]  # fmt: skip
        read_only_fields = fields


class RestoreSerializer(serializers.Serializer):  # type: ignore[type-arg]
    name = StrictRegexField(NAME_RE, max_length=63, error_messages={"invalid": NAME_RULE})
    node = StrictCharField(
        required=False,
        max_length=63,
        help_text="Node for the new volume (default as for a create: most disk first, one you may use)",
    )


class MoveSerializer(serializers.Serializer):  # type: ignore[type-arg]
    node = serializers.CharField(allow_null=True)
    phase = serializers.CharField()
    done_bytes = serializers.IntegerField()
    total_bytes = serializers.IntegerField()


class VolumeSerializer(DefaultTenantMixin, StrictModelSerializer[Volume]):
    tenant = TenantField(required=False)
    name = StrictRegexField(NAME_RE, max_length=63, error_messages={"invalid": NAME_RULE})
    size_gb = StrictIntegerField(min_value=1, max_value=MAX_VOLUME_GB)
    format = serializers.ChoiceField(
        choices=VolumeFormatChoice.choices,
        default=VolumeFormatChoice.QCOW2,
        help_text="qcow2 (default): a disk for VMs; ext4: a file system for containers, on a node "
        "dedicated to the tenant",
    )
    node = StrictCharField(
        source="node.name",
        required=False,
        max_length=63,
        help_text="Node to hold the volume (default, most disk first: an up node you may run VMs on for "
        "qcow2, one dedicated to your tenant for ext4)",
    )
    attachments = serializers.SerializerMethodField()
    backup_policy = serializers.SerializerMethodField(
        help_text="Scheduled backups (set with …/backup-policy/), null when there are none"
    )
    move = serializers.SerializerMethodField(
        help_text="While moving: the target node, the phase (send: the source uploads; receive: the "
        "target downloads and verifies) and its bytes done / total; null otherwise"
    )

    class Meta:
        model = Volume
        fields = [
            "id",
            "tenant",
            "name",
            "size_gb",
            "format",
            "node",
            "status",
            "status_reason",
            "attachments",
            "move",
            "backup_policy",
            "missing_since",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "status", "status_reason", "missing_since", "created_at", "updated_at"]
        validators: list[Any] = []  # live-name uniqueness is checked under the quota lock (409)

    @extend_schema_field(BackupPolicySerializer(allow_null=True))
    def get_backup_policy(self, obj: Volume) -> dict[str, Any] | None:
        try:
            policy = obj.backup_policy
        except BackupPolicy.DoesNotExist:
            return None
        return dict(BackupPolicySerializer(policy).data)

    @extend_schema_field(MoveSerializer(allow_null=True))
    def get_move(self, obj: Volume) -> dict[str, Any] | None:
        if obj.status != VolumeStatus.MOVING:
            return None
        return {
            "node": obj.move_node.name if obj.move_node else None,
            "phase": obj.move_phase,
            "done_bytes": obj.move_done,
            "total_bytes": obj.move_total,
        }

    @extend_schema_field(AttachmentSerializer(many=True))
    def get_attachments(self, obj: Volume) -> list[dict[str, Any]]:
        if obj.instance_id is None:
            return []
        return [
            {
                "instance": str(obj.instance_id),
                "device": obj.target or None,
                "mount_path": obj.mount_path or None,
                "status": obj.status,
            }
        ]


class VolumeMoveSerializer(serializers.Serializer):  # type: ignore[type-arg]
    node = StrictCharField(
        max_length=63,
        help_text="The node to copy the volume to: up, not its node, one the tenant could create this "
        "volume on (qcow2: shared or dedicated to the tenant; ext4: dedicated to the tenant)",
    )


class VolumeAttachSerializer(serializers.Serializer):  # type: ignore[type-arg]
    instance = serializers.UUIDField(help_text="An instance of the volume's tenant on the volume's node")
    mount_path = StrictCharField(
        required=False,
        max_length=MAX_MOUNT_PATH,
        trim_whitespace=False,
        help_text="Containers only (required): an absolute, normalised path such as /data; not /, not "
        "under /proc, /sys, /dev or /tmp, not a system directory itself (docs/storage.md)",
    )


class VolumeMountSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """One volume a container is created with, and where it is mounted."""

    volume = serializers.UUIDField(help_text="An available ext4 volume of the tenant")
    mount_path = StrictCharField(max_length=MAX_MOUNT_PATH, trim_whitespace=False, help_text="Such as /data")

    def validate_mount_path(self, value: str) -> str:
        try:
            return check_mount_path(value)
        except MountPathError as exc:
            raise serializers.ValidationError(f"{exc}.") from exc


class VolumeExtendSerializer(serializers.Serializer):  # type: ignore[type-arg]
    size_gb = StrictIntegerField(min_value=1, max_value=MAX_VOLUME_GB)
