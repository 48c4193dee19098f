"""qlab's shared package: assets, data, quantizers, training, metrics and reports for the notebooks."""
__version__ = "0.1.0"

from qlib.config import QlabError, QuantMethod, build_quantization_plan  # noqa: E402
from qlib.runmeta import run_name  # noqa: E402

__all__ = ["QlabError", "QuantMethod", "build_quantization_plan", "run_name"]
