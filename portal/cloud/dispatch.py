"""Sending messages to compute nodes: typed requests of :mod:`compute.spec`, after commit.

A message leaves only in ``transaction.on_commit``, so a node never hears of
a row that was rolled back.  Each goes to the node's own queue under its
message's task name, as the one argument of the task (its JSON).

A publish that fails after the commit (the broker away longer than the publish
retry policy waits) is not lost and does not turn the request that made it into
a 500: the message is kept as an :class:`~portal.cloud.models.UnsentMessage` and
:func:`flush` (the beat's sweep) sends it once the broker is back, in order, before
any later message to the same queue.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import Any

from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from compute.spec import NodeRequest, to_json

log = logging.getLogger(__name__)

#: how long a flush holds a message it is sending (longer than a publish's retry policy lasts)
CLAIM_SECONDS = 120
#: messages a flush sends at most (the next sweep goes on)
FLUSH_BATCH = 500


def send(queue: str, message: NodeRequest) -> None:
    """Send ``message`` to ``queue`` once the current transaction commits (at once outside one)."""
    task, payload = message.TASK, to_json(message)
    transaction.on_commit(lambda: deliver(queue, task, [payload]))


def deliver(queue: str, task: str, args: list[Any]) -> bool:
    """Publish now, or keep the message for :func:`flush` (False) if the broker does not take it.

    Runs after the commit: raising here would answer a request whose rows are saved with a
    500, and lose the message.
    """
    if waiting_unsent(queue):
        _keep(queue, task, args, "waits behind earlier messages to this queue")
        return False
    try:
        _send(queue, task, args)
    except Exception as exc:
        log.warning("publish of %s to %s failed (%r); kept to be sent again", task, queue, exc)
        _keep(queue, task, args, repr(exc), attempts=1)
        return False
    return True


def waiting_unsent(queue: str) -> bool:
    """Whether messages to ``queue`` wait unsent: a new one waits behind them, in order."""
    from portal.cloud.models import UnsentMessage

    return UnsentMessage.objects.filter(queue=queue).exists()


def _keep(queue: str, task: str, args: list[Any], why: str, attempts: int = 0) -> None:
    from portal.cloud.models import UnsentMessage

    try:
        UnsentMessage.objects.create(
            queue=queue, task=task, args=args, attempts=attempts, last_error=why[:2000]
        )
    except Exception:  # the database too: say what is lost; the sweeper fails its instance later
        log.exception("could not keep %s to %s (%s): the message is lost: %s", task, queue, why, args)


def flush(now: dt.datetime | None = None) -> dict[str, int]:
    """Send the kept messages, oldest first; stop at the first the broker still refuses.

    A message older than the broker's redelivery delay is dropped instead (logged): every task
    deadline is longer than that delay, so its instance is about to be failed by the sweeper
    ("did not report in time"), as for a message a node lost, and must not be acted on after.
    """
    from portal.cloud.deadlines import configured_visibility, redelivery_seconds
    from portal.cloud.models import UnsentMessage

    now = now or timezone.now()
    oldest = now - dt.timedelta(seconds=redelivery_seconds(float(configured_visibility())))
    free = Q(claimed_until__isnull=True) | Q(claimed_until__lt=now)
    hold = now + dt.timedelta(seconds=CLAIM_SECONDS)
    sent = dropped = failed = 0
    for row in UnsentMessage.objects.order_by("id")[:FLUSH_BATCH]:
        if not UnsentMessage.objects.filter(free, pk=row.pk).update(claimed_until=hold):
            break  # another sweep is sending it: it goes on in order, not this one
        if row.created_at < oldest:
            log.error(
                "dropping %s to %s kept since %s: the broker did not take it within the redelivery "
                "delay (last error: %s)",
                row.task,
                row.queue,
                row.created_at,
                row.last_error,
            )
            row.delete()
            dropped += 1
            continue
        try:
            _send(row.queue, row.task, row.args)
        except Exception as exc:
            UnsentMessage.objects.filter(pk=row.pk).update(
                attempts=F("attempts") + 1, last_error=repr(exc)[:2000], claimed_until=None
            )
            failed += 1
            break  # one broker for all queues: the rest waits for the next sweep
        row.delete()
        sent += 1
    if sent or dropped or failed:
        log.info("unsent messages: %d sent, %d dropped, %d failed again", sent, dropped, failed)
    return {"resent": sent, "dropped": dropped, "unsent_failed": failed}


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
            return
        except (AttributeError, IndexError) as exc:
            log.warning(
                "publish of %s to %s broke inside kombu (%r); again on a new connection", task, queue, exc
            )
        with app.connection_for_write() as conn:
            # as patient as the first try: a new connection otherwise gives up after its connect
            # timeout (4 s) while the broker is still restarting (tests/faults, the burst of 100)
            conn.ensure_connection(**_connect_policy(app))
            app.send_task(task, args=args, queue=queue, connection=conn)


def _connect_policy(app: Any) -> dict[str, Any]:
    policy = dict(app.conf.task_publish_retry_policy or {})
    return {
        key: policy[key]
        for key in ("max_retries", "interval_start", "interval_step", "interval_max")
        if key in policy
    }


def _send(queue: str, task: str, args: list[Any]) -> None:
    """The broker hop (tests replace it with a recorder)."""
    from portal.celery import app

    publish(app, queue, task, args)


def queued(queue: str) -> int | None:
    """How many messages wait in ``queue`` on the broker (None: the broker cannot say now).

    A queue the broker does not know holds none: Redis deletes a list once it is empty, so
    kombu's Redis transport answers "NOT_FOUND" for every empty queue (RabbitMQ: a queue not
    declared yet).
    """
    from amqp.exceptions import NotFound
    from kombu.exceptions import ChannelError

    from portal.celery import app

    try:
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)  # never hang the sweeper
            channel: Any = conn.default_channel
            try:
                return int(channel.queue_declare(queue=queue, passive=True).message_count)
            except (ChannelError, NotFound) as exc:
                if "NOT_FOUND" in str(exc) or isinstance(exc, NotFound):
                    return 0
                raise
    except Exception as exc:  # a broker away: no evidence either way
        log.info("cannot read the length of queue %s: %s", queue, exc)
        return None
