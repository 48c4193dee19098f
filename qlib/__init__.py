"""qlab's shared package: assets, data, quantizers, training, metrics and reports for the notebooks."""
from qlib.config import QlabError, QuantMethod, build_quantization_plan, run_name

__all__ = ["QlabError", "QuantMethod", "build_quantization_plan", "run_name"]
__version__ = "0.1.0"
