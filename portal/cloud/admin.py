from typing import Any

from django.contrib import admin
from django.db import models
from django.http import HttpRequest

from portal.cloud import networks
from portal.cloud.models import ComputeNode, Flavor, Instance, Network, UnsentMessage
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
    # user data: the API's and the launch form's bound (16 KiB)
    formfield_overrides = {**JSON_FIELD_OVERRIDES, models.TextField: {"max_length": 16384}}
    exclude = ["env"]  # launch environment values may be secrets: names only

    @admin.display(description="Environment (names; values hidden)")
    def env_names(self, obj: Instance) -> str:
        return ", ".join(sorted(obj.env)) or "-"

    # Instances live on nodes: a row added, changed or deleted here would not reach them.
    # Launch, act and delete through the API or the web UI (they go through the services).
    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False


@admin.register(Network)
class NetworkAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Operators switch a network's egress here; its nodes are told at once."""

    list_display = ["tenant", "name", "cidr", "host_address", "vni", "egress"]
    list_filter = ["egress", "tenant"]
    search_fields = ["name", "cidr", "tenant__slug"]
    fields = ["tenant", "name", "cidr", "bridge", "vni", "host_address", "mtu", "egress"]
    readonly_fields = ["tenant", "name", "cidr", "bridge", "vni", "host_address", "mtu"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: Network, form: Any, change: bool) -> None:
        networks.set_egress(obj, None, obj.egress)


@admin.register(UnsentMessage)
class UnsentMessageAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Node messages the broker refused, waiting for the sweep to send them (read-only; deleting
    one drops it: its instance then fails at its task deadline)."""

    list_display = ["id", "queue", "task", "created_at", "attempts", "last_error"]
    list_filter = ["queue", "task"]
    readonly_fields = ["queue", "task", "args", "created_at", "attempts", "last_error", "claimed_until"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
