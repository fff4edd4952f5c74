"""Tenant scoping, in one place.

Every tenant-owned model's default manager is built from
:class:`TenantScopedQuerySet`; the API's base viewset calls
:meth:`TenantScopedQuerySet.restrict` for every request, so no view can forget
it.  Objects of a tenant the actor does not belong to simply do not exist for
that actor (404).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TypeVar

from django.db import models

from portal.tenancy.choices import Role

_M = TypeVar("_M", bound=models.Model)


@dataclasses.dataclass(frozen=True)
class Actor:
    """Who is acting: a user, their roles per tenant id, and operator status.

    A token tied to a membership narrows ``roles`` to that one tenant and
    drops operator powers, so the token cannot act anywhere else.
    """

    user_id: int | None
    username: str
    is_operator: bool
    roles: Mapping[int, str]

    @property
    def tenant_ids(self) -> list[int]:
        return list(self.roles)

    def role_in(self, tenant_id: int | None) -> str | None:
        if tenant_id is None:
            return None
        return self.roles.get(tenant_id)

    def can(self, tenant_id: int | None, min_role: str) -> bool:
        """Whether the actor has at least ``min_role`` in the tenant (operators always)."""
        if self.is_operator:
            return True
        return Role.rank(self.role_in(tenant_id)) >= Role.rank(min_role)


class TenantScopedQuerySet(models.QuerySet[_M]):
    """A queryset that knows which field points at the owning tenant."""

    tenant_field = "tenant"

    def restrict(self, actor: Actor) -> TenantScopedQuerySet[_M]:
        """Only the rows of tenants the actor belongs to (all for operators)."""
        if actor.is_operator:
            return self
        return self.filter(**{f"{self.tenant_field}__in": actor.tenant_ids})
