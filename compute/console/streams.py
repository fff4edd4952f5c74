"""The Redis keys and limits a console hub (node) and the portal's relay share.

The node already dials the broker's Redis for its Celery queue, so the console
rides on the same connection direction: nothing on a node listens, and the
relay may run as several processes.  Per hub ``<prefix>`` = ``skyport:console:<hub>``:

    <prefix>:out    stream of terminal output: {"d": bytes} or, last, {"end": reason, "why": kind}
                    (kind: ended | idle | node_gone | error)
    <prefix>:in     stream of input from writers: {"d": bytes} or {"size": "cols rows"}
    <prefix>:alive  the hub's claim, refreshed every second (gone: the hub died); send input only
                    once it no longer starts with ``STARTING``
    <prefix>:lease  refreshed by every relay session attached; gone: the hub ends as idle

Both streams are capped (``MAXLEN``), so a guest spewing output costs at most
``OUT_MAXLEN * CHUNK`` bytes in Redis whatever the readers do; a reader that
falls further behind skips ahead and is told what it missed.
"""

from __future__ import annotations

import dataclasses

from compute import celeryconf

CHUNK = 16384  # one read of the terminal, one stream entry
OUT_MAXLEN = 256  # entries kept: at most 4 MiB of output per hub in Redis
IN_MAXLEN = 256
ALIVE_TTL = 3  # seconds; the hub refreshes its claim every second
LEASE_TTL = 15  # seconds; relays refresh every LEASE_EVERY while a client is attached
LEASE_EVERY = 5.0
STARTING = "starting:"  # the claim's value until the hub's streams are fresh (do not send yet)
END_KEEP = 60  # seconds the streams of an ended hub stay readable, so late readers see why


@dataclasses.dataclass(frozen=True)
class HubKeys:
    """The Redis keys of one hub."""

    hub: str

    @property
    def prefix(self) -> str:
        return f"skyport:console:{self.hub}"

    @property
    def out(self) -> str:
        return f"{self.prefix}:out"

    @property
    def inp(self) -> str:
        return f"{self.prefix}:in"

    @property
    def alive(self) -> str:
        return f"{self.prefix}:alive"

    @property
    def lease(self) -> str:
        return f"{self.prefix}:lease"


def is_ready(alive: bytes | str | None) -> bool:
    """Whether a hub's claim value says its streams are ready for input."""
    if alive is None:
        return False
    text = alive.decode() if isinstance(alive, bytes) else alive
    return not text.startswith(STARTING)


def redis_url(broker_url: str) -> str | None:
    """The Redis the console streams live in: the broker when it is one Redis, else None.

    Sentinel and RabbitMQ brokers are not supported for consoles yet (docs/console.md).
    """
    try:
        scheme = celeryconf.broker_scheme(broker_url)
    except celeryconf.BrokerConfigError:
        return None
    if scheme not in celeryconf.REDIS_SCHEMES or ";" in broker_url.strip(";"):
        return None
    return broker_url


NO_REDIS = (
    "consoles need CELERY_BROKER_URL to be one Redis (redis://); Sentinel and RabbitMQ are not supported yet"
)
