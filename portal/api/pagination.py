"""Pages of every list: ``page`` and ``page_size``, refused when they are not what the schema says.

DRF's page-number pagination silently used 50 items for ``page_size=null``
or ``page_size=0``, cut ``page_size=10000`` to the maximum and took
``page=last``: requests the schema calls invalid were answered as if they
were valid, so a client could not know what it got.  Here a ``page_size``
that is not an integer from 1 to 500 is a 400, a page that is not a
positive integer (or past the end) a 404, and the schema states the bounds.
"""

from __future__ import annotations

from typing import Any

from rest_framework.exceptions import ValidationError
from rest_framework.pagination import PageNumberPagination
from rest_framework.request import Request


class Pagination(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500
    last_page_strings = ()  # "page=last" is not an integer

    def get_page_size(self, request: Request) -> int:
        raw = request.query_params.get(self.page_size_query_param, None)
        if raw is None:
            return self.page_size
        if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= self.max_page_size):
            raise ValidationError(
                {self.page_size_query_param: [f"An integer from 1 to {self.max_page_size}."]}
            )
        return int(raw)

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        parameters = super().get_schema_operation_parameters(view)
        for p in parameters:
            p["schema"]["minimum"] = 1
            if p["name"] == self.page_size_query_param:
                p["schema"]["maximum"] = self.max_page_size
        return parameters
