"""Serializer fields that respect tenant scoping."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from portal.api.authentication import actor_for
from portal.tenancy.models import Tenant

#: a tenant slug in the schema (Tenant.slug is a SlugField of 50)
TENANT_SLUG_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 50}


class BoundedSlugMixin:
    """A reference by slug is a non-empty string no longer than its model field: anything else
    is invalid at once, neither looked up nor quoted back in the error (nor in the audit log).
    (DRF took ``0`` for ``"0"`` and ``""`` for null.)"""

    max_length = 50

    def run_validation(self, data: Any = serializers.empty) -> Any:
        if data == "":
            self.fail("invalid")  # type: ignore[attr-defined]
        return super().run_validation(data)  # type: ignore[misc]

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, str) or len(data) > self.max_length:
            self.fail("invalid")  # type: ignore[attr-defined]
        return super().to_internal_value(data)  # type: ignore[misc]


@extend_schema_field(TENANT_SLUG_SCHEMA)
class TenantSlugField(BoundedSlugMixin, serializers.SlugRelatedField):  # type: ignore[type-arg]
    """Any tenant by slug (operators' fields: a flavor's or a node's owner)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("slug_field", "slug")
        kwargs.setdefault("queryset", Tenant.objects.all())
        super().__init__(**kwargs)


@extend_schema_field(TENANT_SLUG_SCHEMA)
class TenantField(BoundedSlugMixin, serializers.SlugRelatedField):  # type: ignore[type-arg]
    """A tenant by slug, chosen among the tenants the requester belongs to.

    Another tenant's slug reads as unknown, exactly like a slug that does
    not exist, so nothing leaks.
    """

    default_error_messages = {
        "does_not_exist": "No tenant '{value}' that you belong to.",
        "invalid": "Invalid tenant slug.",
    }

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("slug_field", "slug")
        super().__init__(**kwargs)

    def get_queryset(self) -> Any:
        return Tenant.objects.restrict(actor_for(self.context["request"])).filter(active=True)


class DefaultTenantMixin:
    """Fill ``tenant`` with the requester's only tenant when a new object leaves it out.

    "New" is any validation without an instance: create, and dry runs such as
    the instance preview, which need the tenant just the same.
    """

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)  # type: ignore[misc]
        if "tenant" not in attrs and self.instance is None:  # type: ignore[attr-defined]
            actor = actor_for(self.context["request"])  # type: ignore[attr-defined]
            if len(actor.roles) != 1:
                raise serializers.ValidationError(
                    {"tenant": "Name the tenant (you belong to several, or none)."}
                )
            attrs["tenant"] = Tenant.objects.get(pk=actor.tenant_ids[0])
        return attrs
