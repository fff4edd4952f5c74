"""The user's SSH keys and API tokens (they belong to the user, as in the API)."""

from __future__ import annotations

import datetime as dt

from django.contrib import messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.utils import timezone

from portal.api.authentication import user_id_of
from portal.audit.record import describe, note_error
from portal.tenancy.models import APIToken, Membership, SSHKey
from portal.web.access import actor, confirm, login_page, my_tenants, page
from portal.web.forms import SSHKeyForm, TokenForm


@login_page
def ssh_keys(request: HttpRequest) -> HttpResponse:
    form = SSHKeyForm(request.POST or None, user=request.user)
    status = 200
    if request.method == "POST":
        describe(request, "sshkey.create")
        if form.is_valid():
            key = form.save(commit=False)
            key.user = request.user
            key.save()
            describe(request, "sshkey.create", key)
            messages.success(request, f"Added key {key.name} ({key.fingerprint}).")
            return HttpResponseRedirect(reverse("web:ssh-keys"), status=303)
        note_error(request, "the key form has errors")
        status = 400
    keys = SSHKey.objects.filter(user_id=user_id_of(request))
    return page(request, "web/ssh_keys.html", {"form": form, "keys": keys}, status=status)


@login_page
def ssh_key_delete(request: HttpRequest, pk: int) -> HttpResponse:
    key = get_object_or_404(SSHKey, pk=pk, user_id=user_id_of(request))
    if request.method != "POST":
        return confirm(
            request,
            f"Delete SSH key {key.name}?",
            f"{key.fingerprint}. Instances launched with it keep it; new launches cannot use it.",
            "Delete key",
            reverse("web:ssh-keys"),
        )
    describe(request, "sshkey.delete", key)
    key.delete()
    messages.success(request, f"Deleted key {key.name}.")
    return HttpResponseRedirect(reverse("web:ssh-keys"), status=303)


def _token_form(request: HttpRequest, data: object = None) -> TokenForm:
    return TokenForm(
        data, tenants=my_tenants(request), is_operator=actor(request).is_operator, user_id=user_id_of(request)
    )


#: session key holding a new token's key between the POST and the one page that shows it
SESSION_NEW_KEY = "skyport_new_token"


@login_page
def tokens(request: HttpRequest) -> HttpResponse:
    """List and create tokens (POST/redirect/GET).

    A created token's key goes into the session and the POST redirects; the next GET takes it
    out and shows it, so it is shown once: a reload shows it no more and posts nothing again.
    """
    form = _token_form(request, request.POST or None)
    status = 200
    if request.method == "POST":
        describe(request, "apitoken.create")
        if form.is_valid():
            data = form.cleaned_data
            membership = None
            if data["tenant"] != TokenForm.OPERATOR:
                membership = Membership.objects.filter(
                    user_id=user_id_of(request), tenant__slug=data["tenant"], tenant__active=True
                ).first()
            if membership is None and not actor(request).is_operator:
                form.add_error("tenant", "You are not a member of that tenant.")
            else:
                token = APIToken(
                    user_id=user_id_of(request),
                    membership=membership,
                    name=data["name"],
                    expires_at=timezone.now() + dt.timedelta(days=data["expires_in_days"]),
                )
                key = token.issue()
                token.save()
                describe(request, "apitoken.create", token)
                request.session[SESSION_NEW_KEY] = {"name": token.name, "key": key}
                return HttpResponseRedirect(reverse("web:tokens"), status=303)
        note_error(request, "the token form has errors")
        status = 400
    new = request.session.pop(SESSION_NEW_KEY, None) if request.method == "GET" else None
    mine = APIToken.objects.filter(user_id=user_id_of(request)).select_related("membership__tenant")
    response = page(
        request,
        "web/tokens.html",
        {
            "form": form,
            "tokens": mine,
            "new_key": new["key"] if new else None,
            "new_name": new["name"] if new else None,
            "now": timezone.now(),
        },
        status=status,
    )
    response["Cache-Control"] = "no-store"
    return response


@login_page
def token_revoke(request: HttpRequest, pk: int) -> HttpResponse:
    token = get_object_or_404(
        APIToken.objects.select_related("membership__tenant"), pk=pk, user_id=user_id_of(request)
    )
    if request.method != "POST":
        return confirm(
            request,
            f"Revoke token {token.name} (sky_{token.key_id}…, {_token_scope(token)})?",
            f"Created {token.created_at:%Y-%m-%d %H:%M} UTC, last used "
            f"{f'{token.last_used_at:%Y-%m-%d %H:%M} UTC' if token.last_used_at else 'never'}. "
            "Programs using it are refused from now on. A revoked token cannot be restored.",
            "Revoke token",
            reverse("web:tokens"),
        )
    describe(request, "apitoken.revoke", token)
    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
    messages.success(request, f"Revoked token {token.name}.")
    return HttpResponseRedirect(reverse("web:tokens"), status=303)


def _token_scope(token: APIToken) -> str:
    """Where a token acts: "tenant acme (member)" or "operator"."""
    if token.membership is None:
        return "operator, all tenants"
    return f"tenant {token.membership.tenant.slug} as {token.membership.get_role_display().lower()}"
