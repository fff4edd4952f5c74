from django.contrib import admin
from django.contrib.auth.views import LoginView
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from portal.tenancy.login import AdminLoginForm, LoginForm

# Both login forms say why a rate-limited login is refused (portal.tenancy.login).
admin.site.login_form = AdminLoginForm


urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("portal.api.urls")),
    # session login for tenant users (API docs); DRF's own login view, with our form
    path(
        "api/auth/login/",
        LoginView.as_view(template_name="rest_framework/login.html", authentication_form=LoginForm),
    ),
    path("api/auth/", include("rest_framework.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("", include("portal.web.urls")),  # the browser UI (tenant pages and /ops/)
]

handler404 = "portal.web.errors.not_found"  # JSON under /api/, HTML elsewhere
handler500 = "portal.web.errors.server_error"
