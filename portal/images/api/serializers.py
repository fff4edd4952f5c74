from __future__ import annotations

from typing import Any

from django.db import IntegrityError, transaction
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from portal.api.authentication import actor_for
from portal.api.conflicts import FieldConflict
from portal.api.fields import TENANT_SLUG_SCHEMA, DefaultTenantMixin, TenantField
from portal.api.strict import StrictBooleanField, StrictModelSerializer
from portal.images.models import Artifact, Image
from portal.images.naming import name_validator, version_validator
from portal.tenancy.models import Tenant


class ArtifactSerializer(StrictModelSerializer[Artifact]):
    layers = serializers.SerializerMethodField(help_text="Layer digests of a container image, bottom first")

    class Meta:
        model = Artifact
        fields = [
            "format",
            "digest",
            "size",
            "virtual_size",
            "source_digest",
            "layers",
            "config",
            "created_at",
        ]
        read_only_fields = fields

    def get_layers(self, obj: Artifact) -> list[str]:
        return sorted(
            b.digest for b in obj.blobs.all() if b.media_type.startswith(("application/vnd.oci.image.layer",))
        )


@extend_schema_field(TENANT_SLUG_SCHEMA)
class OwnerTenantField(TenantField):
    """The owner tenant of a new private image, by slug (images name it ``owner``, not ``tenant``)."""


class ImageSerializer(DefaultTenantMixin, StrictModelSerializer[Image]):
    tenant = OwnerTenantField(
        required=False, write_only=True, help_text="Owner of a private image (default: your only tenant)"
    )
    public = StrictBooleanField(
        required=False, default=False, help_text="Visible to every tenant; operators only"
    )
    owner: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="slug", read_only=True, allow_null=True
    )
    formats = serializers.SerializerMethodField()
    artifacts = ArtifactSerializer(many=True, read_only=True)

    class Meta:
        model = Image
        extra_kwargs = {
            "name": {"validators": [name_validator]},
            "version": {"validators": [version_validator]},
        }
        fields = [
            "id",
            "name",
            "version",
            "description",
            "os",
            "tenant",
            "public",
            "owner",
            "min_ram_mb",
            "min_disk_gb",
            "status",
            "status_reason",
            "formats",
            "artifacts",
            "created_at",
        ]
        read_only_fields = ["id", "owner", "status", "status_reason", "formats", "artifacts", "created_at"]
        # (name, version) uniqueness per owner is checked in validate(): the owner is derived
        validators: list[Any] = []

    def get_formats(self, obj: Image) -> list[str]:
        return sorted(obj.formats())

    def to_representation(self, instance: Image) -> dict[str, Any]:
        data = super().to_representation(instance)
        data["public"] = instance.owner_id is None
        return data

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        creating = self.instance is None
        if not creating:
            for field in ("name", "version", "tenant", "public"):
                if field in self.initial_data:
                    raise serializers.ValidationError({field: "Cannot be changed; upload a new version."})
            return attrs
        if attrs.get("public"):
            if not actor_for(self.context["request"]).is_operator:
                raise serializers.ValidationError({"public": "Only operators publish public images."})
            if "tenant" in self.initial_data:
                raise serializers.ValidationError({"tenant": "A public image has no owner tenant."})
            attrs.pop("tenant", None)
        else:
            attrs = super().validate(attrs)
        owner = attrs.get("tenant")
        clash = Image.objects.filter(name=attrs["name"], version=attrs["version"], owner=owner)
        if clash.exists():
            raise FieldConflict("version", _taken(attrs["name"], attrs["version"], owner))
        return attrs

    def create(self, validated_data: dict[str, Any]) -> Image:
        validated_data.pop("public", None)
        owner = validated_data.pop("tenant", None)
        try:
            with transaction.atomic():  # a savepoint: the request's transaction stays usable
                return Image.objects.create(owner=owner, **validated_data)
        except IntegrityError as exc:
            # Another request created the same name and version after validate() looked.
            name, version = validated_data["name"], validated_data["version"]
            raise FieldConflict("version", _taken(name, version, owner)) from exc


class ImageUpdateSerializer(StrictModelSerializer[Image]):
    """What PATCH on an image takes (the schema's request body): name, version and owner stay."""

    class Meta:
        model = Image
        fields = ["description", "os", "min_ram_mb", "min_disk_gb"]


def _taken(name: str, version: str, owner: Tenant | None) -> str:
    where = f"tenant {owner.slug}" if owner else "the public catalogue"
    return f"{name}:{version} already exists in {where}."


class UploadQuerySerializer(serializers.Serializer[Any]):
    type = serializers.ChoiceField(
        choices=["qcow2", "raw", "oci", "docker"],
        help_text="qcow2/raw: VM disk; oci: OCI image layout tar; docker: `docker save` archive (converted)",
    )
    sha256 = serializers.RegexField(
        r"^(sha256:)?[0-9a-f]{64}$", required=False, help_text="Expected sha256; the upload fails on mismatch"
    )
