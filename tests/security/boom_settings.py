"""Production settings plus one URL that fails, to see where a real 500 is logged (test_error_logging)."""

from portal.settings import *  # noqa: F403

ROOT_URLCONF = "tests.security.boom_urls"
