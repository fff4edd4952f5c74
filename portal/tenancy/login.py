"""Login rate limiting, at the authentication backend so it covers every login form.

Failed logins are counted per username and per client address in Django's
cache (Redis in deployments, so all gunicorn workers share the counts).
After ``SKYPORT_LOGIN_MAX_FAILURES`` failures within a window of
``SKYPORT_LOGIN_WINDOW_SECONDS`` (the window starts at the first failure),
further attempts for that username or from that address are refused, even
with the right password, until the window has passed.  Every refusal is an
audit Event.  The backend refuses with ``PermissionDenied``, the contract
``django.contrib.auth.authenticate`` has for it, and leaves the reason on the
request for :class:`LoginForm` to show.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.models import User
from django.core.cache import cache
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest

from portal.audit.log import record
from portal.audit.models import Outcome
from portal.audit.record import client_ip

log = logging.getLogger(__name__)

REFUSAL_ATTR = "login_refused"


def _keys(request: HttpRequest | None, username: str) -> list[str]:
    digest = hashlib.sha256(username.casefold().encode()).hexdigest()[:32]
    keys = [f"login-failures:user:{digest}"]
    ip = client_ip(request) if request is not None else None
    if ip:
        keys.append(f"login-failures:ip:{ip}")
    return keys


def _refusal_message() -> str:
    minutes = max(1, round(settings.SKYPORT_LOGIN_WINDOW_SECONDS / 60))
    return (
        "Too many failed logins for this account or from this address. "
        f"Try again in {minutes} minute{'s' if minutes != 1 else ''}."
    )


class RateLimitedModelBackend(ModelBackend):
    """``ModelBackend`` that refuses logins after too many recent failures."""

    def authenticate(
        self,
        request: HttpRequest | None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> User | None:
        if username is None or password is None:
            return super().authenticate(request, username, password, **kwargs)
        keys = _keys(request, username)
        if self._locked(keys):
            self._refuse(request, username)
        user = super().authenticate(request, username, password, **kwargs)
        if user is None:
            self._count_failure(keys)
        else:
            self._forget(keys[:1])  # the account's own count; the address keeps its count
        return user

    @staticmethod
    def _locked(keys: list[str]) -> bool:
        try:
            counts = cache.get_many(keys)
        except Exception:  # the cache is down: log in without the limit rather than lock everyone out
            log.exception("login rate limit: cache unavailable, not enforcing")
            return False
        return any(int(n) >= settings.SKYPORT_LOGIN_MAX_FAILURES for n in counts.values())

    @staticmethod
    def _count_failure(keys: list[str]) -> None:
        window = settings.SKYPORT_LOGIN_WINDOW_SECONDS
        try:
            for key in keys:
                # add() starts the window at the first failure; incr() keeps its expiry.
                cache.add(key, 0, timeout=window)
                try:
                    cache.incr(key)
                except ValueError:  # expired between add() and incr()
                    cache.add(key, 1, timeout=window)
        except Exception:
            log.exception("login rate limit: cache unavailable, failure not counted")

    @staticmethod
    def _forget(keys: list[str]) -> None:
        try:
            cache.delete_many(keys)
        except Exception:
            log.exception("login rate limit: cache unavailable")

    @staticmethod
    def _refuse(request: HttpRequest | None, username: str) -> None:
        message = _refusal_message()
        if request is not None:
            setattr(request, REFUSAL_ATTR, message)
        record(
            "auth.login_refused",
            actor_name=username,
            outcome=Outcome.DENIED,
            message=f"too many failed logins; {message}",
            request_id=str(getattr(request, "request_id", "")),
            source_ip=client_ip(request) if request is not None else None,
            method=(request.method or "") if request is not None else "",
            path=request.path[:255] if request is not None else "",
        )
        raise PermissionDenied(message)


class ExplainRefusalMixin:
    """Show the rate limiter's reason instead of "wrong username or password"."""

    request: HttpRequest | None

    def get_invalid_login_error(self) -> ValidationError:
        refusal = getattr(self.request, REFUSAL_ATTR, None)
        if refusal:
            return ValidationError(refusal, code="login_refused")
        return super().get_invalid_login_error()  # type: ignore[misc,no-any-return]


class LoginForm(ExplainRefusalMixin, AuthenticationForm):
    """The login form for tenant users (``/api/auth/login/``, and any later login page)."""


class AdminLoginForm(ExplainRefusalMixin, AdminAuthenticationForm):
    """The admin's login form with the same explanation."""
