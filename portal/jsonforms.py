"""A form JSON field that refuses deeply nested documents instead of crashing.

Django's ``forms.JSONField`` catches only ``JSONDecodeError``: a value of
100,000 ``[`` raised ``RecursionError`` while cleaning the form, and again
while redisplaying it, so the admin's change pages of nodes and instances
answered 500.  This field measures the nesting first
(:mod:`compute.safejson`, the limit of the API's JSON bodies) and turns a
document that is too deep into a form error.  ModelAdmins of models with
JSON fields use it through :data:`JSON_FIELD_OVERRIDES`.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.forms.fields import InvalidJSONInput

from compute import safejson


class DepthLimitedJSONField(forms.JSONField):
    def _too_deep(self, value: Any) -> bool:
        if not isinstance(value, str):
            return False
        try:
            safejson.check_depth(value, settings.SKYPORT_JSON_MAX_DEPTH)
        except safejson.TooDeep:
            return True
        return False

    def to_python(self, value: Any) -> Any:
        if not self.disabled and self._too_deep(value):
            limit = settings.SKYPORT_JSON_MAX_DEPTH
            raise ValidationError(
                f"JSON nested more than {limit} levels deep (SKYPORT_JSON_MAX_DEPTH).", code="too_deep"
            )
        return super().to_python(value)

    def bound_data(self, data: Any, initial: Any) -> Any:
        if not self.disabled and self._too_deep(data):
            return InvalidJSONInput(data)
        return super().bound_data(data, initial)


#: ``ModelAdmin.formfield_overrides`` for models with JSON fields
JSON_FIELD_OVERRIDES: dict[type[models.Field[Any, Any]], dict[str, Any]] = {
    models.JSONField: {"form_class": DepthLimitedJSONField}
}
