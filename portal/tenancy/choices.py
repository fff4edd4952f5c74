"""Choices of the tenancy app."""

from django.db import models


class Role(models.TextChoices):
    """A member's role in a tenant; later roles include earlier ones."""

    VIEWER = "viewer", "Viewer"
    MEMBER = "member", "Member"
    ADMIN = "admin", "Tenant admin"

    @classmethod
    def rank(cls, role: str | None) -> int:
        order = {cls.VIEWER: 1, cls.MEMBER: 2, cls.ADMIN: 3}
        return order.get(role, 0) if role else 0  # type: ignore[call-overload]
