"""What the usage, price and budget endpoints accept and return."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from portal.api.fields import DefaultTenantMixin, TenantField
from portal.api.filters import UTCDateTimeField
from portal.api.strict import QuerySerializer, StrictCharField, StrictModelSerializer, StrictSlugField
from portal.metering.models import Budget, PriceSheet
from portal.metering.reports import GROUPS


class UTCDateTimeSerializerField(serializers.DateTimeField):
    """A query's date and time, moved to UTC (PostgreSQL refuses some offsets; see UTCDateTimeField)."""

    def to_internal_value(self, value: Any) -> Any:
        if not isinstance(value, str):
            self.fail("invalid", format="ISO 8601")
        parsed = super().to_internal_value(value)
        return UTCDateTimeField().to_python(parsed)


@extend_schema_field(
    {"type": "string", "format": "decimal", "pattern": r"^\d{1,8}(\.\d{1,6})?$", "maxLength": 15}
)
class PriceField(serializers.DecimalField):
    """A price: at most 6 digits before the point and 6 after, never negative."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(max_digits=12, decimal_places=6, min_value=Decimal(0), **kwargs)


@extend_schema_field(
    {"type": "string", "format": "decimal", "pattern": r"^\d{1,12}(\.\d{1,2})?$", "maxLength": 15}
)
class AmountField(serializers.DecimalField):
    """An amount of money with cents, above zero."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(max_digits=14, decimal_places=2, min_value=Decimal("0.01"), **kwargs)


@extend_schema_field({"type": "string", "format": "date", "maxLength": 10})
class BoundedDateField(serializers.DateField):
    """A date (YYYY-MM-DD)."""


class UsageQuerySerializer(QuerySerializer):
    """``tenant`` (slug; optional with one membership), ``from``/``to`` (ISO 8601; default: this month
    so far), ``group_by`` (instance, kind, day or month)."""

    tenant = StrictSlugField(required=False, max_length=50)
    group_by = serializers.ChoiceField(choices=GROUPS, default="instance")

    def get_fields(self) -> dict[str, Any]:
        fields = super().get_fields()
        # "from" is a keyword in Python: declared here
        fields["from"] = UTCDateTimeSerializerField(required=False)
        fields["to"] = UTCDateTimeSerializerField(required=False)
        return fields

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        start, end = attrs.get("from"), attrs.get("to")
        if start is not None and end is not None and end <= start:
            raise serializers.ValidationError({"to": "'to' must be after 'from'."})
        if start is not None and end is not None and (end - start).days > 3 * 366:
            raise serializers.ValidationError({"to": "A report covers at most three years."})
        return attrs


class UsageLineSerializer(serializers.Serializer):  # type: ignore[type-arg]
    key = serializers.CharField(
        help_text="group_by=instance: the instance's id (its published ports included) or volume:<id>"
    )
    name = serializers.CharField()
    kind = serializers.CharField(help_text="vm, container or volume (group_by instance and kind; else empty)")
    running_hours = serializers.DecimalField(max_digits=20, decimal_places=6)
    covered_hours = serializers.DecimalField(max_digits=20, decimal_places=6)
    gap_hours = serializers.DecimalField(max_digits=20, decimal_places=6)
    vcpu_hours = serializers.DecimalField(max_digits=20, decimal_places=6)
    memory_gib_hours = serializers.DecimalField(max_digits=20, decimal_places=6)
    used_memory_gib_hours = serializers.DecimalField(max_digits=20, decimal_places=6)
    disk_gb_months = serializers.DecimalField(max_digits=20, decimal_places=6)
    address_months = serializers.DecimalField(
        max_digits=20, decimal_places=6, help_text="published ports x months (730 h) published"
    )
    cpu_seconds = serializers.DecimalField(max_digits=20, decimal_places=3)
    cost_memory = serializers.DecimalField(max_digits=20, decimal_places=2)
    cost_vcpu = serializers.DecimalField(max_digits=20, decimal_places=2)
    cost_disk = serializers.DecimalField(max_digits=20, decimal_places=2)
    cost_addresses = serializers.DecimalField(max_digits=20, decimal_places=2)
    cost = serializers.DecimalField(max_digits=20, decimal_places=2)


class UsageReportSerializer(serializers.Serializer):  # type: ignore[type-arg]
    tenant = serializers.CharField()
    start = serializers.DateTimeField()
    end = serializers.DateTimeField()
    group_by = serializers.CharField()
    currency = serializers.CharField()
    month_so_far = serializers.DecimalField(max_digits=20, decimal_places=2)
    month_forecast = serializers.DecimalField(max_digits=20, decimal_places=2)
    lines = UsageLineSerializer(many=True)
    total = UsageLineSerializer()


class PriceSheetSerializer(StrictModelSerializer[PriceSheet]):
    currency = StrictCharField(max_length=3, min_length=3, required=False)
    effective_from = BoundedDateField()
    memory_gib_hour = PriceField(required=False)
    vcpu_hour = PriceField(required=False)
    disk_gb_month = PriceField(required=False)
    address_month = PriceField(required=False)

    class Meta:
        model = PriceSheet
        fields = [
            "id",
            "effective_from",
            "currency",
            "memory_gib_hour",
            "memory_basis",
            "vcpu_hour",
            "disk_gb_month",
            "address_month",
            "note",
            "created_at",
        ]
        read_only_fields = ["id", "created_at"]


class BudgetSerializer(DefaultTenantMixin, StrictModelSerializer[Budget]):
    tenant = TenantField()
    monthly_amount = AmountField()

    class Meta:
        model = Budget
        fields = ["id", "tenant", "monthly_amount", "warned_month", "warned_percent"]
        read_only_fields = ["id", "warned_month", "warned_percent"]
