"""Image pages that write: upload (with a progress bar), delete, and publishing a VM's disk.

The upload page creates the image and streams the file through the REST API
(``POST /api/v1/images/`` then ``PUT /api/v1/images/{id}/file/``) from the
browser with the session and CSRF token, so the file goes to disk in chunks
exactly as an API upload does; the page only shows progress and errors.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.views.decorators.http import require_POST

from portal.audit.record import describe
from portal.cloud import services as cloud_services
from portal.images import services
from portal.images.models import Image
from portal.tenancy.choices import Role
from portal.tenancy.models import Tenant
from portal.web.access import (
    Refusal,
    actor,
    attempt,
    confirm,
    login_page,
    page,
    refuse,
    role_refusal,
    tenant_page,
)
from portal.web.forms import PublishForm
from portal.web.presenters import image_delete_refusal
from portal.web.views.instances import _detail_page, _instance, _write_refusal


@tenant_page
def image_upload(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    refused = role_refusal(actor(request), tenant.pk, Role.MEMBER)
    if refused:
        return refuse(request, refused)
    return page(
        request,
        "web/image_upload.html",
        {"tenant": tenant, "max_bytes": settings.SKYPORT_UPLOAD_MAX_BYTES},
    )


def _image(request: HttpRequest, pk: int) -> Image:
    return get_object_or_404(
        Image.objects.restrict(actor(request)).select_related("owner").prefetch_related("artifacts"), pk=pk
    )


@login_page
def image_status(request: HttpRequest, pk: int) -> HttpResponse:
    """The status panel, polled by the detail page while the image imports."""
    return page(request, "web/partials/image_status.html", {"image": _image(request, pk)})


@login_page
def image_delete(request: HttpRequest, pk: int) -> HttpResponse:
    """GET: a confirmation page; POST: delete the image (refused while an instance uses it)."""
    image = _image(request, pk)
    if request.method == "POST":
        describe(request, "image.delete", image, tenant_id=image.owner_id)
    refused = image_delete_refusal(actor(request), image)
    if refused:
        return refuse(request, refused)
    if request.method != "POST":
        return confirm(
            request,
            f"Delete image {image}?",
            "Its files leave the store unless another image shares them. Refused while any instance uses it.",
            "Delete image",
            reverse("web:image", args=[image.pk]),
        )
    outcome = attempt(request, lambda: services.delete_image(image))
    if isinstance(outcome, Refusal):
        return refuse(request, outcome.message, outcome.status)
    messages.success(request, f"Deleted image {image}.")
    return HttpResponseRedirect(reverse("web:images"), status=303)


@require_POST
@login_page
def instance_publish(request: HttpRequest, pk: str) -> HttpResponse:
    """Publish a VM's disk as a new private image of its tenant."""
    instance = _instance(request, pk)
    describe(request, "instance.publish", instance)
    refused = _write_refusal(request, instance.tenant_id)
    if refused:
        return refused
    form = PublishForm(request.POST, tenant=instance.tenant)
    if not form.is_valid():
        return _detail_page(request, instance, "Check the image name and version.", 400, publish=form)
    image = attempt(request, lambda: cloud_services.publish(instance, user=request.user, **form.cleaned_data))
    if isinstance(image, Refusal):
        instance.refresh_from_db()
        return _detail_page(request, instance, image.message, image.status, publish=form)
    messages.success(request, f"Publishing the disk of {instance.name} as image {image}; it imports next.")
    return HttpResponseRedirect(reverse("web:image", args=[image.pk]), status=303)
