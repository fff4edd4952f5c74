from __future__ import annotations

import datetime as dt
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from portal.api.authentication import actor_for
from portal.api.conflicts import FieldConflict
from portal.api.fields import BoundedSlugMixin, DefaultTenantMixin, TenantField
from portal.api.strict import StrictBooleanField, StrictIntegerField, StrictModelSerializer
from portal.cloud import placement
from portal.cloud.models import Network
from portal.storage.volumes import usage as volume_usage
from portal.tenancy.models import APIToken, Membership, Quota, SSHKey, Tenant


class TenantSerializer(StrictModelSerializer[Tenant]):
    active = StrictBooleanField(required=False)

    class Meta:
        model = Tenant
        fields = ["id", "slug", "name", "active", "created_at"]
        read_only_fields = ["id", "created_at"]
        # a slug in use is a conflict (409), in validate_slug()
        extra_kwargs: dict[str, Any] = {"slug": {"validators": []}}

    def validate_slug(self, value: str) -> str:
        taken = Tenant.objects.filter(slug=value)
        if self.instance is not None:
            taken = taken.exclude(pk=self.instance.pk)
        if taken.exists():
            raise FieldConflict("slug", f"A tenant with the slug {value!r} exists already.")
        return value


@extend_schema_field({"type": "string", "minLength": 1, "maxLength": 150})  # Django's username
class AddableUserField(BoundedSlugMixin, serializers.SlugRelatedField):  # type: ignore[type-arg]
    """A user by name, among those the requester may add to a tenant.

    Operators add anyone.  Everyone else sees only the users who already
    share one of their tenants (a token: its tenant): any other name reads
    as unknown, with the very same answer as a name nobody has, so the
    endpoint cannot be used to find out which user names exist.
    """

    default_error_messages = {
        "does_not_exist": "No user '{value}' that you can add. Tenant admins add users who already "
        "belong to one of their tenants; an operator adds anyone else.",
        "invalid": "Invalid user name.",
    }

    max_length = 150

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("slug_field", "username")
        super().__init__(**kwargs)

    def get_queryset(self) -> Any:
        actor = actor_for(self.context["request"])
        users = get_user_model().objects.filter(is_active=True)
        if actor.is_operator:
            return users
        return users.filter(memberships__tenant_id__in=actor.tenant_ids).distinct()


class MembershipSerializer(DefaultTenantMixin, StrictModelSerializer[Membership]):
    tenant = TenantField(required=False, help_text="Default: your only tenant (a token's tenant)")
    user = AddableUserField(
        help_text="User name. Tenant admins add users who already belong to one of their tenants "
        "(any other name reads as unknown); operators add anyone."
    )

    class Meta:
        model = Membership
        fields = ["id", "tenant", "user", "role", "created_at"]
        read_only_fields = ["id", "created_at"]
        # DRF derives a unique-together validator from the (user, tenant) constraint, which makes
        # ``tenant`` required before DefaultTenantMixin can fill it in: checked in validate().
        validators: list[Any] = []

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        if (
            self.instance is None
            and Membership.objects.filter(user=attrs["user"], tenant=attrs["tenant"]).exists()
        ):
            raise FieldConflict(
                "user", f"{attrs['user'].get_username()} is already a member of {attrs['tenant'].slug}."
            )
        if (
            self.instance is not None
            and ("tenant" in attrs or "user" in attrs)
            and (
                attrs.get("tenant", self.instance.tenant) != self.instance.tenant
                or attrs.get("user", self.instance.user) != self.instance.user
            )
        ):
            raise serializers.ValidationError("Only the role of a membership can change.")
        return attrs


class MembershipRoleSerializer(StrictModelSerializer[Membership]):
    """What PATCH on a membership takes (the schema's request body): only the role changes."""

    class Meta:
        model = Membership
        fields = ["role"]


class QuotaSerializer(StrictModelSerializer[Quota]):
    tenant: serializers.SlugRelatedField[Quota] = serializers.SlugRelatedField(
        slug_field="slug", read_only=True
    )
    usage = serializers.SerializerMethodField()

    class Meta:
        model = Quota
        fields = ["id", "tenant", *Quota.LIMITS, *Quota.VOLUME_LIMITS, "networks", "usage"]
        read_only_fields = ["id", "tenant"]

    def get_usage(self, obj: Quota) -> dict[str, int]:
        networks = Network.objects.filter(tenant_id=obj.tenant_id).count()
        return placement.usage(obj.tenant_id) | volume_usage(obj.tenant_id) | {"networks": networks}


class SSHKeySerializer(StrictModelSerializer[SSHKey]):
    class Meta:
        model = SSHKey
        fields = ["id", "name", "public_key", "fingerprint", "created_at"]
        read_only_fields = ["id", "fingerprint", "created_at"]


class APITokenSerializer(StrictModelSerializer[APIToken]):
    tenant = TenantField(required=False, allow_null=True, source="membership.tenant")
    role = serializers.CharField(source="membership.role", read_only=True, default=None)
    expires_in_days = StrictIntegerField(write_only=True, min_value=1, default=30)
    key = serializers.SerializerMethodField(help_text="The token, returned once at creation and never again.")

    class Meta:
        model = APIToken
        fields = [
            "id",
            "name",
            "tenant",
            "role",
            "key",
            "expires_in_days",
            "created_at",
            "expires_at",
            "last_used_at",
            "revoked_at",
        ]
        read_only_fields = ["id", "created_at", "expires_at", "last_used_at", "revoked_at"]

    def get_key(self, obj: APIToken) -> str | None:
        return getattr(obj, "plain_key", None)

    def validate_expires_in_days(self, value: int) -> int:
        limit = settings.SKYPORT_TOKEN_MAX_DAYS
        if value > limit:
            raise serializers.ValidationError(f"At most {limit} days.")
        return value

    def create(self, validated: dict[str, Any]) -> APIToken:
        request = self.context["request"]
        actor = actor_for(request)
        tenant = validated.get("membership", {}).get("tenant")
        membership = None
        if tenant is not None:
            membership = Membership.objects.filter(user=request.user, tenant=tenant).first()
            if membership is None:
                raise serializers.ValidationError({"tenant": "You are not a member of that tenant."})
        elif not actor.is_operator:
            raise serializers.ValidationError({"tenant": "Name the tenant this token acts in."})
        token = APIToken(
            user=request.user,
            membership=membership,
            name=validated["name"],
            expires_at=timezone.now() + dt.timedelta(days=validated["expires_in_days"]),
        )
        token.plain_key = token.issue()  # type: ignore[attr-defined]
        token.save()
        return token
