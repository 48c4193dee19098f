"""Quantizers, one file each, and one verb over them: `quant.apply(model, method, **options)` (api.py).

ptq (torch.ao INT8 dynamic/static) · qat (torch.ao QAT INT8, fake-quant weights at low bits) · uniform (switchable
fake quantization at 2/4/8 bits, symmetric absmax grids) · nf4 (NF4 in plain torch, the test oracle for
bitsandbytes) · bitnet (b1.58 BitLinear, packed ternary) · ladder (post-training round trips, study 05)."""
from qlib.quant.api import HANDLERS, apply, register

__all__ = ["HANDLERS", "apply", "register"]
