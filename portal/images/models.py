"""Images tenants launch from, and their content-addressed artifacts."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q

from compute.spec import ImageFormat, ImageRef
from portal.images.choices import ArtifactFormat, ImageStatus, ImportPhase
from portal.tenancy.models import Tenant
from portal.tenancy.querysets import Actor, TenantScopedQuerySet


class ImageQuerySet(TenantScopedQuerySet["Image"]):
    def restrict(self, actor: Actor) -> ImageQuerySet:
        """Public images plus the private images of the actor's tenants (never a migration's hidden one)."""
        shown = self.filter(hidden=False)
        if actor.is_operator:
            return shown
        return shown.filter(Q(owner__isnull=True) | Q(owner_id__in=actor.tenant_ids))


class Image(models.Model):
    """A named, versioned image, public (no owner) or private to one tenant.

    It may carry a VM disk, a container artifact or both; ``kind=auto`` then
    has a choice.
    """

    name = models.CharField(max_length=100)
    version = models.CharField(max_length=40)
    description = models.TextField(blank=True, max_length=2000)
    os = models.CharField(max_length=60, blank=True)
    owner = models.ForeignKey(Tenant, null=True, blank=True, on_delete=models.CASCADE, related_name="images")
    min_ram_mb = models.PositiveIntegerField(default=0)
    min_disk_gb = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=16, choices=ImageStatus.choices, default=ImageStatus.QUEUED)
    status_reason = models.CharField(max_length=255, blank=True)
    # The import that holds the image while it is ``importing`` (see portal.images.services):
    # a token only that upload and its import task know, where it is, and when it last moved.
    import_id = models.CharField(max_length=32, blank=True, default="")
    import_phase = models.CharField(max_length=12, choices=ImportPhase.choices, blank=True, default="")
    import_updated_at = models.DateTimeField(null=True, blank=True)
    source_instance = models.ForeignKey(
        "cloud.Instance",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="published_images",
        help_text="The VM whose disk this image was published from",
    )
    # A VM's disk on its way to another node (a drain's cold migration): never listed or
    # launched, deleted when the move ends (portal/cloud/vm_migration.py).
    hidden = models.BooleanField(default=False)
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


class Blob(models.Model):
    """One file in the content-addressed store, shared by every artifact that uses it."""

    digest = models.CharField(max_length=71, primary_key=True, help_text="sha256:<hex>")
    size = models.PositiveBigIntegerField()
    media_type = models.CharField(max_length=100)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(digest__startswith="sha256:"), name="blob_digest_sha256")
        ]

    def __str__(self) -> str:
        return f"{self.digest[:19]} {self.media_type}"


class Artifact(models.Model):
    """One runnable form of an image: a VM disk or an OCI image.

    ``digest`` is the disk's sha256, or the OCI manifest's; ``blobs`` are the
    stored files (the disk; the manifest, config and layers).  Nodes fetch
    them from the portal by digest.  ``source_digest`` is the sha256 of the
    file as it was uploaded (the archive, for container images).
    """

    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="artifacts")
    format = models.CharField(max_length=8, choices=ArtifactFormat.choices)
    digest = models.CharField(max_length=71, help_text="sha256:<hex>")
    size = models.PositiveBigIntegerField(help_text="Bytes stored (all blobs)")
    virtual_size = models.PositiveBigIntegerField(default=0, help_text="Disk size the guest sees (VM disks)")
    source_digest = models.CharField(max_length=71, blank=True)
    # Container images: the runtime part of the image config (compute.layers.ImageConfig as a
    # dict: entrypoint, cmd, env, working_dir, user, exposed_ports, stop_signal), recorded at
    # import so the API can check launch overrides and offer the exposed ports.
    config = models.JSONField(default=dict, blank=True)
    blobs = models.ManyToManyField(Blob, related_name="artifacts")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["image", "format"]
        constraints = [
            models.UniqueConstraint(fields=["image", "format"], name="artifact_unique_image_format"),
            models.CheckConstraint(condition=Q(digest__startswith="sha256:"), name="artifact_digest_sha256"),
        ]

    def __str__(self) -> str:
        return f"{self.image} {self.format} {self.digest[:19]}"

    def location(self) -> str:
        """Where nodes fetch it: the portal's blob endpoint (node-key authenticated)."""
        return f"{settings.SKYPORT_PORTAL_URL}/api/v1/blobs/{self.digest}"

    def ref(self) -> ImageRef:
        return ImageRef(
            name=self.image.name,
            version=self.image.version,
            format=ImageFormat(self.format),
            digest=self.digest,
            location=self.location(),
        )
