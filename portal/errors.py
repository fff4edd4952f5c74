"""Domain errors: what a service refuses, in one sentence, free of any web layer.

Services (``portal/*/services.py`` and friends) raise these; the REST API's
exception handler turns them into JSON with an HTTP status
(``portal.api.exceptions.http_status``), the pages into a form error or a
refusal page (``portal.web.access.attempt``), management commands into a
one-line ``CommandError``.  No Django or DRF import here, so any layer (and
any test) can raise and catch them.
"""

from __future__ import annotations


class DomainError(Exception):
    """A refused request; ``str(exc)`` is the sentence users see, ``code`` a stable identifier."""

    code = "error"

    @property
    def message(self) -> str:
        return str(self)


class Conflict(DomainError):
    """The request is valid but conflicts with the current state (answered with 409)."""

    code = "conflict"


class NotFound(DomainError):
    """The request names something that does not exist, e.g. a snapshot (answered with 404)."""

    code = "not_found"


class QuotaExceeded(Conflict):
    code = "quota_exceeded"


class InvalidAction(Conflict):
    """The action does not apply to the instance now (its state, its kind or its node)."""

    code = "invalid_action"
