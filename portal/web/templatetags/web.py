"""Template helpers of the browser UI."""

from __future__ import annotations

from collections.abc import Sequence

from django import template
from django.urls import reverse
from django.utils.html import format_html
from django.utils.translation import gettext, gettext_noop

from compute.spec import PowerState
from portal.audit.models import Outcome
from portal.cloud.choices import NodeStatus, VmState
from portal.images.choices import ImageStatus
from portal.web.presenters import sparkline_points

register = template.Library()

#: the header's link labels, marked for translation (navlink translates them)
NAV_LABELS = [
    gettext_noop(label)
    for label in (
        "Dashboard",
        "Instances",
        "Images",
        "Networks",
        "Volumes",
        "Security groups",
        "Events",
        "SSH keys",
        "API tokens",
        "Operator console",
    )
]


@register.simple_tag
def sparkline(
    values: Sequence[float],
    label: str,
    unit: str = "",
    span_seconds: float = 0,
    width: int = 160,
    height: int = 40,
) -> str:
    """An inline SVG line of ``values`` with its scale: the highest and lowest value on the
    left, the time the line covers under it ("5 min ago … now"), and an accessible label."""
    pad_left, pad_bottom = 44, 12
    plot_w, plot_h = width - pad_left, height - pad_bottom
    points = sparkline_points(values, plot_w, plot_h)
    low, high = (min(values), max(values)) if values else (0.0, 0.0)
    ago = f"{round(span_seconds / 60)} min ago" if span_seconds >= 90 else f"{round(span_seconds)} s ago"
    return format_html(
        '<svg class="sparkline" role="img" aria-label="{}" viewBox="0 0 {} {}" width="{}" height="{}">'
        '<g class="axis" font-size="8" fill="currentColor">'
        '<text x="{}" y="8" text-anchor="end">{}</text>'
        '<text x="{}" y="{}" text-anchor="end">{}</text>'
        '<text x="{}" y="{}">{}</text><text x="{}" y="{}" text-anchor="end">now</text></g>'
        '<path class="frame" d="M{} 0 V{} H{}" fill="none" stroke="currentColor" stroke-opacity=".35"/>'
        '<polyline transform="translate({} 0)" fill="none" stroke="currentColor" stroke-width="1.5" '
        'points="{}"/>'
        "</svg>",
        f"{label}, from {low:.1f} to {high:.1f} {unit} over the last {ago.removesuffix(' ago')}",
        width,
        height,
        width,
        height,
        pad_left - 3,
        f"{high:.1f} {unit}",
        pad_left - 3,
        plot_h,
        f"{low:.1f} {unit}",
        pad_left,
        height - 1,
        ago,
        width,
        height - 1,
        pad_left,
        plot_h,
        width,
        pad_left,
        points,
    )


#: binary units: a 20 GiB limit is "20 GiB", never "20.0 GB"
_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB")


@register.filter
def binary_size(value: int | float | None) -> str:
    """Bytes in binary units with the unit's real name: 512 bytes, 1.5 KiB, 20 GiB, 179.9 MiB."""
    if value is None:
        return "—"
    size = float(value)
    unit = 0
    while size >= 1024 and unit < len(_UNITS) - 1:
        size /= 1024
        unit += 1
    if unit == 0:
        return f"{int(size)} bytes"
    text = f"{size:.1f}".removesuffix(".0")
    return f"{text} {_UNITS[unit]}"


@register.filter
def minimum(image: object) -> str:
    """An image's minimum memory and disk, leaving out the zeros ("none" without any)."""
    ram = getattr(image, "min_ram_mb", 0) or 0
    disk = getattr(image, "min_disk_gb", 0) or 0
    parts = [f"{ram} MiB memory"] * bool(ram) + [f"{disk} GiB disk"] * bool(disk)
    return ", ".join(parts) or "none"


#: what a request's Event means when its work goes on in a node: sent, not yet done
_SENT_ACTIONS = ("instance.", "image.publish")


@register.filter
def outcome_label(event: object) -> str:
    """The outcome in words: a request that only sent work to a node reads "sent" (the node's
    own ``node.*`` event says how it went), never "success 303"."""
    outcome = str(getattr(event, "outcome", ""))
    action = str(getattr(event, "action", ""))
    method = str(getattr(event, "method", ""))
    code = getattr(event, "status_code", None) or 0
    if (
        outcome == Outcome.SUCCESS
        and method == "POST"
        and action.startswith(_SENT_ACTIONS)
        and code in (202, 303)
    ):
        return "sent"
    return outcome


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
    label = gettext(label)  # the labels are literals of base.html, listed for makemessages in NAV_LABELS
    request = context["request"]
    path: str = getattr(request, "path", "")
    current = path == url if url == "/" else path.startswith(url) or (url, path) == ("/ops/nodes/", "/ops/")
    # the attribute is part of the template string: passed as an argument it would be escaped
    if current:
        return format_html('<a href="{}" aria-current="page">{}</a>', url, label)
    return format_html('<a href="{}">{}</a>', url, label)
