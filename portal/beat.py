"""Beat's scheduler: Celery's persistent scheduler plus a proof of life for the health check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery.beat import PersistentScheduler

from portal import beat_health


class Scheduler(PersistentScheduler):
    """Touches ``<schedule>.sent`` after every task it handed to the broker.

    The schedule file itself proves nothing: with ``dbm.ndbm`` (Debian's
    Python) shelve has no ``sync`` and writes it only when beat closes it.
    A send that fails (broker down) raises before the touch, so the health
    check also catches a beat that runs but cannot send.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.schedule_path = Path(kwargs["schedule_filename"])
        super().__init__(*args, **kwargs)

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        result = super().apply_async(entry, producer, advance, **kwargs)
        beat_health.mark_sent(self.schedule_path)
        return result
