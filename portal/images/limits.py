"""How large an imported image may be once unpacked, and where each bound comes from.

An archive is small on the wire and large on a node: a 10 MB OCI archive of
gzipped zeros unpacks to 10 GiB, and a 200 KB qcow2 may declare a 100 GiB
disk, which a VM's overlay then grows into whatever its flavor says.  The
import refuses images that no instance could ever hold:

* container images: the uncompressed bytes of all layers together
  (``SKYPORT_IMAGE_MAX_UNPACKED_BYTES``), each file
  (``SKYPORT_IMAGE_MAX_FILE_BYTES``, default: the total) and the number of
  entries (``SKYPORT_IMAGE_MAX_FILES``), counted while the layers are read
  (``compute.archive_safety.UnpackBudget``), never written out;
* VM disks: the virtual size (``SKYPORT_IMAGE_MAX_VIRTUAL_BYTES``).

Without an operator's setting the unpacked size is bounded by the largest
disk an instance of the image's owner can get (the largest flavor it may
use) and by the largest node disk; VM disks by that flavor as well.  With
neither flavors nor nodes yet (a fresh install imports its sample images
first) only the fallback applies.
"""

from __future__ import annotations

from django.conf import settings
from django.db.models import Max, Q

from compute.archive_safety import UnpackLimits
from portal.cloud.models import ComputeNode, Flavor
from portal.images.models import Image

GIB = 2**30
#: the unpacked-size bound before any flavor or node exists
FALLBACK_UNPACKED_BYTES = 20 * GIB


def largest_flavor_disk(image: Image) -> int | None:
    """Bytes of the largest disk a flavor usable with this image gives (public ones, and the
    owner's private ones), or None without flavors."""
    flavors = Flavor.objects.all()
    if image.owner_id is not None:
        flavors = flavors.filter(Q(is_public=True) | Q(tenant_id=image.owner_id))
    largest = flavors.aggregate(m=Max("disk_gb"))["m"]
    return int(largest) * GIB if largest else None


def largest_node_disk() -> int | None:
    largest = ComputeNode.objects.aggregate(m=Max("disk_gb"))["m"]
    return int(largest) * GIB if largest else None


def unpack_limits(image: Image) -> UnpackLimits:
    """The bounds of what ``image``'s container artifact may unpack to."""
    configured = settings.SKYPORT_IMAGE_MAX_UNPACKED_BYTES
    if configured:
        total, source = configured, "SKYPORT_IMAGE_MAX_UNPACKED_BYTES"
    else:
        derived = [
            (size, why)
            for size, why in (
                (largest_flavor_disk(image), "the largest flavor disk"),
                (largest_node_disk(), "the largest node disk"),
            )
            if size
        ]
        total, why = min(derived) if derived else (FALLBACK_UNPACKED_BYTES, "the default")
        source = f"{why}; SKYPORT_IMAGE_MAX_UNPACKED_BYTES sets the limit"
    per_file = settings.SKYPORT_IMAGE_MAX_FILE_BYTES
    return UnpackLimits(
        total_bytes=total,
        file_bytes=per_file or total,
        files=settings.SKYPORT_IMAGE_MAX_FILES,
        total_source=source,
        file_source="SKYPORT_IMAGE_MAX_FILE_BYTES" if per_file else source,
    )


def virtual_limit(image: Image) -> tuple[int, str]:
    """The largest virtual size ``image``'s VM disk may have, and why."""
    configured = settings.SKYPORT_IMAGE_MAX_VIRTUAL_BYTES
    flavor = largest_flavor_disk(image)
    if flavor is not None and flavor < configured:
        return flavor, "the largest flavor disk it may run with; no instance could hold a larger disk"
    return configured, "SKYPORT_IMAGE_MAX_VIRTUAL_BYTES"
