"""The one exception users see: the CLI prints its message on one line and exits non-zero."""
from __future__ import annotations


class QlabError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""
