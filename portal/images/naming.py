"""What an image's name and version may be: one rule for the API, the upload page and publishing.

Instance names are strict (``portal.cloud.naming``); image names become part of ``name:version``
references, URLs and file names on nodes, so they are strict too: letters, digits, dots,
dashes and underscores, starting with a letter or digit (versions may also hold ``+``).
"""

from __future__ import annotations

from django.core.validators import RegexValidator

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
NAME_RULE = (
    "Use letters, digits, dots, dashes and underscores, starting with a letter or digit (at most 100)."
)
VERSION_RE = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,39}$"
VERSION_RULE = (
    "Use letters, digits, dots, dashes, underscores and +, starting with a letter or digit (at most 40)."
)

name_validator = RegexValidator(NAME_RE, NAME_RULE)
version_validator = RegexValidator(VERSION_RE, VERSION_RULE)
