"""List filters that refuse what the schema calls invalid, instead of ignoring or widening it.

django-filter reads integer fields through a decimal form field
(``vcpus__lte=0.5`` filtered happily) and booleans through a field that
turns anything it does not know into "no filter" (``active=maybe`` listed
everything).  The schema says integer and boolean, so generated clients and
schemathesis expect such values to be refused: here integers must be
integers and booleans ``true`` or ``false``, else the list
answers 400 with the filter's name, as for every other invalid filter;
a filter given with no value (``vcpus=``, ``created_at__lte=``) is none
of these either, only text filters may be empty.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from django import forms
from django.core.exceptions import ValidationError
from django.db import models
from django_filters import rest_framework as filters

from portal.api.strict import INTEGER_FIELDS


class StrictBooleanField(forms.NullBooleanField):
    def to_python(self, value: Any) -> bool | None:  # type: ignore[override]
        if value is None:
            return None
        if value in ("true", "false"):
            return bool(value == "true")
        raise ValidationError("Expected true or false.", code="invalid")

    def validate(self, value: Any) -> None:
        pass


class UTCDateTimeField(forms.DateTimeField):
    """A date and time, in UTC before it reaches the database: PostgreSQL refuses offsets beyond
    ±15:59 (``+16:32`` was a 500 there, though valid ISO 8601), and some early dates cannot be
    moved to UTC at all (a 400 then)."""

    def to_python(self, value: Any) -> dt.datetime | None:
        parsed = super().to_python(value)
        if parsed is None or parsed.tzinfo is None:
            return parsed
        try:
            return parsed.astimezone(dt.UTC)
        except OverflowError as exc:
            raise ValidationError("This date and time is out of range.", code="invalid") from exc


class UTCDateTimeFilter(filters.DateTimeFilter):  # type: ignore[misc]
    field_class = UTCDateTimeField


class IntegerFilter(filters.NumberFilter):  # type: ignore[misc]
    field_class = forms.IntegerField


class StrictBooleanFilter(filters.BooleanFilter):  # type: ignore[misc]
    """``true`` or ``false``; DRF's widget turned every other value into "no filter" before the field
    could refuse it, so this one reads the raw value."""

    field_class = StrictBooleanField

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["widget"] = forms.TextInput
        super().__init__(*args, **kwargs)


class StrictFilterSet(filters.FilterSet):  # type: ignore[misc]
    FILTER_DEFAULTS = {
        **filters.FilterSet.FILTER_DEFAULTS,
        **{field: {"filter_class": IntegerFilter} for field in INTEGER_FIELDS},
        models.BooleanField: {"filter_class": StrictBooleanFilter},
        models.DateTimeField: {"filter_class": UTCDateTimeFilter},
    }

    @classmethod
    def filter_for_lookup(cls, field: models.Field[Any, Any], lookup_type: str) -> tuple[Any, dict[str, Any]]:
        """A reference (``instance=<id>``, ``group=<id>``) filters by the id, as the schema says: an id
        nothing of yours has lists nothing (it was a 400 "Select a valid choice", which also told
        whether an id exists in another tenant)."""
        if isinstance(field, models.ForeignKey) and lookup_type == "exact":
            target = field.target_field
            if isinstance(target, models.UUIDField):
                return filters.UUIDFilter, {}
            if isinstance(target, models.AutoField | models.BigAutoField | models.IntegerField):
                return IntegerFilter, {}
        return super().filter_for_lookup(field, lookup_type)  # type: ignore[no-any-return]

    def is_valid(self) -> bool:
        """Also refuse a filter given without a value (``created_at__lte=``) unless it is text:
        an empty string is no integer, boolean, date or choice (django-filter read it as "no filter")."""
        valid = bool(super().is_valid())
        for name, given in self.filters.items():
            if self.data.get(name) == "" and not isinstance(given, filters.CharFilter):
                self.form.add_error(name, "A value is needed.")
                valid = False
        return valid


class FilterBackend(filters.DjangoFilterBackend):  # type: ignore[misc]
    """The filter backend of every view: its ``filterset_fields`` through :class:`StrictFilterSet`."""

    filterset_base = StrictFilterSet
