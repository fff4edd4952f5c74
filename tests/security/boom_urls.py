"""The portal's URLs and ``/api/v1/test-boom/``, which raises: an unhandled error on purpose."""

from django.http import HttpRequest, HttpResponse
from django.urls import path

from portal.urls import handler404, handler500
from portal.urls import urlpatterns as portal_urls


class Boom(RuntimeError):
    pass


def boom(request: HttpRequest) -> HttpResponse:
    raise Boom("an unhandled error on purpose (tests/security/test_error_logging.py)")


urlpatterns = [path("api/v1/test-boom/", boom), *portal_urls]
__all__ = ["handler404", "handler500", "urlpatterns"]
