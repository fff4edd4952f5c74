from django.contrib import admin

from portal.images.models import Artifact, Image


class ArtifactInline(admin.TabularInline):  # type: ignore[type-arg]
    model = Artifact
    extra = 0
    readonly_fields = ["digest", "size", "created_at"]


@admin.register(Image)
class ImageAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["name", "version", "owner", "status", "os", "created_at"]
    list_filter = ["status", "owner"]
    search_fields = ["name", "version", "description"]
    readonly_fields = ["import_id", "import_phase", "import_updated_at"]
    inlines = [ArtifactInline]


@admin.register(Artifact)
class ArtifactAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["image", "format", "digest", "size", "created_at"]
    list_filter = ["format"]
    search_fields = ["digest", "image__name"]
