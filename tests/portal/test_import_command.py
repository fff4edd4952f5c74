"""manage.py import_image: its --version is the image's version (not Django's)."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.management import CommandError, call_command


def test_version_option_is_the_image_version(db: Any, tmp_path: Any) -> None:
    missing = tmp_path / "nope.tar"
    with pytest.raises(CommandError, match=r"nope\.tar: no such file"):
        call_command(
            "import_image", str(missing), "--name", "x", "--version", "1", "--format", "oci", "--public"
        )
