"""409 for a value that clashes with an object that exists, naming the field it concerns.

A name and version already taken, a user who is already a member: the body
is valid, the state of the portal refuses it, so it is a conflict (409,
as every other clash with the current state), not invalid input (400).
The answer keeps the field, like a validation error, so forms (the upload
page) show the message next to it.
"""

from __future__ import annotations

from portal.errors import Conflict


class FieldConflict(Conflict):
    """A Conflict with the field it concerns (``errors``, as a validation error has)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.errors = {field: [message]}
