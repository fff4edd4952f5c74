"""Serializer fields that take exactly the JSON types the schema states.

DRF is lenient on purpose: a CharField takes ``0`` and stores ``"0"``, an
IntegerField takes ``"5"`` and ``5.0``, a BooleanField ``0``, ``"yes"`` and
``"on"``, a primary-key field ``"5"``.  The schema says string, integer,
boolean, so a generated client, or schemathesis, rightly expects those to be
refused; accepting them hides client bugs and makes the schema untrue.  Every
writable serializer derives from :class:`StrictModelSerializer` (model fields
map to these) or declares these fields itself.
"""

from __future__ import annotations

from typing import Any, TypeVar

from django.db import models
from rest_framework import serializers

_M = TypeVar("_M", bound=models.Model)


class _StringOnly:
    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")  # type: ignore[attr-defined]
        return super().to_internal_value(data)  # type: ignore[misc,no-any-return]


class StrictCharField(_StringOnly, serializers.CharField):
    pass


class StrictRegexField(_StringOnly, serializers.RegexField):
    pass


class StrictSlugField(_StringOnly, serializers.SlugField):
    pass


class StrictIntegerField(serializers.IntegerField):
    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictFloatField(serializers.FloatField):
    def to_internal_value(self, data: Any) -> float:
        if isinstance(data, bool) or not isinstance(data, int | float):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


class StrictPrimaryKeyRelatedField(serializers.PrimaryKeyRelatedField):  # type: ignore[type-arg]
    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("incorrect_type", data_type=type(data).__name__)
        return super().to_internal_value(data)


#: model fields that hold integers (the filters map them too, portal/api/filters.py)
INTEGER_FIELDS = (
    models.IntegerField,
    models.BigIntegerField,
    models.SmallIntegerField,
    models.PositiveIntegerField,
    models.PositiveBigIntegerField,
    models.PositiveSmallIntegerField,
)


class StrictModelSerializer(serializers.ModelSerializer[_M]):
    serializer_field_mapping = {
        **serializers.ModelSerializer.serializer_field_mapping,
        models.CharField: StrictCharField,
        models.TextField: StrictCharField,
        models.SlugField: StrictSlugField,
        models.FloatField: StrictFloatField,
        models.BooleanField: StrictBooleanField,
        **{field: StrictIntegerField for field in INTEGER_FIELDS},
    }
    serializer_related_field = StrictPrimaryKeyRelatedField


class QuerySerializer(serializers.Serializer):  # type: ignore[type-arg]
    """Query parameters of a view: one given empty (``since=``) is refused with "A value is needed.",
    as the list filters refuse it (portal/api/filters.py); DRF reads an empty form value as absent,
    which the schema does not allow."""

    def to_internal_value(self, data: Any) -> Any:
        empty: dict[str, list[str]] = {
            str(name): ["A value is needed."] for name in self.fields if data.get(name) == ""
        }
        if empty:
            raise serializers.ValidationError(empty)
        return super().to_internal_value(data)
