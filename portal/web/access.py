"""Who is looking, in which tenant, and what they may do: shared by every page.

The Actor is the API's (``portal.api.authentication.actor_for``), so pages
and the API scope with the same ``Model.objects.restrict(actor)`` and judge
roles with the same ``Actor.can``.  The current tenant is kept in the session
and is always one of the user's memberships.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, TypeVar

from django.contrib import messages
from django.contrib.auth.views import redirect_to_login
from django.db import models
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render

from portal.api.authentication import actor_for
from portal.api.exceptions import http_status
from portal.audit.record import describe, note_error
from portal.errors import DomainError
from portal.tenancy.choices import Role
from portal.tenancy.models import Tenant
from portal.tenancy.querysets import Actor

SESSION_TENANT = "skyport_tenant_id"
#: a view function; the decorators below add the checks every page needs
View = Callable[..., HttpResponse]
_T = TypeVar("_T")


def actor(request: HttpRequest) -> Actor:
    return actor_for(request)


def my_tenants(request: HttpRequest) -> list[Tenant]:
    """Active tenants the user is a member of (operators too: only their memberships).

    Read once per request: the header, the current tenant and the page all ask.
    """
    cached: list[Tenant] | None = getattr(request, "_skyport_tenants", None)
    if cached is None:
        cached = list(Tenant.objects.filter(pk__in=actor(request).tenant_ids, active=True).order_by("slug"))
        request._skyport_tenants = cached  # type: ignore[attr-defined]
    return cached


def current_tenant(request: HttpRequest) -> Tenant | None:
    """The tenant chosen in the session, else the user's first; None without memberships."""
    tenants = my_tenants(request)
    chosen = request.session.get(SESSION_TENANT)
    for tenant in tenants:
        if tenant.pk == chosen:
            return tenant
    if not tenants:
        return None
    request.session[SESSION_TENANT] = tenants[0].pk
    return tenants[0]


def role_refusal(who: Actor, tenant_id: int | None, min_role: str) -> str | None:
    """Why ``who`` may not act with ``min_role`` in the tenant, or None when allowed."""
    if who.can(tenant_id, min_role):
        return None
    have = who.role_in(tenant_id)
    return f"This needs the {Role(min_role).label.lower()} role in the tenant; " + (
        f"you are {Role(have).label.lower()}." if have else "you are not a member."
    )


def nav(request: HttpRequest) -> dict[str, Any]:
    """What the page header shows: the user's tenants, the current one and the role there."""
    if not request.user.is_authenticated:
        return {"tenants": [], "tenant": None, "role": None, "is_operator": False}
    who = actor(request)
    tenant = current_tenant(request)
    role = who.role_in(tenant.pk) if tenant else None
    return {
        "tenants": my_tenants(request),
        "tenant": tenant,
        "role": Role(role).label if role else None,
        "is_operator": who.is_operator,
    }


def page(request: HttpRequest, template: str, context: dict[str, Any], status: int = 200) -> HttpResponse:
    """Render a full page with the header's context."""
    return render(request, template, {"nav": nav(request), **context}, status=status)


def refuse(request: HttpRequest, message: str, status: int = 403) -> HttpResponse:
    """Answer a refused request with the reason (and keep it for the audit Event)."""
    note_error(request, message)
    template = "web/partials/refused.html" if request.headers.get("HX-Request") else "web/refused.html"
    return page(request, template, {"message": message}, status=status)


def confirm(
    request: HttpRequest,
    title: str,
    body: str,
    button: str,
    cancel: str,
    fields: dict[str, str] | None = None,
    pairs: list[tuple[str, str]] | None = None,
) -> HttpResponse:
    """The confirmation page of a destructive action: GET shows it, its form POSTs to the same URL.

    ``fields`` and ``pairs`` (for a name given several times) become hidden inputs."""
    hidden = list((fields or {}).items()) + list(pairs or [])
    context = {"title": title, "body": body, "button": button, "cancel": cancel, "fields": hidden}
    return page(request, "web/confirm.html", context)


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A service's refusal as a page shows it: the sentence and the HTTP status."""

    message: str
    status: int


def attempt(request: HttpRequest, call: Callable[[], _T]) -> _T | Refusal:
    """Run a domain service call; a refusal (:class:`portal.errors.DomainError`) becomes a :class:`Refusal`.

    The refusal's sentence is kept for the audit Event, and its status is the
    API's for the same error, so a page answers as the API would.
    """
    try:
        return call()
    except DomainError as exc:
        note_error(request, str(exc))
        return Refusal(str(exc), http_status(exc))


def write_refusal(
    request: HttpRequest,
    tenant_id: int,
    action: str,
    obj: models.Model | None = None,
    message: str | None = None,
) -> HttpResponse | None:
    """A page's change in the tenant: a POST is named for its audit Event (``action`` on ``obj``), and
    anyone but a member is refused (the GET of its confirmation page too, which names nothing)."""
    if request.method == "POST":
        describe(request, action, obj, tenant_id=tenant_id, message=message)
    why = role_refusal(actor(request), tenant_id, Role.MEMBER)
    return refuse(request, why) if why else None


@dataclasses.dataclass(frozen=True)
class Ask:
    """The words of a confirmation page (see :func:`confirm`)."""

    title: str
    body: str
    button: str
    cancel: str
    fields: dict[str, str] | None = None


def confirm_then_act(
    request: HttpRequest,
    ask: Ask,
    act: Callable[[], _T],
    refused: Callable[[Refusal], HttpResponse],
    done: Callable[[_T], HttpResponse],
    check: Callable[[], object] = lambda: None,
) -> HttpResponse:
    """A destructive action from a page: GET asks first, the confirmation's form POSTs back to act.

    GET: ``check()``, and when it returns a :class:`Refusal` the page ``refused`` makes of it, else the
    confirmation page ``ask``.  POST: ``act()`` through :func:`attempt`; its refusal goes to ``refused``,
    its result to ``done``.
    """
    if request.method != "POST":
        found = check()
        if isinstance(found, Refusal):
            return refused(found)
        return confirm(request, ask.title, ask.body, ask.button, ask.cancel, fields=ask.fields)
    outcome = attempt(request, act)
    if isinstance(outcome, Refusal):
        return refused(outcome)
    return done(outcome)


def success(request: HttpRequest, message: str, url: str) -> HttpResponseRedirect:
    """A change made: say so on the next page, and go there (303, so a reload does not post again)."""
    messages.success(request, message)
    return HttpResponseRedirect(url, status=303)


def login_page(view: View) -> View:
    """Send anonymous users to the login page (htmx partials get a 401 instead of a redirect)."""

    @functools.wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_authenticated:
            if request.headers.get("HX-Request"):
                response = HttpResponse("Your session ended; log in again.", status=401)
                response["HX-Redirect"] = "/login/"
                return response
            return redirect_to_login(request.get_full_path())
        return view(request, *args, **kwargs)

    return wrapper


def tenant_page(view: View) -> View:
    """A page about the current tenant: login required; users without a tenant are told so."""

    @login_page
    @functools.wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        tenant = current_tenant(request)
        if tenant is None:
            return page(request, "web/no_tenant.html", {}, status=200)
        return view(request, tenant, *args, **kwargs)

    return wrapper


def operator_page(view: View) -> View:
    """The operator console: staff only; others are refused with a reason."""

    @login_page
    @functools.wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not actor(request).is_operator:
            return refuse(request, "The operator console is for operators (staff users).")
        return view(request, *args, **kwargs)

    return wrapper
