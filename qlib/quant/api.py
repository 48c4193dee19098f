"""One verb over the method registry (torchao's `quantize_(model, config)`): `quant.apply(model, method, **options)`
returns the model quantized with `method`, the QuantMethod names of `config` (fp32, fp16, int8, nf4, qlora, bitnet,
qlora_bitnet, ptq_int8, qat_int8, switchable). Each method has one registered handler; the quantizers stay in their
own files. What a handler does in place and what it copies follows its quantizer: torch.ao's PTQ returns a copy,
BitLinear and QuantLinear replace layers in place; use the returned model either way."""
from __future__ import annotations

import inspect
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qlib.config import SPECS, QuantMethod, build_quantization_plan
from qlib.core.device import device_map
from qlib.core.errors import QlabError
from qlib.quant import bitnet, ptq, qat, uniform

Handler = Callable[..., nn.Module]
HANDLERS: dict[QuantMethod, Handler] = {}


def register(method: QuantMethod) -> Callable[[Handler], Handler]:
    """Decorator: `fn(model, **options) -> model` becomes the handler of `method`."""
    def add(fn: Handler) -> Handler:
        HANDLERS[method] = fn
        return fn
    return add


def apply(model: nn.Module, method: str | QuantMethod, keep_lm_head: bool = True, **options: Any) -> nn.Module:
    """`model` quantized with `method` (options go to its handler); a method with no in-memory form is one line.
    The LM head stays in full precision unless `keep_lm_head` is False and the method can quantize it
    (bitsandbytes); recipes that keep it by design (BitNet b1.58) or quantize nothing (fp32) keep it either way."""
    m = QuantMethod.parse(method)
    if m not in HANDLERS:
        raise QlabError(f"{m.value} has no in-memory handler: a GGUF file is written and run by llama.cpp "
                        "(qlib.backends.gguf.convert / quantize)")
    fn = HANDLERS[m]
    if "keep_lm_head" in inspect.signature(fn).parameters:
        options["keep_lm_head"] = keep_lm_head
    return fn(model, **options)


@register(QuantMethod.FP32)
def _fp32(model: nn.Module) -> nn.Module:
    return model.float()


@register(QuantMethod.FP16)
def _fp16(model: nn.Module) -> nn.Module:
    return model.half()


def _bitsandbytes(method: QuantMethod) -> Handler:
    def handler(model: nn.Module, keep_lm_head: bool = True, dtype: torch.dtype = torch.float32) -> nn.Module:
        """bitsandbytes quantizes while loading: the weights go through a temporary folder and come back with the
        method's plan on the model's device, exactly as a saved folder loads with that method; unquantized weights
        in `dtype`. For a model that exists only in memory: a saved one loads quantized in one step with
        `models.load_causal_lm(path, method)`."""
        if not hasattr(model, "save_pretrained"):
            raise QlabError(f"{method.value} quantizes a transformers model on load; got a {type(model).__name__}")
        dev = next(model.parameters()).device
        plan = build_quantization_plan(method, dev, keep_lm_head=keep_lm_head)
        with tempfile.TemporaryDirectory(prefix="qlab-bnb-") as tmp:
            model.save_pretrained(tmp)
            quantized = type(model).from_pretrained(tmp, quantization_config=plan.bnb_config, dtype=dtype,
                                                    device_map=device_map(dev))
        # where it came from, not the temp folder: peft writes it into an adapter's config as the base
        quantized.name_or_path = quantized.config._name_or_path = model.name_or_path
        return quantized
    return handler


for _m, _spec in SPECS.items():  # every method the registry says bitsandbytes runs
    if _spec.backend == "bitsandbytes":
        register(_m)(_bitsandbytes(_m))


@register(QuantMethod.BITNET)
def _bitnet(model: nn.Module) -> nn.Module:
    """BitLinear b1.58 in place of every block projection (ternary weights, 8-bit activations), trainable; heads
    stay in full precision, as in the recipe."""
    bitnet.to_bitnet(model)
    return model


@register(QuantMethod.QLORA_BITNET)
def _qlora_bitnet(model: nn.Module) -> nn.Module:
    """The BitNet base frozen, ready for LoRA on top (the adapter is the only thing that trains)."""
    bitnet.to_bitnet(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@register(QuantMethod.PTQ_INT8)
def _ptq_int8(model: nn.Module, calib: Any = None, per_channel: bool = True) -> nn.Module:
    """torch.ao INT8: static with calibration batches when given, else dynamic (a copy either way)."""
    if calib is not None:
        return ptq.static_int8(model, calib, per_channel=per_channel)
    return ptq.dynamic_int8(model, per_channel=per_channel)


@register(QuantMethod.QAT_INT8)
def _qat_int8(model: nn.Module, per_channel: bool = True) -> nn.Module:
    """A trainable copy with torch.ao fake-quant observers, ready to fine-tune (then `qat.convert_qat`)."""
    return qat.prepare_qat_int8(model, per_channel=per_channel)


@register(QuantMethod.SWITCHABLE)
def _switchable(model: nn.Module, bit_width: int = 32) -> nn.Module:
    """GPT-2's Conv1D layers as QuantLinear, switchable between 2/4/8 bits (32: full precision)."""
    uniform.patch_gpt2_with_quantization(model, bit_width)
    return model
