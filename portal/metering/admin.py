"""Admin console: operators edit price sheets and budgets; samples and rollups are read-only there."""

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from portal.metering.models import Budget, PriceSheet, UsageSample


@admin.register(PriceSheet)
class PriceSheetAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = [
        "effective_from",
        "currency",
        "memory_gib_hour",
        "memory_basis",
        "vcpu_hour",
        "disk_gb_month",
        "address_month",
        "note",
    ]
    exclude = ["created_by"]

    def save_model(self, request: HttpRequest, obj: PriceSheet, form: Any, change: bool) -> None:
        if not change:
            obj.created_by = request.user  # type: ignore[assignment]
        super().save_model(request, obj, form, change)


@admin.register(Budget)
class BudgetAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["tenant", "monthly_amount", "warned_month", "warned_percent"]
    readonly_fields = ["warned_month", "warned_percent"]


@admin.register(UsageSample)
class UsageSampleAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Raw samples, for looking into a bill; never edited (rollups are rebuilt from them)."""

    list_display = ["instance", "at", "source", "node", "running", "memory_bytes", "cpu_time_ns"]
    list_filter = ["source", "running"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
