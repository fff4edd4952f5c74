"""Bearer tokens (``Authorization: Bearer sky_<id>_<secret>``) and the request's Actor."""

from __future__ import annotations

import datetime as dt
import hmac
import re
from typing import Any

from django.http import HttpRequest
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.request import Request

from portal.tenancy.models import APIToken, Membership
from portal.tenancy.querysets import Actor

_TOKEN_RE = re.compile(r"^sky_([0-9a-f]{16})_([A-Za-z0-9_-]{20,100})$")
_LAST_USED_RESOLUTION = dt.timedelta(minutes=1)


class BearerTokenAuthentication(BaseAuthentication):
    """Authenticates API tokens; their membership limits what they reach."""

    def authenticate(self, request: Request) -> tuple[Any, APIToken] | None:
        header = get_authorization_header(request).decode("latin-1").split()
        if not header or header[0].lower() != "bearer":
            return None
        if len(header) != 2:
            raise AuthenticationFailed("The Authorization header must be 'Bearer <token>'.")
        match = _TOKEN_RE.match(header[1])
        if match is None:
            raise AuthenticationFailed("Malformed API token: expected sky_<id>_<secret>.")
        token = (
            APIToken.objects.select_related("user", "membership", "membership__tenant")
            .filter(key_id=match[1])
            .first()
        )
        if token is None or not hmac.compare_digest(token.key_hash, APIToken.hash_secret(match[2])):
            raise AuthenticationFailed("Invalid API token.")
        if token.revoked_at is not None:
            raise AuthenticationFailed("This API token was revoked.")
        if token.is_expired:
            raise AuthenticationFailed(f"This API token expired at {token.expires_at:%Y-%m-%d %H:%M} UTC.")
        if not token.user.is_active:
            raise AuthenticationFailed("The token's user is disabled.")
        if token.membership is not None and not token.membership.tenant.active:
            raise AuthenticationFailed("The token's tenant is disabled.")
        now = timezone.now()
        if token.last_used_at is None or now - token.last_used_at > _LAST_USED_RESOLUTION:
            APIToken.objects.filter(pk=token.pk).update(last_used_at=now)
        return token.user, token

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="skyport"'


def user_id_of(request: Request | HttpRequest) -> int:
    """The authenticated user's id (permission classes ran before this is used)."""
    pk = request.user.pk
    if pk is None:
        raise AuthenticationFailed("Authentication required.")
    return int(pk)


def actor_for(request: Request | HttpRequest) -> Actor:
    """The Actor of an authenticated request (computed once per request).

    Works for DRF requests (bearer token or session) and for plain Django
    requests of the browser UI (session only).
    """
    django_request: Any = getattr(request, "_request", request)
    cached: Actor | None = getattr(django_request, "actor", None)
    if cached is not None:
        return cached
    user = request.user
    auth = getattr(request, "auth", None)  # DRF only; browser pages use the session
    token = auth if isinstance(auth, APIToken) else None
    if token is not None and token.membership is not None:
        membership: Membership = token.membership
        actor = Actor(user.pk, user.get_username(), False, {membership.tenant_id: membership.role})
    else:
        memberships = Membership.objects.filter(user_id=user_id_of(request), tenant__active=True)
        roles = dict(memberships.values_list("tenant_id", "role"))
        actor = Actor(user.pk, user.get_username(), bool(user.is_staff), roles)
    django_request.actor = actor
    return actor


class BearerTokenScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    """Documents the bearer token in the OpenAPI schema."""

    target_class = "portal.api.authentication.BearerTokenAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "bearerFormat": "sky_<id>_<secret>"}
