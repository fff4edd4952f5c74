"""Template helpers of the browser UI."""

from __future__ import annotations

from collections.abc import Sequence

from django import template
from django.urls import reverse
from django.utils.html import format_html

from compute.spec import PowerState
from portal.audit.models import Outcome
from portal.cloud.choices import NodeStatus, VmState
from portal.images.choices import ImageStatus
from portal.web.presenters import sparkline_points

register = template.Library()


@register.simple_tag
def sparkline(values: Sequence[float], label: str, width: int = 120, height: int = 30) -> str:
    """An inline SVG line of ``values`` with an accessible label."""
    return format_html(
        '<svg class="sparkline" role="img" aria-label="{}" viewBox="0 0 {} {}" width="{}" height="{}">'
        '<polyline fill="none" stroke="currentColor" stroke-width="1.5" points="{}"/></svg>',
        label,
        width,
        height,
        width,
        height,
        sparkline_points(values, width, height),
    )


@register.inclusion_tag("web/partials/bar.html")
def usage_bar(bar: object) -> dict[str, object]:
    return {"bar": bar}


@register.filter
def state_class(state: str | None) -> str:
    """A CSS class for a state badge."""
    good = {VmState.ACTIVE, ImageStatus.ACTIVE, PowerState.RUNNING, NodeStatus.UP, Outcome.SUCCESS}
    bad = {
        VmState.ERROR,
        PowerState.CRASHED,
        PowerState.NOSTATE,
        NodeStatus.DOWN,
        Outcome.FAILURE,
        Outcome.DENIED,
    }
    if state in good:
        return "badge good"
    if state in bad:
        return "badge bad"
    return "badge"


@register.simple_tag(takes_context=True)
def navlink(context: dict[str, object], url_name: str, label: str) -> str:
    """A header link marked ``aria-current="page"`` on its own section."""
    url = reverse(f"web:{url_name}")
    request = context["request"]
    path: str = getattr(request, "path", "")
    current = path == url if url == "/" else path.startswith(url) or (url, path) == ("/ops/nodes/", "/ops/")
    return format_html('<a href="{}"{}>{}</a>', url, ' aria-current="page"' if current else "", label)
