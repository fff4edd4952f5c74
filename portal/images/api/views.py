"""Images: the catalogue, uploads, and the blob endpoint nodes fetch from."""

from __future__ import annotations

import hmac
from typing import IO, Any, cast

from django.db import models
from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_safe
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import parsers, status
from rest_framework.decorators import action
from rest_framework.exceptions import APIException, MethodNotAllowed
from rest_framework.request import Request
from rest_framework.response import Response

from portal.api.authentication import actor_for
from portal.api.exceptions import http_status
from portal.api.viewsets import ScopedViewSet
from portal.audit.record import describe
from portal.errors import Conflict
from portal.images import imports, services
from portal.images.api.serializers import ImageSerializer, ImageUpdateSerializer, UploadQuerySerializer
from portal.images.models import Blob, Image
from portal.images.nodekeys import node_key
from portal.images.store import is_digest


class UploadFailed(APIException):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.status_code = code


class OctetStreamParser(parsers.BaseParser):
    """Declares the raw body; the view streams it itself and never parses it."""

    media_type = "application/octet-stream"

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        return stream


class ImageViewSet(ScopedViewSet):
    """Public images and your tenants' private ones; upload files with PUT /images/{id}/file/."""

    queryset = Image.objects.all()
    serializer_class = ImageSerializer
    # PUT only on /images/{id}/file/ (the upload action names it), so that OPTIONS on the image and
    # its Allow header agree with the schema: GET, PATCH, DELETE.
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]
    filterset_fields = {
        "name": ["exact"],
        "version": ["exact"],
        "status": ["exact"],
        "owner__slug": ["exact"],
        "os": ["exact"],
    }
    search_fields = ["name", "description"]
    ordering_fields = ["name", "version", "created_at"]

    def get_queryset(self) -> models.QuerySet[Any]:
        return (
            Image.objects.select_related("owner")
            .prefetch_related("artifacts__blobs")
            .restrict(actor_for(self.request))
        )

    def tenant_id_of(self, obj: models.Model) -> int | None:
        return getattr(obj, "owner_id", None)

    def http_method_not_allowed(self, request: Any, *args: Any, **kwargs: Any) -> Response:
        if request.method == "PUT":
            raise MethodNotAllowed("PUT", "Use PATCH to change an image, PUT /images/{id}/file/ to upload.")
        return super().http_method_not_allowed(request, *args, **kwargs)

    @extend_schema(request=ImageUpdateSerializer)
    def partial_update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().partial_update(request, *args, **kwargs)

    def perform_create(self, serializer: Any) -> None:
        tenant = serializer.validated_data.get("tenant")
        if tenant is not None:
            self.check_role(tenant.pk, self.write_role)
        image = serializer.save()
        describe(self.request, "image.create", image, tenant_id=image.owner_id)

    def perform_destroy(self, instance: models.Model) -> None:
        assert isinstance(instance, Image)
        describe(self.request, "image.delete", instance, tenant_id=instance.owner_id)
        services.delete_image(instance)

    @extend_schema(
        request={"application/octet-stream": OpenApiTypes.BINARY},
        parameters=[UploadQuerySerializer],
        responses={202: ImageSerializer},
        summary="Upload the image's disk or container archive (raw body, streamed to disk)",
    )
    @action(
        detail=True,
        methods=["put"],
        url_path="file",
        parser_classes=[OctetStreamParser],
        http_method_names=["put", "options"],
    )
    def upload(self, request: Request, pk: str | None = None) -> Response:
        image = self.get_object()  # scoping (404) and role checks (403)
        describe(request, "image.upload", image, tenant_id=image.owner_id)
        query = UploadQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        fmt = query.validated_data["type"]
        length_header = request.META.get("CONTENT_LENGTH") or ""
        length = int(length_header) if length_header.isdigit() else None
        stream = cast(IO[bytes], request._request)
        try:
            imports.accept_upload(image, fmt, stream, length, query.validated_data.get("sha256", ""))
        except services.UploadError as exc:
            raise UploadFailed(str(exc), exc.status) from exc
        image.refresh_from_db()
        return Response(self.get_serializer(image).data, status=status.HTTP_202_ACCEPTED)


def _node_allowed(request: HttpRequest) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme == "Node":
        name, _, key = credentials.strip().partition(":")
        return bool(name and key) and hmac.compare_digest(key, node_key(name))
    user = getattr(request, "user", None)
    return bool(user is not None and user.is_authenticated and user.is_staff)


@csrf_exempt
def node_upload(request: HttpRequest, image_id: int) -> HttpResponse:
    """PUT the disk of a published VM, by the node that exported it (one-image upload token)."""
    if request.method != "PUT":
        return JsonResponse({"message": "Use PUT."}, status=405)
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    allowed = services.image_for_upload_token(token.strip()) if scheme == "Upload" else None
    if allowed is None:
        return JsonResponse(
            {"message": "Send 'Authorization: Upload <token>' from the publish task."}, status=401
        )
    if allowed != image_id:
        return JsonResponse({"message": "This upload token is for another image."}, status=403)
    image = Image.objects.filter(pk=image_id).first()
    if image is None:
        return JsonResponse({"message": f"No image {image_id}."}, status=404)
    describe(request, "image.upload", image, tenant_id=image.owner_id, message="disk published by its node")
    length_header = request.META.get("CONTENT_LENGTH") or ""
    length = int(length_header) if length_header.isdigit() else None
    try:
        imports.accept_upload(image, "qcow2", cast(IO[bytes], request), length)
    except services.UploadError as exc:
        return JsonResponse({"message": str(exc)}, status=exc.status)
    except Conflict as exc:
        return JsonResponse({"message": str(exc), "code": exc.code}, status=http_status(exc))
    image.refresh_from_db()
    return JsonResponse(
        {"id": image.pk, "status": image.status, "status_reason": image.status_reason}, status=202
    )


@require_safe
def blob(request: HttpRequest, digest: str) -> HttpResponse | FileResponse:
    """A stored blob by digest, for compute nodes (node key) and operators (session)."""
    if not _node_allowed(request):
        return JsonResponse(
            {"message": "Blobs are served to compute nodes: send 'Authorization: Node <name>:<key>'."},
            status=401,
        )
    if not is_digest(digest) or not Blob.objects.filter(digest=digest).exists():
        return JsonResponse({"message": f"No blob {digest}."}, status=404)
    path = services.store().path(digest)
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return JsonResponse({"message": f"Blob {digest} is recorded but missing from the store."}, status=410)
    response = FileResponse(fh, content_type="application/octet-stream")
    response["ETag"] = f'"{digest}"'
    response["Cache-Control"] = "private, max-age=31536000, immutable"
    response["Docker-Content-Digest"] = digest
    return response
