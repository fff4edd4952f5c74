"""Celery settings every Skyport process shares: the portal (web, control worker, beat) and the nodes.

Why one module: the delivery rules (at least once: acks_late, reject_on_worker_lost, prefetch 1,
the publish retry policy) must be the same on both ends of a queue, and the options that make
the broker highly available follow from its URL alone; ``portal/settings.py`` and
``compute/worker.py`` both take them from here instead of spelling them out twice.  Django-free:
``compute/`` imports it.

Brokers (``CELERY_BROKER_URL``; docs/deploy.md, "Several hosts"):

- ``redis://host:6379/0``: one Redis.  The single-host default (``make run``, compose).
- ``sentinel://h1:26379;sentinel://h2:26379;sentinel://h3:26379`` with ``SKYPORT_BROKER_MASTER``
  naming the primary the sentinels watch: Redis with automatic failover.  Replication is
  asynchronous, so a failover loses what the old primary had not yet copied
  (docs/benchmarks.md, "Broker failover").
- ``amqp://user:pw@h1:5672/skyport;amqp://user:pw@h2:5672/skyport;...``: a RabbitMQ cluster.
  Every queue Skyport declares is a **quorum queue** (replicated by Raft on a majority before the
  broker confirms), publishes wait for the broker's confirm, and clients move to the next URL
  when a node dies.  The default for several hosts: no message was lost in the failover runs.
"""

from __future__ import annotations

from typing import Any

from celery.app import amqp
from kombu import Queue

#: Publishing survives a broker outage (a restart, a failover) of up to ~20 s.
PUBLISH_RETRY_POLICY = {
    "max_retries": 40,
    "interval_start": 0,
    "interval_step": 0.25,
    "interval_max": 0.5,
}

REDIS_SCHEMES = ("redis", "rediss")
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")


#: Give this to ``Celery(amqp=...)`` in every Skyport app (see :class:`AMQP`).
AMQP_CLASS = "compute.celeryconf:AMQP"


class _QuorumQueues(amqp.Queues):
    def new_missing(self, name: str) -> Queue:
        queue = super().new_missing(name)
        queue.queue_arguments = {**(queue.queue_arguments or {}), "x-queue-type": "quorum"}
        return queue


class AMQP(amqp.AMQP):
    """Celery's AMQP helper, but with ``task_default_queue_type = "quorum"`` *every* queue is one.

    Celery makes only its default queue a quorum queue; a queue it meets by name (a node's
    ``node.<name>`` for the portal, ``control`` for a node) it declares classic, and RabbitMQ
    then refuses one of the two declarations (``inequivalent arg 'x-queue-type'``).
    """

    def Queues(self, queues: Any, *args: Any, **kwargs: Any) -> Any:
        quorum = self.app.conf.task_default_queue_type == "quorum"
        self.queues_cls = _QuorumQueues if quorum else amqp.Queues
        return super().Queues(queues, *args, **kwargs)


class BrokerConfigError(ValueError):
    """The broker settings cannot work; the message names the variable to fix."""


def reliability_settings() -> dict[str, Any]:
    """At-least-once delivery, JSON only, one message in flight per worker process."""
    return {
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_publish_retry_policy": dict(PUBLISH_RETRY_POLICY),
        "broker_connection_retry_on_startup": True,
    }


def broker_scheme(url: str) -> str:
    """The one scheme of a broker URL or ``;``-separated URL list (``redis``, ``sentinel``, ``amqp`` …)."""
    parts = [part.strip() for part in url.split(";") if part.strip()]
    schemes = {part.partition("://")[0] for part in parts}
    if not parts or any("://" not in part for part in parts) or len(schemes) != 1 or "" in schemes:
        raise BrokerConfigError(
            f"CELERY_BROKER_URL must be one URL or a ';'-separated list of one scheme, got {url!r}"
        )
    return schemes.pop()


def broker_settings(url: str, visibility: float, master_name: str | None = None) -> dict[str, Any]:
    """Celery's broker settings for ``url``.

    ``visibility``: seconds before Redis delivers again a message a worker took and never
    acknowledged (RabbitMQ does so when the worker's connection closes).  ``master_name``:
    the primary the sentinels monitor (``SKYPORT_BROKER_MASTER``), needed by ``sentinel://``.
    """
    scheme = broker_scheme(url)
    if scheme in REDIS_SCHEMES:
        return {"broker_url": url, "broker_transport_options": {"visibility_timeout": visibility}}
    if scheme == "sentinel":
        if not master_name:
            raise BrokerConfigError(
                "a sentinel:// CELERY_BROKER_URL needs SKYPORT_BROKER_MASTER, the name the sentinels monitor"
            )
        return {
            "broker_url": url,
            "broker_transport_options": {"visibility_timeout": visibility, "master_name": master_name},
        }
    if scheme in AMQP_SCHEMES:
        return {
            "broker_url": url,
            # wait for the broker to confirm each publish (a quorum queue confirms once a majority
            # of its replicas has the message); send_task retries on a failed confirm
            "broker_transport_options": {"confirm_publish": True},
            # every queue Celery declares (control, node.<name>) is replicated by Raft
            "task_default_queue_type": "quorum",
            # quorum queues refuse a global QoS; the worker detects them and uses per-consumer prefetch
            "worker_detect_quorum_queues": True,
        }
    raise BrokerConfigError(
        f"CELERY_BROKER_URL: unsupported scheme {scheme}:// (redis://, sentinel://, or amqp://)"
    )


def cache_url(broker_url: str, explicit: str | None) -> str:
    """Where the portal's cache lives: ``SKYPORT_CACHE_URL``, else the broker when it is one Redis.

    The cache (login counts, instance stats, console tails) needs Redis; a Sentinel or RabbitMQ
    broker cannot serve it, so those deployments must name a Redis in ``SKYPORT_CACHE_URL``.
    """
    if explicit:
        return explicit
    if broker_scheme(broker_url) in REDIS_SCHEMES:
        return broker_url
    raise BrokerConfigError(
        "SKYPORT_CACHE_URL must name a Redis (redis://host:6379/1) when CELERY_BROKER_URL is not one Redis"
    )
