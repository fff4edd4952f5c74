"""The instance state machine: one rule per action, beside the states it moves between.

As Nova keeps its ``ALLOW_*`` lists next to ``vm_states``, every answer to
"may this action start now, and where does it end?" comes from :data:`RULES`:
``services.act`` and ``_claim`` (which states it may start from, which task
state it sets), the control worker (which vm_state a successful observation
settles in), the pages (which buttons are enabled), the API (which actions
``POST /instances/{id}/actions/`` accepts) and, through
:class:`compute.spec.Action`, the node (which actions it runs).  Adding an
action is a member of ``Action``, a rule here, a task state in
``choices.TaskState`` and the node's driver call.

An action that needs a driver capability is offered only where the node of
the instance reports that capability for the instance's kind (the heartbeat
says so: ``ComputeNode.drivers``), never by hard-coding what a kind can do.
Snapshots are resources of their own (``portal/storage``, the
``instances/{id}/snapshots/`` endpoints): ``delete_snapshot`` is not public
here, and snapshot and revert keep the snapshot rows in step whichever way
they are asked for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

from compute.spec import Action, Capability, Kind, PowerState
from portal.cloud.choices import LIVE_STATES, TaskState, VmState

#: every state an instance's disk exists in and the node can act on it
_ON_NODE = (VmState.ACTIVE, VmState.STOPPED, VmState.PAUSED)


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one action runs.

    ``task``: the task state while it is in flight.  ``allowed``: the
    vm_states it may start from (empty: never claimed, e.g. create).
    ``settles``: the vm_state after success (None: from the observed power
    state).  ``on_failure``: the vm_state after a failure (None: unchanged).
    ``needs``: the driver capability it needs.  ``params``: parameters it
    cannot run without; ``optional``: parameters it may be given.
    ``public``: accepted by the API's actions endpoint and offered on the
    pages (others have endpoints of their own).  ``work_seconds``: how long
    a node may take for the work once it has the message (the sweeper's
    deadline adds the broker's redelivery delay, ``deadlines.py``).
    ``button``: offered as a plain button (public, needs no parameters).
    """

    task: TaskState
    allowed: tuple[VmState, ...]
    settles: VmState | None
    on_failure: VmState | None = None
    needs: Capability | None = None
    params: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    public: bool = True
    work_seconds: float = 180

    @property
    def button(self) -> bool:
        return self.public and not self.params


RULES: dict[Action, Rule] = {
    Action.CREATE: Rule(
        TaskState.SPAWNING, (), VmState.ACTIVE, on_failure=VmState.ERROR, public=False, work_seconds=300
    ),
    Action.START: Rule(TaskState.STARTING, (VmState.STOPPED,), VmState.ACTIVE),
    Action.STOP: Rule(
        TaskState.STOPPING, (VmState.ACTIVE, VmState.PAUSED), VmState.STOPPED, optional=("timeout", "force")
    ),
    Action.REBOOT: Rule(TaskState.REBOOTING, (VmState.ACTIVE,), VmState.ACTIVE),
    Action.PAUSE: Rule(
        TaskState.PAUSING, (VmState.ACTIVE,), VmState.PAUSED, needs=Capability.PAUSE, work_seconds=60
    ),
    Action.RESUME: Rule(
        TaskState.RESUMING, (VmState.PAUSED,), VmState.ACTIVE, needs=Capability.PAUSE, work_seconds=60
    ),
    Action.SNAPSHOT: Rule(
        TaskState.SNAPSHOTTING,
        _ON_NODE,
        None,
        needs=Capability.SNAPSHOTS,
        params=("name",),
        work_seconds=300,
    ),
    Action.REVERT: Rule(
        TaskState.REVERTING, _ON_NODE, None, needs=Capability.SNAPSHOTS, params=("name",), work_seconds=300
    ),
    Action.DELETE_SNAPSHOT: Rule(
        TaskState.DELETING_SNAPSHOT,
        _ON_NODE,
        None,
        needs=Capability.SNAPSHOTS,
        params=("name",),
        public=False,
        work_seconds=300,
    ),
    Action.PUBLISH: Rule(
        TaskState.PUBLISHING,
        _ON_NODE,
        None,
        needs=Capability.PUBLISH,
        params=("upload_url", "upload_token"),
        public=False,
        work_seconds=300,
    ),
    # a stopped VM gets the new flavor's vCPUs, memory and (grown) disk; its own endpoint
    Action.RESIZE: Rule(
        TaskState.RESIZING,
        (VmState.STOPPED,),
        VmState.STOPPED,
        params=("vcpus", "ram_mb", "disk_gb"),
        public=False,
    ),
    Action.DELETE: Rule(TaskState.DELETING, LIVE_STATES, VmState.DELETED, public=False),
    # a drain's cold migration of a VM (portal/cloud/vm_migration.py): claimed by the drain, never
    # by a user; its deadline covers each step (stop, send the disk, create on the target) in turn
    Action.SEND_DISK: Rule(TaskState.MIGRATING, (), None, public=False, work_seconds=600),
}

#: actions ``POST /instances/{id}/actions/`` accepts, in the order pages show them
PUBLIC_ACTIONS = tuple(a for a, r in RULES.items() if r.public)
#: every parameter some public action takes (the API refuses others)
PUBLIC_PARAMS = frozenset(p for a in PUBLIC_ACTIONS for p in RULES[a].params + RULES[a].optional)
#: actions shown as plain buttons on an instance
BUTTON_ACTIONS = tuple(a for a, r in RULES.items() if r.button)

#: the vm_state a power state seen on the node implies (others leave vm_state as it is)
POWER_TO_VM: dict[PowerState, VmState] = {
    PowerState.RUNNING: VmState.ACTIVE,
    PowerState.PAUSED: VmState.PAUSED,
    PowerState.SHUTDOWN: VmState.STOPPED,
    PowerState.CRASHED: VmState.STOPPED,
}

_KIND_LABELS: dict[str, str] = {Kind.VM: "Virtual machines", Kind.CONTAINER: "Containers"}
#: what a missing capability means for users, and what to do instead
_HINTS: dict[Capability, str] = {
    Capability.SNAPSHOTS: "snapshots need a driver that keeps them (the VM driver does)",
    Capability.PUBLISH: "to publish a container, upload its OCI archive as an image",
}


def unknown(action: str) -> str | None:
    """Why ``action`` is not one users may ask for, or None."""
    if action in PUBLIC_ACTIONS:
        return None
    return f"Unknown action '{action}'; use one of {', '.join(sorted(PUBLIC_ACTIONS))}."


def unsupported(action: Action, kind: str, node: str, capabilities: Collection[str]) -> str | None:
    """Why the instance's node cannot run ``action`` for its kind, or None."""
    need = RULES[action].needs
    if need is None or need in capabilities:
        return None
    label = _KIND_LABELS.get(kind, f"{kind}s")
    hint = _HINTS.get(need)
    return (
        f"{label} do not support '{action}' on node {node or '-'}: its {kind} driver does not report "
        f"the {need} capability" + (f"; {hint}." if hint else ".")
    )


def missing_params(action: Action, params: Mapping[str, Any]) -> str | None:
    """Why ``params`` are not enough for ``action``, or None."""
    for name in RULES[action].params:
        if not str(params.get(name, "")).strip():
            what = "a snapshot name" if name == "name" else name
            return f"'{action}' needs {what} in params.{name}."
    return None


def may_start(action: Action, vm_state: str, task_state: str | None) -> bool:
    """Whether the instance's states let ``action`` claim it now."""
    return task_state is None and vm_state in RULES[action].allowed


def settled(action: Action, ok: bool, power_state: PowerState, vm_state: str) -> str:
    """The vm_state after the node reported ``action`` (``ok`` or not) and ``power_state``."""
    rule = RULES.get(action)
    if not ok:
        return rule.on_failure if rule is not None and rule.on_failure else vm_state
    if rule is not None and rule.settles is not None:
        return rule.settles
    return POWER_TO_VM.get(power_state, vm_state)
