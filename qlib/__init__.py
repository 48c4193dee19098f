"""qlab's shared package: assets, data, quantizers, training, metrics and reports for the notebooks.

The names below torch are loaded on first use, so `python -m qlib` can answer a Ctrl-C during its imports."""
from typing import Any

from qlib.core import __version__
from qlib.core.errors import QlabError
from qlib.core.progress import text_bars_when_headless
from qlib.core.quiet import quiet_libraries

quiet_libraries()  # a few library messages that tell a reader nothing (each named in qlib.core.quiet)
text_bars_when_headless()  # widgets in JupyterLab, text in papermill's executed copies

__all__ = ["__version__", "QlabError", "QuantMethod", "build_quantization_plan", "run_name"]


def __getattr__(name: str) -> Any:
    if name in ("QuantMethod", "build_quantization_plan"):
        from qlib import config

        return getattr(config, name)
    if name == "run_name":
        from qlib.runmeta import run_name

        return run_name
    raise AttributeError(f"module 'qlib' has no attribute {name!r}")
