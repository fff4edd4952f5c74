"""Every log line of the web server names the request it belongs to.

The 500 page tells the user "it was logged; quote the X-Request-ID header".
For that to be true, the one ERROR record Django writes for an unhandled
exception (logger ``django.request``, with the traceback) must carry the
request's id and reach the server's log: ``AuditMiddleware`` binds the id
for the length of the request (:func:`bound`), :class:`RequestIdFilter` puts
it on every record, and ``settings.LOGGING``'s format prints it.  gunicorn
runs with ``--capture-output`` (Makefile), so what Django writes to stderr
lands in ``var/log/web.log``; under docker-compose it is the container's
log.  Records outside a request show ``-``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextvars import ContextVar

REQUEST_ID: ContextVar[str] = ContextVar("skyport_request_id", default="-")
FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


@contextlib.contextmanager
def bound(request_id: str) -> Iterator[None]:
    """Log records made in this block (this thread or task) carry ``request_id``."""
    token = REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        REQUEST_ID.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (the bound request's id, or ``-``); never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True
