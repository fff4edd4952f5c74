"""How long an action may stay in flight before the sweeper declares it stuck.

Node tasks are acknowledged late: when a compute worker dies holding a
message, Redis delivers that message again, but only once it has been
unacknowledged for the broker's visibility timeout
(``SKYPORT_BROKER_VISIBILITY_SECONDS``) *and* a worker has looked for such
messages.  A task's deadline must leave room for that redelivery and then for
the work itself, or the sweeper marks an instance ``error`` just as the node
is about to create it.  So every deadline is derived from the visibility
timeout the broker connection really uses::

    deadline = visibility timeout + RESTORE_CHECK_SECONDS + WORK_SECONDS[task]

and :func:`check` refuses, at startup, a configuration where that does not
hold (see docs/faults.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from compute.spec import Action
from portal.cloud.choices import TaskState
from portal.cloud.states import RULES

#: kombu's Redis transport (5.x) looks for unacknowledged messages older than the visibility
#: timeout from a 10 s timer, and acts on every 10th tick only (``restore_visible(interval=10)``),
#: so an expired message can wait this much longer before it is delivered again.
RESTORE_CHECK_SECONDS = 100.0

#: how long a node may take for the work itself once it has the message, per task state
WORK_SECONDS: dict[str, float] = {rule.task: rule.work_seconds for rule in RULES.values()}
#: a VM disk backup (portal/storage/backups.py) is the node's ``send_disk`` under a task state of its own
WORK_SECONDS[TaskState.BACKING_UP] = RULES[Action.SEND_DISK].work_seconds

#: a deadline must exceed the redelivery delay by at least this much
MIN_MARGIN_SECONDS = 30.0


def redelivery_seconds(visibility: float) -> float:
    """The longest a message taken by a worker that died waits before it is delivered again."""
    return visibility + RESTORE_CHECK_SECONDS


def derive(visibility: float) -> dict[str, float]:
    """The deadline of each task state, in seconds from the moment the task is claimed."""
    return {task: redelivery_seconds(visibility) + work for task, work in WORK_SECONDS.items()}


def check(visibility: Any, deadlines: Mapping[str, float]) -> None:
    """Raise ImproperlyConfigured unless every deadline outlasts redelivery plus a margin."""
    if isinstance(visibility, bool) or not isinstance(visibility, int | float):
        raise ImproperlyConfigured(
            f"The broker visibility timeout must be a number of seconds, not {visibility!r} "
            "(SKYPORT_BROKER_VISIBILITY_SECONDS)."
        )
    if not math.isfinite(visibility) or visibility <= 0:
        raise ImproperlyConfigured(
            f"The broker visibility timeout must be a positive number of seconds, not {visibility} "
            "(SKYPORT_BROKER_VISIBILITY_SECONDS)."
        )
    missing = sorted(set(WORK_SECONDS) - set(deadlines))
    if missing:
        raise ImproperlyConfigured(f"No task deadline for {', '.join(missing)}.")
    floor = redelivery_seconds(visibility) + MIN_MARGIN_SECONDS
    short = {task: seconds for task, seconds in deadlines.items() if not seconds > floor}
    if short:
        listed = ", ".join(f"{task} {seconds:g} s" for task, seconds in sorted(short.items()))
        raise ImproperlyConfigured(
            f"Task deadlines ({listed}) must be longer than the broker's redelivery delay "
            f"(SKYPORT_BROKER_VISIBILITY_SECONDS={visibility:g} + {RESTORE_CHECK_SECONDS:g} s between "
            f"kombu's checks) plus {MIN_MARGIN_SECONDS:g} s, i.e. over {floor:g} s: otherwise the sweeper "
            "marks an instance error while the node may still get the message again after a worker "
            "crash."
        )


def configured_visibility() -> Any:
    """The visibility timeout the portal's broker connection uses (Celery's transport options).

    RabbitMQ has none (it delivers a dead worker's message again when its connection closes);
    SKYPORT_BROKER_VISIBILITY_SECONDS then bounds the redelivery delay the deadlines allow for.
    """
    from django.conf import settings

    return settings.CELERY_BROKER_TRANSPORT_OPTIONS.get(
        "visibility_timeout", settings.SKYPORT_BROKER_VISIBILITY_SECONDS
    )


def deadline_seconds(task: str) -> float:
    """The deadline of ``task`` under the current settings."""
    visibility = float(configured_visibility())
    return redelivery_seconds(visibility) + WORK_SECONDS[task]


def check_settings() -> None:
    """The startup check (CloudConfig.ready): the deadlines derived from the settings are sound."""
    visibility = configured_visibility()
    numeric = isinstance(visibility, int | float) and not isinstance(visibility, bool)
    check(visibility, derive(visibility) if numeric else {})
