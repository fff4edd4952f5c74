from django.contrib import admin
from django.contrib.auth.views import LoginView
from django.urls import include, path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from portal.tenancy.login import AdminLoginForm, LoginForm

# Both login forms say why a rate-limited login is refused (portal.tenancy.login).
admin.site.login_form = AdminLoginForm


urlpatterns = [
    path("", RedirectView.as_view(url="/api/docs/", permanent=False)),
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
]

handler404 = "portal.api.exceptions.json_not_found"
handler500 = "portal.api.exceptions.json_server_error"
