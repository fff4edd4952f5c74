"""Log in, log out, and choose the current tenant."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from portal.audit.record import describe, note_error
from portal.tenancy.login import LoginForm
from portal.web.access import SESSION_TENANT, login_page, my_tenants, refuse


class LoginView(auth_views.LoginView):
    template_name = "web/login.html"
    redirect_authenticated_user = True
    authentication_form = LoginForm  # says why a rate-limited login is refused

    def form_valid(self, form: Any) -> HttpResponse:
        describe(self.request, "session.login", form.get_user())
        return super().form_valid(form)

    def form_invalid(self, form: Any) -> HttpResponse:
        describe(self.request, "session.login")
        errors = form.non_field_errors()
        note_error(self.request, str(errors[0]) if errors else "wrong user name or password")
        response = super().form_invalid(form)
        response.status_code = 400
        return response


class LogoutView(auth_views.LogoutView):
    """POST only (Django's default); the page after it is the login page."""

    next_page = "/login/"

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if request.user.is_authenticated:
            describe(request, "session.logout", request.user)
        return super().post(request, *args, **kwargs)


@require_POST
@login_page
def switch_tenant(request: HttpRequest) -> HttpResponse:
    """Make one of the user's tenants the current one."""
    slug = request.POST.get("tenant", "")
    tenant = next((t for t in my_tenants(request) if t.slug == slug), None)
    describe(request, "session.tenant", tenant)
    if tenant is None:
        return refuse(request, f"You are not a member of a tenant '{slug}'.", status=404)
    request.session[SESSION_TENANT] = tenant.pk
    messages.success(request, f"Now working in tenant {tenant.slug}.")
    back = request.POST.get("next", "/")
    if not url_has_allowed_host_and_scheme(back, {request.get_host()}) or not back.startswith("/"):
        back = "/"
    # pages of another tenant's objects make no sense after a switch: go to its list page
    if back.startswith("/instances/") and back != "/instances/":
        back = "/instances/"
    return HttpResponseRedirect(back, status=303)
