"""What the placement preview tells whom about nodes.

The scheduler explains every node it did not choose, by name, with the
tenant a node is dedicated to and its load.  Operators see exactly that;
tenants see how many nodes were refused for which kind of reason
(:func:`portal.cloud.scheduler.summarize`): nothing about other tenants'
nodes, names or usage.  The API's preview and the launch form's both ask here.
"""

from __future__ import annotations

from collections.abc import Sequence

from portal.cloud import scheduler
from portal.tenancy.querysets import Actor


def rejected_for(actor: Actor, rejected: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """``rejected`` (node, reason) pairs as ``actor`` may see them."""
    if actor.is_operator:
        return list(rejected)
    return list(scheduler.summarize(rejected))
