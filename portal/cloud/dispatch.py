"""Sending messages to compute nodes: typed requests of :mod:`compute.spec`, after commit.

A message leaves only in ``transaction.on_commit``, so a node never hears of
a row that was rolled back.  Each goes to the node's own queue under its
message's task name, as the one argument of the task (its JSON).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from django.db import transaction

from compute.spec import NodeRequest, to_json

log = logging.getLogger(__name__)


def send(queue: str, message: NodeRequest) -> None:
    """Send ``message`` to ``queue`` once the current transaction commits (at once outside one)."""
    task, payload = message.TASK, to_json(message)
    transaction.on_commit(lambda: _send(queue, task, [payload]))


#: One publish at a time per process.  The web server runs threads (gunicorn gthread), and
#: kombu's lazily made default channel is not safe when threads race to reconnect: during a
#: Redis restart, concurrent publishes failed with "'ChannelPromise' object has no attribute
#: '__value__'" and "pop from empty list" instead of retrying (tests/faults, the burst of 100).
#: A publish takes about a millisecond, and while the broker is away the first one's retries
#: (CELERY_TASK_PUBLISH_RETRY_POLICY) hold the others back instead of all retrying at once.
_PUBLISH_LOCK = threading.Lock()


def publish(app: Any, queue: str, task: str, args: list[Any]) -> None:
    """``app.send_task`` under the publish lock; once more on a connection of its own if kombu breaks.

    Broker errors kombu knows (connection refused, reset) are retried by Celery's publish retry
    policy.  But a Redis restart can leave the pooled connection's channel half torn down, and
    a publish then fails with an error no retry policy catches (tests/faults, the burst of 100:
    ``AttributeError: 'NoneType' object has no attribute 'client'``), after the instance's row
    was committed.  Such a publish is made again on a new connection, closed afterwards.
    """
    with _PUBLISH_LOCK:
        try:
            app.send_task(task, args=args, queue=queue)
        except (AttributeError, IndexError) as exc:
            log.warning(
                "publish of %s to %s broke inside kombu (%r); again on a new connection", task, queue, exc
            )
            with app.connection_for_write() as conn:
                app.send_task(task, args=args, queue=queue, connection=conn)


def _send(queue: str, task: str, args: list[Any]) -> None:
    """The broker hop (tests replace it with a recorder)."""
    from portal.celery import app

    publish(app, queue, task, args)


def queued(queue: str) -> int | None:
    """How many messages wait in ``queue`` on the broker (None: the broker cannot say now)."""
    from portal.celery import app

    try:
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)  # never hang the sweeper
            channel: Any = conn.default_channel
            return int(channel.queue_declare(queue=queue, passive=True).message_count)
    except Exception as exc:  # a broker away or a queue not declared yet: no evidence either way
        log.info("cannot read the length of queue %s: %s", queue, exc)
        return None
