"""The one exception users see: the CLI prints its message on one line and exits non-zero."""
from __future__ import annotations

import argparse
from typing import NoReturn


class QlabError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage mistakes raise QlabError, so the CLI answers them in its one `qlab: error:` line
    (plain argparse prints the usage and a second error line of its own)."""

    def error(self, message: str) -> NoReturn:
        raise QlabError(f"{message} (see: {self.prog} --help)")
