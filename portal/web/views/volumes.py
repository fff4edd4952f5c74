"""Volume pages: the tenant's volumes, and one volume with its snapshots (take, revert, delete),
its move to another node and its backups (the forms of those are in ``volume_actions``).

The snapshot table, the take form and the revert form work like the
instance page's: revert picks from the names the portal lists (no free
text) and asks first; every refusal is the API's sentence and status, from
the same ``portal.storage.volume_snapshots`` calls.
"""

from __future__ import annotations

from django.contrib import messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.views.decorators.http import require_POST

from compute.spec import VolumeOp
from portal.audit.record import note_error
from portal.cloud.models import ComputeNode
from portal.errors import Conflict
from portal.storage import moves, volume_snapshots
from portal.storage.choices import BackupStatus, VolumeStatus
from portal.storage.models import Backup, BackupPolicy, Volume
from portal.tenancy.choices import Role
from portal.tenancy.models import Tenant
from portal.web.access import (
    Ask,
    Refusal,
    actor,
    attempt,
    confirm_then_act,
    login_page,
    page,
    role_refusal,
    success,
    tenant_page,
    write_refusal,
)
from portal.web.forms import BackupPolicyForm, MoveForm, RestoreForm, RevertForm, SnapshotForm


def _volume(request: HttpRequest, pk: str) -> Volume:
    """The volume if the actor may see it, else 404 (other tenants' volumes alike)."""
    qs = Volume.objects.restrict(actor(request)).select_related("tenant", "node", "instance", "move_node")
    return get_object_or_404(qs.exclude(status=VolumeStatus.DELETED), pk=pk)


@tenant_page
def volume_list(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    rows = (
        Volume.objects.restrict(actor(request))
        .exclude(status=VolumeStatus.DELETED)
        .filter(tenant=tenant)
        .select_related("node", "instance")
        .order_by("name")
    )
    return page(request, "web/volumes.html", {"volumes": rows})


def _detail(
    request: HttpRequest,
    volume: Volume,
    error: str = "",
    status: int = 200,
    snapshot: SnapshotForm | None = None,
    revert: RevertForm | None = None,
    move: MoveForm | None = None,
    policy_form: BackupPolicyForm | None = None,
    restore: RestoreForm | None = None,
) -> HttpResponse:
    names = volume_snapshots.revertible_names(volume)
    policy = BackupPolicy.objects.filter(volume=volume).first()
    rows = list(Backup.objects.filter(volume=volume).order_by("-created_at"))
    initial = {"interval_hours": policy.interval_hours, "retention": policy.retention} if policy else None
    context = {
        "volume": volume,
        "snapshots": list(volume.snapshots.all()),
        "refusal": role_refusal(actor(request), volume.tenant_id, Role.MEMBER),
        "snapshot_refusal": volume_snapshots.refusal(volume, VolumeOp.SNAPSHOT),
        "revert_refusal": volume_snapshots.refusal(volume, VolumeOp.REVERT),
        "snapshot_form": snapshot or SnapshotForm(),
        "revert_form": revert or RevertForm(names=names, of=f"volume {volume.name}"),
        "move_form": move or MoveForm(nodes=move_targets(volume)),
        "moving": volume.status == VolumeStatus.MOVING,
        "poll": POLL_SECONDS,
        "backups": rows,
        "policy": policy,
        "policy_form": policy_form or BackupPolicyForm(initial=initial),
        "restore_form": restore or RestoreForm(backups=restorable(rows)),
        "error": error,
    }
    return page(request, "web/volume_detail.html", context, status=status)


#: how often the move section polls while the volume moves (as the instance pages do)
POLL_SECONDS = 2


def move_targets(volume: Volume) -> list[str]:
    """Names of the nodes ``moves.check_target`` lets this volume move to (the API's rule, not a copy)."""
    out = []
    for node in ComputeNode.objects.order_by("name"):
        try:
            moves.check_target(volume, node)
        except Conflict:
            continue
        out.append(node.name)
    return out


def restorable(rows: list[Backup]) -> list[tuple[str, str]]:
    """(id, label) of the backups a restore may pick: the available ones, newest first."""
    return [
        (str(b.pk), f"{b.created_at:%Y-%m-%d %H:%M:%S} ({b.size_bytes} bytes)")
        for b in rows
        if b.status == BackupStatus.AVAILABLE
    ]


@login_page
def volume_detail(request: HttpRequest, pk: str) -> HttpResponse:
    return _detail(request, _volume(request, pk))


@require_POST
@login_page
def volume_snapshot_take(request: HttpRequest, pk: str) -> HttpResponse:
    volume = _volume(request, pk)
    refused = write_refusal(request, volume.tenant_id, "volume.snapshot", volume)
    if refused:
        return refused
    form = SnapshotForm(request.POST)
    if not form.is_valid():
        note_error(request, "invalid snapshot name")
        return _detail(request, volume, "Check the snapshot name.", 400, snapshot=form)
    name = form.cleaned_data["name"]
    outcome = attempt(request, lambda: volume_snapshots.take(volume, name, request.user))
    if isinstance(outcome, Refusal):
        return _detail(request, volume, outcome.message, outcome.status, snapshot=form)
    messages.success(request, f"Snapshot {name} sent to {volume.node}; the list updates when it reports.")
    return HttpResponseRedirect(reverse("web:volume", args=[volume.pk]), status=303)


@login_page
def volume_revert(request: HttpRequest, pk: str) -> HttpResponse:
    """GET ?name=: a confirmation page naming the snapshot; POST: ask the node to revert the volume."""
    volume = _volume(request, pk)
    posted = request.method == "POST"
    refused = write_refusal(request, volume.tenant_id, "volume.revert", volume)
    if refused:
        return refused
    names = volume_snapshots.revertible_names(volume)
    form = RevertForm(request.POST if posted else request.GET, names=names, of=f"volume {volume.name}")
    if not form.is_valid():
        note_error(request, "unknown snapshot name")
        return _detail(request, volume, form.error_text(), 400, revert=form)
    name = form.cleaned_data["name"]

    def check() -> Refusal | None:
        why = volume_snapshots.refusal(volume, VolumeOp.REVERT)
        if not why:
            return None
        note_error(request, why)
        return Refusal(why, 409)

    back = reverse("web:volume", args=[volume.pk])
    return confirm_then_act(
        request,
        Ask(
            f"Revert volume {volume.name} to snapshot {name}?",
            f"What was written to {volume.name} since snapshot {name} was taken is lost. "
            "This cannot be undone.",
            "Revert to snapshot",
            back,
            fields={"name": name},
        ),
        act=lambda: volume_snapshots.revert(volume, name, request.user),
        refused=lambda refusal: _detail(request, volume, refusal.message, refusal.status, revert=form),
        done=lambda _: success(
            request, f"Revert to {name} sent to {volume.node}; the list updates when it reports.", back
        ),
        check=check,
    )


@login_page
def volume_snapshot_delete(request: HttpRequest, pk: str, name: str) -> HttpResponse:
    """GET: a confirmation page; POST: ask the node to delete the snapshot (the row goes when it reports)."""
    volume = _volume(request, pk)
    refused = write_refusal(request, volume.tenant_id, "volume.delete_snapshot", volume, f"snapshot {name}")
    if refused:
        return refused
    back = reverse("web:volume", args=[volume.pk])
    return confirm_then_act(
        request,
        Ask(
            f"Delete snapshot {name} of volume {volume.name}?",
            "The snapshot is removed from the node; you can no longer revert to it.",
            "Delete snapshot",
            back,
        ),
        act=lambda: volume_snapshots.delete(volume, name, request.user),
        refused=lambda refusal: _detail(request, volume, refusal.message, refusal.status),
        done=lambda _: success(
            request, f"Deleting snapshot {name} on {volume.node}; the list updates when done.", back
        ),
        check=lambda: attempt(request, lambda: volume_snapshots.get(volume, name)),
    )
