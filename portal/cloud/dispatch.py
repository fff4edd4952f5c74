"""Sending messages to compute nodes: typed requests of :mod:`compute.spec`, after commit.

A message leaves only in ``transaction.on_commit``, so a node never hears of
a row that was rolled back.  Each goes to the node's own queue under its
message's task name, as the one argument of the task (its JSON).
"""

from __future__ import annotations

from typing import Any

from django.db import transaction

from compute.spec import NodeRequest, to_json


def send(queue: str, message: NodeRequest) -> None:
    """Send ``message`` to ``queue`` once the current transaction commits (at once outside one)."""
    task, payload = message.TASK, to_json(message)
    transaction.on_commit(lambda: _send(queue, task, [payload]))


def _send(queue: str, task: str, args: list[Any]) -> None:
    """The broker hop (tests replace it with a recorder)."""
    from portal.celery import app

    app.send_task(task, args=args, queue=queue)
