from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings

# The Debian cloud guest and OCI app images (tests/workloads), for any test that names the fixture.
from tests.workloads import workload_images  # noqa: F401


@pytest.fixture(autouse=True, scope="session")
def _private_image_store() -> Iterator[None]:
    """The run's own image store (settings_test names it by PID); gone when the run ends."""
    yield
    store = Path(settings.SKYPORT_IMAGE_STORE)
    if store.name.startswith("test-store-"):
        shutil.rmtree(store, ignore_errors=True)
