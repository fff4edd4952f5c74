"""``/api/v1/usage/`` (JSON or CSV), ``/api/v1/prices/`` and ``/api/v1/budgets/``.

Why the usage endpoint is not a model viewset: a report is computed from
the rollups, not a row.  It scopes by hand in one place (``_tenant``): a
tenant the requester does not belong to is a 404, exactly like a slug that
does not exist.  Prices are read by everyone signed in and written only by
operators; budgets belong to a tenant and are set by its admins.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from django.utils import timezone
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import renderers, viewsets
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from portal.api.authentication import actor_for
from portal.api.viewsets import ScopedViewSet
from portal.metering import rating, reports
from portal.metering.api import serializers
from portal.metering.models import Budget, PriceSheet
from portal.tenancy.choices import Role
from portal.tenancy.models import Tenant

CSV_COLUMNS = list(reports.Line("", "").as_dict())


class CSVRenderer(renderers.BaseRenderer):
    """A usage report as CSV: one row per group and a total row (errors stay JSON-shaped text)."""

    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(
        self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None
    ) -> bytes:
        out = io.StringIO()
        if isinstance(data, dict) and "lines" in data:
            writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
            writer.writeheader()
            writer.writerows([*data["lines"], data["total"]])
        else:
            writer_plain = csv.writer(out, lineterminator="\n")
            for key, value in (data or {}).items():
                writer_plain.writerow([key, value])
        return out.getvalue().encode()


def _tenant(request: Request, slug: str | None) -> Tenant:
    actor = actor_for(request)
    visible = Tenant.objects.restrict(actor)
    if slug is None:
        if len(actor.roles) != 1:
            raise ValidationError({"tenant": "Name the tenant (you belong to several, or none)."})
        return visible.get(pk=actor.tenant_ids[0])
    tenant = visible.filter(slug=slug).first()
    if tenant is None:
        raise NotFound(f"No tenant '{slug}' that you belong to.")
    return tenant


def report_data(tenant: Tenant, report: reports.Report) -> dict[str, Any]:
    so_far, forecast, _ = reports.month_cost(tenant.pk, timezone.now())
    return {
        "tenant": tenant.slug,
        "start": report.start.isoformat(),
        "end": report.end.isoformat(),
        "group_by": report.group_by,
        "currency": report.currency,
        "month_so_far": str(rating.cents(so_far)),
        "month_forecast": str(rating.cents(forecast)),
        "lines": [line.as_dict() for line in report.lines],
        "total": report.total.as_dict(),
    }


class OneReport(AutoSchema):
    """The usage "list" answers one report (an object), not a list of them."""

    def _is_list_view(self, serializer: Any = None) -> bool:
        return False


class UsageViewSet(viewsets.ViewSet):
    """Metered usage and its cost for one tenant (docs/metering.md)."""

    permission_classes = [IsAuthenticated]
    renderer_classes = [renderers.JSONRenderer, CSVRenderer]
    schema = OneReport()

    def finalize_response(self, request: Request, response: Response, *args: Any, **kwargs: Any) -> Response:
        """A refusal is JSON even when CSV was asked for (the schema documents errors as JSON)."""
        renderer = getattr(request, "accepted_renderer", None)
        if response.status_code >= 400 and renderer is not None and renderer.format == "csv":
            request.accepted_renderer = renderers.JSONRenderer()
            request.accepted_media_type = "application/json"
        return super().finalize_response(request, response, *args, **kwargs)

    @extend_schema(
        parameters=[
            serializers.UsageQuerySerializer,
            OpenApiParameter(
                "from", OpenApiTypes.DATETIME, description="ISO 8601 start (default: start of this month)"
            ),
            OpenApiParameter(
                "to", OpenApiTypes.DATETIME, description="ISO 8601 end, exclusive (default: now)"
            ),
        ],
        responses={
            (200, "application/json"): serializers.UsageReportSerializer,
            (200, "text/csv"): OpenApiTypes.STR,
        },
    )
    def list(self, request: Request) -> Response:
        query = serializers.UsageQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        tenant = _tenant(request, query.validated_data.get("tenant"))
        now = timezone.now()
        start = query.validated_data.get("from") or rating.month_bounds(now.date())[0]
        end = query.validated_data.get("to") or now
        if end <= start:
            raise ValidationError({"to": "'to' must be after 'from'."})
        report = reports.build(tenant.pk, start, end, query.validated_data["group_by"])
        response = Response(report_data(tenant, report))
        if request.accepted_renderer.format == "csv":
            name = f"usage-{tenant.slug}-{report.start:%Y%m%d%H}-{report.end:%Y%m%d%H}.csv"
            response["Content-Disposition"] = f'attachment; filename="{name}"'
        return response


class PriceSheetViewSet(ScopedViewSet):
    """The price sheets, each in force from its date; everyone reads them, operators write them."""

    queryset = PriceSheet.objects.all()
    serializer_class = serializers.PriceSheetSerializer
    operator_actions = frozenset({"create", "update", "partial_update", "destroy"})
    ordering_fields = ["effective_from"]

    def get_queryset(self) -> Any:
        return PriceSheet.objects.all()

    def create_extra(self) -> dict[str, Any]:
        return {"created_by": self.request.user}


class BudgetViewSet(ScopedViewSet):
    """Monthly budgets of your tenants; tenant admins and operators set them."""

    queryset = Budget.objects.select_related("tenant").order_by("tenant__slug", "pk")
    serializer_class = serializers.BudgetSerializer
    write_role = Role.ADMIN
    filterset_fields = {"tenant__slug": ["exact"]}
