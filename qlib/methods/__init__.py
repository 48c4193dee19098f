"""Post-training methods and formats, one module per family, all in one registry (`registry`): `formats` measures
whatever is registered. Importing this package registers the built-in families, transformers' first."""
from qlib.methods import hf  # noqa: F401 - registers fp16 and bitsandbytes
from qlib.methods import gguf  # noqa: F401 - registers llama.cpp's types, rounded to nearest
from qlib.methods import imatrix  # noqa: F401 - registers llama.cpp's types with an importance matrix
from qlib.methods import llm_compressor  # noqa: F401 - registers RTN, GPTQ and AWQ integer groups
from qlib.methods import hqq  # noqa: F401 - registers HQQ and its rounded-to-nearest control
from qlib.methods import torchao  # noqa: F401 - registers torchao's INT8 / INT4 weight-only
from qlib.methods.registry import REGISTRY, Calibration, Job, Method, get, register, resolve

__all__ = ["REGISTRY", "Calibration", "Job", "Method", "get", "register", "resolve"]
