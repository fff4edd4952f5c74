from django.contrib import admin

from portal.audit.models import Event


@admin.register(Event)
class EventAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = [
        "created_at",
        "actor_name",
        "tenant",
        "action",
        "object_repr",
        "outcome",
        "status_code",
        "source_ip",
    ]
    list_filter = ["outcome", "action", "tenant", "object_type"]
    search_fields = ["action", "object_repr", "object_id", "request_id", "actor_name", "message"]
    date_hierarchy = "created_at"

    def has_change_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return False  # the audit log is append-only

    def has_add_permission(self, request):  # type: ignore[no-untyped-def]
        return False
