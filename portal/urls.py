from django.contrib import admin
from django.http import HttpRequest, JsonResponse
from django.urls import include, path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


urlpatterns = [
    path("", RedirectView.as_view(url="/api/docs/", permanent=False)),
    path("healthz", healthz),
    path("admin/", admin.site.urls),
    path("api/v1/", include("portal.api.urls")),
    path("api/auth/", include("rest_framework.urls")),  # session login for tenant users (API docs)
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
]

handler404 = "portal.api.exceptions.json_not_found"
handler500 = "portal.api.exceptions.json_server_error"
