"""The API's JSON parser: bounded in size and in nesting depth.

DRF's own parser hands the body to ``json.load`` whole: a 100 KB body of
nested ``[`` raised ``RecursionError`` (a 500 on every JSON write endpoint),
and a body of any size was read into memory.  This one reads at most
``DATA_UPLOAD_MAX_MEMORY_SIZE`` bytes (``SKYPORT_BODY_MAX_BYTES``; 413 beyond) and refuses documents
nested deeper than ``SKYPORT_JSON_MAX_DEPTH`` levels (400), through
:mod:`compute.safejson`.  (DRF 3.18 reads ``request.body`` before calling
the parser; Django's ``RequestDataTooBig`` from there becomes the same 413
in ``portal.api.exceptions``.)  It is the only JSON parser in ``REST_FRAMEWORK``.
"""

from __future__ import annotations

import codecs
from typing import Any

from django.conf import settings
from rest_framework import exceptions, parsers, status
from rest_framework.utils import json as drf_json

from compute import safejson


class BodyTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "The request body is too large."
    default_code = "too_large"


def too_large_message() -> str:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return f"A body may be at most {limit} bytes (SKYPORT_BODY_MAX_BYTES)."


class JSONParser(parsers.JSONParser):
    """``application/json`` bodies, refused with a clear 400/413 when too deep or too large."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        data: bytes = stream.read(limit + 1) if stream is not None else b""
        if len(data) > limit:
            raise BodyTooLarge(too_large_message())
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            text = codecs.decode(data, encoding)
        except (UnicodeDecodeError, LookupError) as exc:
            raise exceptions.ParseError(f"JSON parse error - the body is not {encoding}: {exc}") from exc
        depth = settings.SKYPORT_JSON_MAX_DEPTH
        try:
            return safejson.loads(
                text,
                max_depth=depth,
                parse_constant=drf_json.strict_constant if self.strict else None,
            )
        except safejson.TooDeep as exc:
            raise exceptions.ParseError(
                f"JSON parse error - nested more than {depth} levels deep (SKYPORT_JSON_MAX_DEPTH)."
            ) from exc
        except ValueError as exc:
            raise exceptions.ParseError(f"JSON parse error - {exc}") from exc
