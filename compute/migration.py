"""Cold migration of a VM, the node's two halves: send a stopped VM's disk, rebuild it elsewhere.

The disk travels through the portal, so no node ever listens on an address:

1. **Source node** (:func:`send_disk`): the VM must already be stopped (a
   clean file system; a running VM is refused, never paused behind the
   user's back).  Its overlay and base are flattened into one standalone
   qcow2 (``qemu-img convert``, the same export ``publish`` uses) under
   ``<state_dir>/exports`` and PUT to the portal with a one-image upload
   token (:func:`compute.fetch.upload`, the publish path).  The VM is not
   touched: on any failure it is still defined, stopped, with its disk.
2. **Target node** (:func:`target_spec`): an ordinary create whose image is
   that upload (``location`` the portal's blob URL, ``digest`` the sha256
   the source reported), with the instance's own id, MAC and address.  The
   image cache fetches it with the node key and verifies the digest, and the
   VM runs on an overlay of it, as any VM does.
3. Only then is the source copy destroyed (the portal's job).

The node task that runs :func:`send_disk` is ``compute.instance.send_disk``
(:class:`compute.spec.SendDisk`, ``NodeService.send_disk``); the portal's
orchestration on a drain (claiming the row, the hidden image, ordering the
steps, events) is ``portal/cloud/vm_migration.py`` (docs/faults.md "drain").
A backup of a VM's root disk uses the same :func:`send_disk`, PUT to
``/api/v1/instances/<id>/backup-content`` (``portal/storage/backups.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

from compute import fetch
from compute.drivers.base import Driver, DriverError, InvalidState
from compute.spec import ImageFormat, ImageRef, InstanceSpec, PowerState


@dataclasses.dataclass(frozen=True)
class SentDisk:
    """What the source node uploaded: the digest the target must verify, and what it cost."""

    digest: str
    size: int
    export_seconds: float
    upload_seconds: float


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(fetch.CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def send_disk(driver: Driver, instance_id: str, url: str, token: str, state_dir: Path) -> SentDisk:
    """Flatten the stopped VM's disk and PUT it to ``url``; the VM stays as it was.

    Raises :class:`InvalidState` unless the VM is stopped, :class:`DriverError`
    (one sentence) when the export or the upload fails.  The export file is
    removed in every case.
    """
    state = driver.info(instance_id).power_state
    if state is not PowerState.SHUTDOWN:
        raise InvalidState(
            f"VM {instance_id} is {state.value}: stop it before sending its disk (a migration or a "
            "backup), so the disk is clean"
        )
    out = state_dir / "exports"
    out.mkdir(parents=True, exist_ok=True)
    dest = out / f"{instance_id}-migrate-{time.time_ns()}.qcow2"
    try:
        t0 = time.monotonic()
        driver.export_disk(instance_id, dest)
        digest = _sha256(dest)
        size = dest.stat().st_size
        t1 = time.monotonic()
        try:
            fetch.upload(url, token, dest)
        except fetch.FetchError as exc:
            raise DriverError(f"migrating {instance_id}: {exc}") from exc
        return SentDisk(digest, size, t1 - t0, time.monotonic() - t1)
    finally:
        dest.unlink(missing_ok=True)


def target_spec(spec: InstanceSpec, blob_url: str, digest: str) -> InstanceSpec:
    """The create the target node runs: the same instance (id, MACs, addresses) on the sent disk."""
    image = ImageRef(
        name=f"migrate-{spec.instance_id}",
        version=digest.removeprefix("sha256:")[:12],
        format=ImageFormat.QCOW2,
        digest=digest,
        location=blob_url,
    )
    return dataclasses.replace(spec, image=image)
