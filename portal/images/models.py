"""Images tenants launch from, and their content-addressed artifacts."""

from __future__ import annotations

from django.db import models
from django.db.models import Q

from compute.spec import ImageFormat, ImageRef
from portal.images.choices import ArtifactFormat, ImageStatus
from portal.tenancy.models import Tenant
from portal.tenancy.querysets import Actor, TenantScopedQuerySet


class ImageQuerySet(TenantScopedQuerySet["Image"]):
    def restrict(self, actor: Actor) -> ImageQuerySet:
        """Public images plus the private images of the actor's tenants."""
        if actor.is_operator:
            return self
        return self.filter(Q(owner__isnull=True) | Q(owner_id__in=actor.tenant_ids))


class Image(models.Model):
    """A named, versioned image, public (no owner) or private to one tenant.

    It may carry a VM disk, a container artifact or both; ``kind=auto`` then
    has a choice.
    """

    name = models.CharField(max_length=100)
    version = models.CharField(max_length=40)
    description = models.TextField(blank=True)
    os = models.CharField(max_length=60, blank=True)
    owner = models.ForeignKey(Tenant, null=True, blank=True, on_delete=models.CASCADE, related_name="images")
    min_ram_mb = models.PositiveIntegerField(default=0)
    min_disk_gb = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=16, choices=ImageStatus.choices, default=ImageStatus.QUEUED)
    status_reason = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = ImageQuerySet.as_manager()

    class Meta:
        ordering = ["name", "-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["name", "version"],
                condition=Q(owner__isnull=True),
                name="image_unique_public_version",
            ),
            models.UniqueConstraint(fields=["owner", "name", "version"], name="image_unique_owner_version"),
        ]

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def is_public(self) -> bool:
        return self.owner_id is None

    def formats(self) -> set[str]:
        return {a.format for a in self.artifacts.all()}

    def artifact_for(self, kind: str) -> Artifact | None:
        """The artifact that runs this image as ``vm`` or ``container``."""
        wanted = ArtifactFormat.for_vm() if kind == "vm" else (ArtifactFormat.OCI,)
        for artifact in self.artifacts.all():
            if artifact.format in wanted:
                return artifact
        return None


class Artifact(models.Model):
    """One file of an image, addressed by the sha256 of its content."""

    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="artifacts")
    format = models.CharField(max_length=8, choices=ArtifactFormat.choices)
    digest = models.CharField(max_length=71, help_text="sha256:<hex>")
    size = models.PositiveBigIntegerField()
    location = models.CharField(max_length=500, help_text="Where nodes fetch it: absolute path or URL")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["image", "format"]
        constraints = [
            models.UniqueConstraint(fields=["image", "format"], name="artifact_unique_image_format"),
            models.CheckConstraint(condition=Q(digest__startswith="sha256:"), name="artifact_digest_sha256"),
        ]

    def __str__(self) -> str:
        return f"{self.image} {self.format} {self.digest[:19]}"

    def ref(self) -> ImageRef:
        return ImageRef(
            name=self.image.name,
            version=self.image.version,
            format=ImageFormat(self.format),
            digest=self.digest,
            location=self.location,
        )
