"""Tenants, who belongs to them, what they may use, and how they authenticate."""

from __future__ import annotations

import base64
import hashlib
import secrets
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, rsa
from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone

from compute.spec import ID_RANGE_MIN, ID_RANGE_SIZE
from portal.tenancy.choices import Role
from portal.tenancy.querysets import TenantScopedQuerySet


class TenantQuerySet(TenantScopedQuerySet["Tenant"]):
    tenant_field = "id"


class Tenant(models.Model):
    """An organisation whose users share instances, networks and a quota."""

    slug = models.SlugField(max_length=50, unique=True)
    name = models.CharField(max_length=200)
    active = models.BooleanField(default=True)
    network_egress = models.BooleanField(
        default=True,
        db_default=True,
        help_text="Operators: the tenant's networks may reach the outside through the nodes' uplinks",
    )
    security_serial = models.PositiveBigIntegerField(
        default=0,
        db_default=0,
        help_text="Raised before each resolution of the tenant's security rules (nodes keep the newest)",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TenantQuerySet.as_manager()

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug

    @property
    def id_base(self) -> int:
        """Host uid/gid of root in this tenant's containers (docs/container-driver.md).

        One 65536-id range per tenant, the same on every node, so files its
        containers write (volumes) keep their owners from one container to the
        next.  Raises ValueError past the 65 279th tenant (the id space ends).
        """
        base = ID_RANGE_MIN + self.pk * ID_RANGE_SIZE
        if base + ID_RANGE_SIZE > 2**32:
            raise ValueError(f"tenant {self.slug} has no container id range left (pk {self.pk})")
        return base


class Membership(models.Model):
    """A user's role in one tenant."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["tenant__slug", "user__username"]
        constraints = [
            models.UniqueConstraint(fields=["user", "tenant"], name="membership_unique_user_tenant")
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.tenant} ({self.role})"


class Quota(models.Model):
    """Limits of one tenant; usage is counted from its live instances."""

    tenant = models.OneToOneField(Tenant, on_delete=models.CASCADE, related_name="quota")
    instances = models.PositiveIntegerField()
    vcpus = models.PositiveIntegerField()
    ram_mb = models.PositiveIntegerField()
    disk_gb = models.PositiveIntegerField()
    containers = models.PositiveIntegerField()
    vms = models.PositiveIntegerField()
    volumes = models.PositiveIntegerField(default=10, help_text="Volumes the tenant may have")
    volume_gb = models.PositiveIntegerField(default=100, help_text="Total size of its volumes in GB")
    published_ports = models.PositiveIntegerField(default=10, db_default=10)
    networks = models.PositiveIntegerField(
        default=5, db_default=5, help_text="Networks the tenant may have (its default network counts)"
    )

    objects = TenantScopedQuerySet.as_manager()

    #: what an instance create uses (``placement.quota_effect``)
    LIMITS = ("instances", "vcpus", "ram_mb", "disk_gb", "containers", "vms")
    #: what a volume create or extend uses (``portal.storage.volumes``)
    VOLUME_LIMITS = ("volumes", "volume_gb")

    class Meta:
        ordering = ["tenant__slug"]

    def __str__(self) -> str:
        return f"quota of {self.tenant}"

    @classmethod
    def defaults(cls) -> dict[str, int]:
        return dict(settings.SKYPORT_DEFAULT_QUOTA)


def ssh_key_fingerprint(public_key: str) -> str:
    """OpenSSH SHA256 fingerprint of a public key line (validated first)."""
    blob = base64.b64decode(public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def validate_ssh_public_key(value: str) -> None:
    """Accept one OpenSSH public key line of a modern type, else raise."""
    line = value.strip()
    if "\n" in line or "\r" in line:
        raise ValidationError("Paste exactly one public key line.")
    parts = line.split()
    if len(parts) < 2:
        raise ValidationError("Expected '<type> <base64> [comment]', as in ~/.ssh/id_ed25519.pub.")
    if parts[0].startswith("-----") or "PRIVATE" in line:
        raise ValidationError("This looks like a private key; paste the .pub file instead.")
    try:
        key = load_ssh_public_key(f"{parts[0]} {parts[1]}".encode())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValidationError(f"Not a valid OpenSSH public key: {exc}") from exc
    if isinstance(key, dsa.DSAPublicKey):
        raise ValidationError("DSA keys are obsolete; use ed25519 or RSA of 2048 bits or more.")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise ValidationError(f"RSA key of {key.key_size} bits is too short; 2048 or more is required.")


class SSHKey(models.Model):
    """A user's public key, injected into the VMs they launch."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="ssh_keys")
    name = models.CharField(max_length=100)
    # an OpenSSH line: 16384-bit RSA is ~2.8 KB of base64, the rest is the comment
    public_key = models.TextField(max_length=8192, validators=[validate_ssh_public_key])
    fingerprint = models.CharField(max_length=80, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["user__username", "name"]
        constraints = [
            models.UniqueConstraint(fields=["user", "name"], name="sshkey_unique_user_name"),
            models.UniqueConstraint(fields=["user", "fingerprint"], name="sshkey_unique_user_fingerprint"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.fingerprint})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        self.public_key = self.public_key.strip()
        self.fingerprint = ssh_key_fingerprint(self.public_key)
        super().save(*args, **kwargs)


TOKEN_PREFIX = "sky_"  # noqa: S105 -- a public prefix, not a secret


class APITokenQuerySet(models.QuerySet["APIToken"]):
    def usable(self) -> APITokenQuerySet:
        return self.filter(revoked_at__isnull=True, expires_at__gt=timezone.now())


class APIToken(models.Model):
    """A bearer token for automation, tied to one membership, with an expiry.

    Only a SHA-256 of the secret is stored; the secret is shown once.  A
    token with no membership is an operator token and needs a staff user.
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    membership = models.ForeignKey(
        Membership, on_delete=models.CASCADE, null=True, blank=True, related_name="tokens"
    )
    name = models.CharField(max_length=100)
    key_id = models.CharField(max_length=16, unique=True, editable=False)
    key_hash = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = APITokenQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.name} ({TOKEN_PREFIX}{self.key_id}…)"

    @staticmethod
    def hash_secret(secret: str) -> str:
        return hashlib.sha256(secret.encode()).hexdigest()

    def issue(self) -> str:
        """Give the token a fresh secret; returns the full key (shown once)."""
        self.key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        self.key_hash = self.hash_secret(secret)
        return f"{TOKEN_PREFIX}{self.key_id}_{secret}"

    @property
    def is_expired(self) -> bool:
        return self.expires_at <= timezone.now()
