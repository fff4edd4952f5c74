from django.contrib import admin
from django.http import HttpRequest, JsonResponse
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


urlpatterns = [
    path("healthz", healthz),
    path("admin/", admin.site.urls),
    path("api/v1/", include("portal.api.urls")),
    path("api/auth/", include("rest_framework.urls")),  # session login for tenant users (API docs)
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("", include("portal.web.urls")),  # the browser UI (tenant pages and /ops/)
]

handler404 = "portal.web.errors.not_found"  # JSON under /api/, HTML elsewhere
handler500 = "portal.web.errors.server_error"
