from django.contrib import admin
from django.db import models

from portal.cloud.models import ComputeNode, Flavor, Instance
from portal.jsonforms import JSON_FIELD_OVERRIDES


@admin.register(Flavor)
class FlavorAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["name", "vcpus", "ram_mb", "disk_gb", "is_public", "tenant"]
    list_filter = ["is_public", "tenant"]
    search_fields = ["name"]


@admin.register(ComputeNode)
class ComputeNodeAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = [
        "name",
        "tenancy",
        "owner",
        "status",
        "tunnel_address",
        "vcpus",
        "ram_mb",
        "disk_gb",
        "last_heartbeat",
    ]
    list_filter = ["tenancy", "status", "owner"]
    search_fields = ["name", "queue"]
    formfield_overrides = JSON_FIELD_OVERRIDES


@admin.register(Instance)
class InstanceAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["name", "tenant", "kind", "vm_state", "task_state", "power_state", "node", "created_at"]
    list_filter = ["kind", "vm_state", "task_state", "power_state", "tenant", "node"]
    search_fields = ["name", "id", "image", "tenant__slug"]
    readonly_fields = ["id", "created_at", "updated_at", "deleted_at", "env_names"]
    exclude = ["env"]  # launch environment values may be secrets: names only

    @admin.display(description="Environment (names; values hidden)")
    def env_names(self, obj: Instance) -> str:
        return ", ".join(sorted(obj.env)) or "-"

    # user data: the API's and the launch form's bound (16 KiB)
    formfield_overrides = {**JSON_FIELD_OVERRIDES, models.TextField: {"max_length": 16384}}
