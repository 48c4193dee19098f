"""qlab's shared package: assets, data, quantizers, training, metrics and reports for the notebooks."""
from qlib.config import QuantMethod, build_quantization_plan
from qlib.core import __version__
from qlib.core.errors import QlabError
from qlib.runmeta import run_name  # noqa: E402

__all__ = ["__version__", "QlabError", "QuantMethod", "build_quantization_plan", "run_name"]
