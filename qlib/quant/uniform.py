"""Switchable fake quantization: a Linear whose weights are rounded to 2, 4 or 8 bits in `forward`.

Why our own: the switchable-precision recipe needs one set of full-precision weights that can be
*re-quantized at a different width on every forward* (per layer, chosen at run time) with gradients
flowing through (straight-through estimator). torch.ao / bitsandbytes / torchao quantize once to a
fixed format; none switches width per call. The quantizer is the textbook one: symmetric, uniform,
one scale per output row (absmax / (2^(b-1) - 1)). 2 bits therefore means the levels {-s, 0, +s}.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qlib.core.errors import QlabError

QUANT_WIDTHS = (2, 4, 8)
FULL_PRECISION = (16, 32)   # "off": the weights are used as stored
WIDTHS = QUANT_WIDTHS + FULL_PRECISION


def check_width(bits: int) -> int:
    if bits not in WIDTHS or isinstance(bits, bool):
        raise QlabError(f"unsupported bit width {bits!r}; valid: {', '.join(map(str, WIDTHS))} (16/32 = off)")
    return int(bits)


def row_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """One scale per output row: absmax / qmax, never zero."""
    qmax = 2 ** (bits - 1) - 1
    return w.detach().abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / qmax


def fake_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Round to the symmetric per-row grid in the forward pass; identity gradient in the backward (STE)."""
    if bits in FULL_PRECISION:
        return w
    qmax = 2 ** (bits - 1) - 1
    scale = row_scale(w, bits)
    q = torch.clamp(torch.round(w / scale), -qmax, qmax) * scale
    return w + (q - w).detach()


class QuantLinear(torch.nn.Linear):
    """`nn.Linear` (so peft's LoRA wraps it like any Linear) holding full-precision weights, fake-quantized
    at `bit_width` on every call; `set_bit_width` switches it."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bit_width: int = 32,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.bit_width = check_width(bit_width)

    def set_bit_width(self, bits: int) -> None:
        self.bit_width = check_width(bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize(self.weight, self.bit_width), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bit_width={self.bit_width}"

    @classmethod
    def from_module(cls, m: torch.nn.Module, bit_width: int = 32) -> QuantLinear:
        """From GPT-2's Conv1D (weight stored in x out) or an nn.Linear (out x in): same function."""
        if type(m).__name__ == "Conv1D":
            weight = m.weight.detach().t()
        elif isinstance(m, torch.nn.Linear):
            weight = m.weight.detach()
        else:
            raise QlabError(f"cannot quantize a {type(m).__name__}: QuantLinear replaces Conv1D or nn.Linear")
        q = cls(weight.shape[1], weight.shape[0], m.bias is not None, bit_width,
                device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            q.weight.copy_(weight)
            if m.bias is not None:
                q.bias.copy_(m.bias.detach())
        return q


def patch_gpt2_with_quantization(model: torch.nn.Module, bit_width: int = 32) -> int:
    """Replace every Conv1D of a GPT-2 (attention and MLP of each block) by a QuantLinear; returns how many."""
    targets = [(name, m) for name, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    if not targets:
        raise QlabError("no Conv1D layers found: patch_gpt2_with_quantization expects a GPT-2 model")
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, QuantLinear.from_module(m, bit_width))
    return len(targets)
