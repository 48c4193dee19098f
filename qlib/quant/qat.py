"""Quantization-aware training: to INT8 with torch.ao (eager mode: fake-quant, fine-tune, convert), and weight-only
at 4 bits (or 2/8) on the textbook per-row grid, simulated (`fake_quant_weights`).

Same INT8 islands as static PTQ (`qlib.quant.ptq.static_int8`): every nn.Linear wrapped in
quant/dequant stubs, so QAT and PTQ differ only in how the ranges and weights were found. Each
linear gets three fake-quants (its input, its weight, its output); they observe ranges (moving
averages) and pass gradients straight through the rounding (the STE of torch's fake_quantize
ops). Eager-mode prepare_qat does not fake-quantize embeddings: their rows are quantized to 8 bits
weight-only at conversion, exactly as in PTQ.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from torch.ao import quantization as tq

from qlib.core.errors import QlabError
from qlib.quant.ptq import _wrap_linears, load_quantized, set_engine
from qlib.quant.uniform import check_width, fake_quantize


def prepare_qat_int8(model: nn.Module, per_channel: bool = True) -> nn.Module:
    """A trainable copy with fake-quant on every linear's input and weight (and embedding rows)."""
    engine = set_engine()
    q = copy.deepcopy(model).train()
    q.qconfig = None
    qconfig = tq.get_default_qat_qconfig(engine)
    if not per_channel:
        qconfig = tq.QConfig(activation=qconfig.activation, weight=tq.default_fake_quant)
    if _wrap_linears(q, qconfig) == 0:
        raise QlabError("QAT: the model has no nn.Linear to quantize")
    for m in q.modules():
        if type(m) is nn.Embedding:  # quantized at convert (weight-only rows), not during training
            m.qconfig = tq.float_qparams_weight_only_qconfig
    return tq.prepare_qat(q, inplace=True)


def convert_qat(model: nn.Module) -> nn.Module:
    """Freeze the learned ranges and produce the real INT8 model (a copy, in eval mode)."""
    q = copy.deepcopy(model).eval()
    return tq.convert(q, inplace=True)


def fake_quant_modules(model: nn.Module) -> int:
    """How many fake-quant modules a prepared model carries (a check that prepare did its job)."""
    return sum(isinstance(m, tq.FakeQuantizeBase) for m in model.modules())


def ste_check(scale: float = 0.1) -> torch.Tensor:
    """Gradient of sum(fake_quant(x)) w.r.t. x: ones inside the range, zeros where clipped (the STE)."""
    x = torch.linspace(-20, 20, 41, requires_grad=True)
    torch.fake_quantize_per_tensor_affine(x, scale, 0, -128, 127).sum().backward()
    assert x.grad is not None
    return x.grad


# ---------------------------------------------------------------- weight-only QAT below 8 bits (simulated)

def _weight_linears(model: nn.Module, skip: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and not any(s in n for s in skip)]


class _FakeQuantWeight(nn.Module):
    """A parametrization: the stored full-precision weight is read through the per-row absmax grid."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w, self.bits)


def fake_quant_weights(model: nn.Module, bits: int = 4, skip: tuple[str, ...] = ("classifier", "pooler")) -> nn.Module:
    """A copy whose linear weights (all but `skip`) are read through the `bits` grid (symmetric, one absmax scale
    per output row; `qlib.quant.uniform`) on every forward, gradients passed straight through to the stored
    weights. Evaluated as is, it is round-to-nearest PTQ; trained, it is weight-only QAT on the same grid.
    Simulated in fp32: torch.ao has no 4-bit kernel on CPU, so no size or speed is claimed for it."""
    from torch.nn.utils import parametrize

    check_width(bits)
    q = copy.deepcopy(model)
    targets = _weight_linears(q, skip)
    if not targets:
        raise QlabError("weight fake-quant: the model has no nn.Linear outside " + ", ".join(skip))
    for _, m in targets:
        parametrize.register_parametrization(m, "weight", _FakeQuantWeight(bits))
    return q


def fake_quant_weight_count(model: nn.Module) -> int:
    """Weights read through a fake-quant grid (a check that `fake_quant_weights` reached the layers)."""
    return sum(m.parametrizations.weight.original.numel() for m in model.modules()
               if hasattr(m, "parametrizations") and "weight" in m.parametrizations)


def load_qat(path: str | Path) -> torch.nn.Module:
    """Rebuild a saved QAT INT8 model: architecture from config.json, weights with weights_only=True."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    p = Path(path)
    if not (p / "model_int8.pt").is_file() or not (p / "config.json").is_file():
        raise QlabError(f"{p} is not a QAT INT8 folder (needs model_int8.pt and config.json)")
    arch = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(p))
    skeleton = convert_qat(prepare_qat_int8(arch))
    return load_quantized(p / "model_int8.pt", skeleton)
