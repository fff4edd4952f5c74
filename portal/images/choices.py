from django.db import models


class ImageStatus(models.TextChoices):
    QUEUED = "queued"
    IMPORTING = "importing"
    ACTIVE = "active"
    FAILED = "failed"


class ImportPhase(models.TextChoices):
    """Where the current import of an image is (blank when none runs)."""

    NONE = "", "none"
    RECEIVING = "receiving", "receiving the file"
    QUEUED = "queued", "queued for import"
    VALIDATING = "validating", "validating"


class ArtifactFormat(models.TextChoices):
    """What an artifact is; ``qcow2``/``raw`` boot VMs, ``oci`` runs containers."""

    QCOW2 = "qcow2", "qcow2 disk (VM)"
    RAW = "raw", "raw disk (VM)"
    OCI = "oci", "OCI image archive (container)"

    @classmethod
    def for_vm(cls) -> tuple[str, ...]:
        return (cls.QCOW2, cls.RAW)
