"""One module per notebook: the study's whole run as functions the notebook calls and the tests run on tiny data."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class StudyResult:
    """What every study returns: its rows, the metrics document as written, and where it went."""

    rows: list[dict[str, Any]]
    doc: dict[str, Any]
    metrics_path: Path
