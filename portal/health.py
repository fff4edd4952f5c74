"""``GET /healthz`` for container health checks and load balancers.

Answered before any other middleware: a probe from inside the container
speaks plain HTTP to 127.0.0.1, which the production settings would
redirect to HTTPS (SECURE_SSL_REDIRECT) or refuse as an unknown host
(ALLOWED_HOSTS).  The answer says only that the process serves requests.
"""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse, JsonResponse

PATH = "/healthz"


class HealthCheckMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path_info == PATH and request.method in ("GET", "HEAD"):
            return JsonResponse({"status": "ok"})
        return self.get_response(request)
