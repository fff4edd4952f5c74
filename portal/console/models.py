"""A console session: the single-use ticket it starts from, then its audit record."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

from compute.spec import ConsoleMode
from portal.cloud.models import Instance
from portal.tenancy.models import Tenant
from portal.tenancy.querysets import TenantScopedQuerySet

MODE_CHOICES = [(m.value, m.value) for m in ConsoleMode]


class ConsoleSession(models.Model):
    """One console session of one user on one instance.

    Minted with a ticket (only its SHA-256 is stored) that expires after
    ``SKYPORT_CONSOLE_TICKET_SECONDS`` and can be redeemed once, by one
    WebSocket; ``started_at`` is the redemption.  ``ended_at`` and
    ``end_reason`` are written by the relay when the socket closes.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="console_sessions")
    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="console_sessions")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="console_sessions"
    )
    mode = models.CharField(max_length=8, choices=MODE_CHOICES)
    command = models.JSONField(default=list, blank=True)
    ticket_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    end_reason = models.CharField(max_length=255, blank=True)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.mode} console of {self.instance_id} by {self.user_id}"

    @property
    def hub(self) -> str:
        """The node's hub: a VM's serial console is shared by its viewers, an exec is its own."""
        return str(self.instance_id) if self.mode != ConsoleMode.EXEC else str(self.id)
