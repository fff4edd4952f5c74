from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from portal.tenancy.models import APIToken, Membership, Quota, SSHKey, Tenant


class MembershipInline(admin.TabularInline):  # type: ignore[type-arg]
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


class QuotaInline(admin.StackedInline):  # type: ignore[type-arg]
    model = Quota
    can_delete = False


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["slug", "name", "active", "network_egress", "created_at"]
    list_filter = ["active", "network_egress"]
    search_fields = ["slug", "name"]
    inlines = [QuotaInline, MembershipInline]

    def save_model(self, request: HttpRequest, obj: Tenant, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if change and "network_egress" in form.changed_data:
            from portal.cloud.networks import set_egress  # tenancy does not import cloud at module level

            set_egress(None, obj, obj.network_egress)


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["user", "tenant", "role", "created_at"]
    list_filter = ["role", "tenant"]
    search_fields = ["user__username", "tenant__slug"]
    autocomplete_fields = ["user", "tenant"]


@admin.register(Quota)
class QuotaAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["tenant", *Quota.LIMITS]
    search_fields = ["tenant__slug"]


@admin.register(SSHKey)
class SSHKeyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["name", "user", "fingerprint", "created_at"]
    search_fields = ["name", "user__username", "fingerprint"]
    readonly_fields = ["fingerprint"]


@admin.register(APIToken)
class APITokenAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["name", "user", "membership", "key_id", "expires_at", "last_used_at", "revoked_at"]
    list_filter = ["revoked_at", "expires_at"]
    search_fields = ["name", "user__username", "key_id"]
    readonly_fields = ["key_id", "key_hash", "last_used_at"]
