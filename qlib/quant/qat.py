"""Quantization-aware training to INT8 with torch.ao (eager mode): fake-quant, fine-tune, convert.

Same INT8 islands as static PTQ (`qlib.quant.ptq.static_int8`): every nn.Linear wrapped in
quant/dequant stubs, so QAT and PTQ differ only in how the ranges and weights were found. Each
linear gets three fake-quants (its input, its weight, its output); they observe ranges (moving
averages) and pass gradients straight through the rounding (the STE of torch's fake_quantize
ops). Eager-mode prepare_qat does not fake-quantize embeddings: their rows are quantized to 8 bits
weight-only at conversion, exactly as in PTQ.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.ao import quantization as tq

from qlib.config import QlabError
from qlib.quant.ptq import _wrap_linears, set_engine


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
