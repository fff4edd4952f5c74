from __future__ import annotations

import re
from typing import Any

from rest_framework import serializers

from portal.api.authentication import actor_for
from portal.api.fields import DefaultTenantMixin, TenantField
from portal.cloud.choices import RequestedKind
from portal.cloud.models import ComputeNode, Flavor, Instance
from portal.tenancy.models import Tenant

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_IMAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,150}(:[A-Za-z0-9._-]{1,40})?$")


class FlavorSerializer(serializers.ModelSerializer[Flavor]):
    tenant = serializers.SlugRelatedField(
        slug_field="slug",
        queryset=Tenant.objects.all(),
        required=False,
        allow_null=True,
        help_text="Owner tenant of a private flavor; empty for a public flavor.",
    )

    class Meta:
        model = Flavor
        fields = ["id", "name", "vcpus", "ram_mb", "disk_gb", "is_public", "tenant"]
        read_only_fields = ["id", "is_public"]
        validators: list[Any] = []  # uniqueness is enforced by the database and answered with 409

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        tenant = attrs.get("tenant", getattr(self.instance, "tenant", None))
        attrs["is_public"] = tenant is None
        if attrs.get("vcpus", 1) < 1 or attrs.get("ram_mb", 16) < 16:
            raise serializers.ValidationError("A flavor needs at least 1 vCPU and 16 MiB of memory.")
        return attrs


class ComputeNodeSerializer(serializers.ModelSerializer[ComputeNode]):
    owner = serializers.SlugRelatedField(
        slug_field="slug", queryset=Tenant.objects.all(), required=False, allow_null=True
    )

    class Meta:
        model = ComputeNode
        fields = [
            "id",
            "name",
            "queue",
            "tenancy",
            "owner",
            "vcpus",
            "ram_mb",
            "disk_gb",
            "cpu_allocation_ratio",
            "ram_allocation_ratio",
            "disk_allocation_ratio",
            "status",
            "status_reason",
            "last_heartbeat",
            "drivers",
            "created_at",
        ]
        read_only_fields = [
            "id",
            "queue",
            "status",
            "status_reason",
            "last_heartbeat",
            "drivers",
            "created_at",
        ]

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        tenancy = attrs.get("tenancy", getattr(self.instance, "tenancy", "shared"))
        owner = attrs.get("owner", getattr(self.instance, "owner", None))
        if tenancy == "dedicated" and owner is None:
            raise serializers.ValidationError({"owner": "A dedicated node needs an owner tenant."})
        if tenancy == "shared" and owner is not None:
            raise serializers.ValidationError(
                {"owner": "A shared node has no owner; set tenancy 'dedicated'."}
            )
        for ratio in ("cpu_allocation_ratio", "ram_allocation_ratio", "disk_allocation_ratio"):
            if ratio in attrs and not 0 < attrs[ratio] <= 64:
                raise serializers.ValidationError({ratio: "Must be above 0 and at most 64."})
        if "name" in attrs:
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,63}", attrs["name"]):
                raise serializers.ValidationError({"name": "Use letters, digits, '-' and '_' (at most 63)."})
            attrs["queue"] = f"node.{attrs['name']}"
        return attrs


class InstanceSerializer(DefaultTenantMixin, serializers.ModelSerializer[Instance]):
    tenant = TenantField(required=False)
    flavor = serializers.PrimaryKeyRelatedField(queryset=Flavor.objects.all())
    kind = serializers.ChoiceField(
        choices=RequestedKind.choices,
        default=RequestedKind.AUTO,
        source="requested_kind",
        help_text="auto (portal chooses), vm or container",
    )
    decided_kind = serializers.CharField(source="kind", read_only=True)
    node: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(slug_field="name", read_only=True)
    created_by: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="username", read_only=True
    )

    class Meta:
        model = Instance
        fields = [
            "id",
            "tenant",
            "name",
            "kind",
            "decided_kind",
            "isolation_reason",
            "image",
            "flavor",
            "vcpus",
            "ram_mb",
            "disk_gb",
            "node",
            "vm_state",
            "task_state",
            "power_state",
            "status_reason",
            "addresses",
            "created_by",
            "created_at",
            "updated_at",
        ]
        read_only_fields = [
            "id",
            "isolation_reason",
            "vcpus",
            "ram_mb",
            "disk_gb",
            "vm_state",
            "task_state",
            "power_state",
            "status_reason",
            "addresses",
            "created_at",
            "updated_at",
        ]
        validators: list[Any] = []  # live-name uniqueness is checked under the quota lock (409)

    def get_fields(self) -> dict[str, Any]:
        fields = super().get_fields()
        request = self.context.get("request")
        if request is not None and request.user.is_authenticated:
            fields["flavor"].queryset = Flavor.objects.restrict(actor_for(request))  # type: ignore[attr-defined]
        if self.instance is not None and not isinstance(self.instance, list | tuple):
            for immutable in ("tenant", "flavor", "image", "kind"):
                fields[immutable].read_only = True
        return fields

    def validate_name(self, value: str) -> str:
        if not _NAME_RE.match(value):
            raise serializers.ValidationError(
                "Use lower-case letters, digits and '-', starting and ending with a letter or digit"
                " (at most 63)."
            )
        return value

    def validate_image(self, value: str) -> str:
        if not _IMAGE_RE.match(value):
            raise serializers.ValidationError("Expected an image reference such as 'busybox:1.36'.")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        flavor = attrs.get("flavor")
        tenant = attrs.get("tenant")
        if (
            flavor is not None
            and tenant is not None
            and not flavor.is_public
            and flavor.tenant_id != tenant.pk
        ):
            raise serializers.ValidationError({"flavor": "This flavor is private to another tenant."})
        return attrs
