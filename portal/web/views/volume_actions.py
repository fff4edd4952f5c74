"""A volume's move to another node and its backups, from the volume page.

Every action calls the service the API's ``VolumeViewSet`` calls
(``portal.storage.moves.move``, ``portal.storage.backups.start`` /
``set_policy`` / ``restore`` / ``delete``), so a refusal is the API's
sentence and status, shown on the volume page with nothing changed.
Restore and delete ask first, on a confirmation page.
"""

from __future__ import annotations

from django.contrib import messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.views.decorators.http import require_POST

from portal.audit.record import note_error
from portal.cloud.models import ComputeNode
from portal.storage import backups, moves
from portal.storage.models import Backup, BackupPolicy, Volume
from portal.web.access import Ask, Refusal, attempt, confirm_then_act, login_page, success, write_refusal
from portal.web.forms import BackupPolicyForm, MoveForm, RestoreForm
from portal.web.views.volumes import _detail, _volume, move_targets, restorable


def _back(volume: Volume) -> HttpResponseRedirect:
    return HttpResponseRedirect(reverse("web:volume", args=[volume.pk]), status=303)


def _backup(volume: Volume, bid: str) -> Backup:
    return get_object_or_404(Backup, volume=volume, pk=bid)


@require_POST
@login_page
def volume_move(request: HttpRequest, pk: str) -> HttpResponse:
    volume = _volume(request, pk)
    refused = write_refusal(request, volume.tenant_id, "volume.move", volume)
    if refused:
        return refused
    form = MoveForm(request.POST, nodes=move_targets(volume))
    if not form.is_valid():
        note_error(request, "invalid move target")
        error = " ".join(str(e) for e in form.errors.get("node", ())) or "Choose a node to move to."
        return _detail(request, volume, error, 400, move=form)
    node = ComputeNode.objects.get(name=form.cleaned_data["node"])
    outcome = attempt(request, lambda: moves.move(volume, node, request.user))
    if isinstance(outcome, Refusal):
        return _detail(request, volume, outcome.message, outcome.status, move=form)
    messages.success(request, f"Moving {volume.name} to {node.name}; this page shows the progress.")
    return _back(volume)


@require_POST
@login_page
def volume_backup(request: HttpRequest, pk: str) -> HttpResponse:
    volume = _volume(request, pk)
    refused = write_refusal(request, volume.tenant_id, "volume.backup", volume)
    if refused:
        return refused
    outcome = attempt(request, lambda: backups.start(volume, request.user))
    if isinstance(outcome, Refusal):
        return _detail(request, volume, outcome.message, outcome.status)
    messages.success(
        request, f"Backup of {volume.name} started on {volume.node}; the list updates when done."
    )
    return _back(volume)


@require_POST
@login_page
def volume_backup_policy(request: HttpRequest, pk: str) -> HttpResponse:
    """POST sets the policy (every N hours, keep M); POST with ``remove`` stops scheduled backups."""
    volume = _volume(request, pk)
    remove = "remove" in request.POST
    message = "removed" if remove else ""
    refused = write_refusal(request, volume.tenant_id, "volume.backup_policy", volume, message=message)
    if refused:
        return refused
    if remove:
        BackupPolicy.objects.filter(volume=volume).delete()
        messages.success(request, f"Scheduled backups of {volume.name} stopped; its backups stay.")
        return _back(volume)
    form = BackupPolicyForm(request.POST)
    if not form.is_valid():
        note_error(request, "invalid backup policy")
        return _detail(request, volume, "Check the backup policy.", 400, policy_form=form)
    data = form.cleaned_data
    attempt(request, lambda: backups.set_policy(volume, data["interval_hours"], data["retention"]))
    messages.success(
        request, f"{volume.name} is backed up every {data['interval_hours']} h, keeping {data['retention']}."
    )
    return _back(volume)


@login_page
def volume_backup_restore(request: HttpRequest, pk: str) -> HttpResponse:
    """GET ?backup=&name=&node=: a confirmation page; POST: restore the backup into a new volume."""
    volume = _volume(request, pk)
    posted = request.method == "POST"
    refused = write_refusal(request, volume.tenant_id, "volume.restore", volume)
    if refused:
        return refused
    rows = list(Backup.objects.filter(volume=volume))
    form = RestoreForm(request.POST if posted else request.GET, backups=restorable(rows))
    if not form.is_valid():
        note_error(request, "invalid restore")
        errors = [str(e) for f in ("backup", "name") for e in form.errors.get(f, ())]
        return _detail(request, volume, " ".join(errors) or "Check the restore.", 400, restore=form)
    backup = next(b for b in rows if str(b.pk) == form.cleaned_data["backup"])
    name, node_name = form.cleaned_data["name"], form.cleaned_data["node"]
    node = None
    if node_name:
        node = ComputeNode.objects.filter(name=node_name).first()
        if node is None:
            note_error(request, f"no node {node_name}")
            return _detail(request, volume, f"No node named {node_name!r}.", 400, restore=form)
    when = f"{backup.created_at:%Y-%m-%d %H:%M}"
    return confirm_then_act(
        request,
        Ask(
            f"Restore the backup of {when} into a new volume {name}?",
            f"A new {backup.size_gb} GiB volume {name} is made from the backup "
            f"({'on ' + node_name if node_name else 'on a node chosen as for a create'}); "
            f"it counts against the quota. Volume {volume.name} is not changed.",
            "Restore",
            reverse("web:volume", args=[volume.pk]),
            fields={"backup": str(backup.pk), "name": name, "node": node_name},
        ),
        act=lambda: backups.restore(backup, name, node, request.user),
        refused=lambda refusal: _detail(request, volume, refusal.message, refusal.status, restore=form),
        done=lambda new: success(
            request,
            f"Restoring into {new.name} on {new.node}; it is ready when available.",
            reverse("web:volume", args=[new.pk]),
        ),
    )


@login_page
def volume_backup_delete(request: HttpRequest, pk: str, bid: str) -> HttpResponse:
    """GET: a confirmation page; POST: delete the backup (its blob too unless shared)."""
    volume = _volume(request, pk)
    backup = _backup(volume, bid)
    refused = write_refusal(request, volume.tenant_id, "volume.backup.delete", volume, f"backup {backup.pk}")
    if refused:
        return refused
    when = f"{backup.created_at:%Y-%m-%d %H:%M}"
    back = reverse("web:volume", args=[volume.pk])
    return confirm_then_act(
        request,
        Ask(
            f"Delete the backup of {when} of volume {volume.name}?",
            "The backup is removed from the portal's store; you can no longer restore it.",
            "Delete backup",
            back,
        ),
        act=lambda: backups.delete(backup),
        refused=lambda refusal: _detail(request, volume, refusal.message, refusal.status),
        done=lambda _: success(request, f"Backup of {when} deleted.", back),
    )
