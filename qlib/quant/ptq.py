"""Post-training INT8 quantization of an encoder with PyTorch's own stack (torch.ao, eager mode).

torch.ao.quantization is deprecated in favour of torchao, but on this CPU it is still the INT8 path
that runs fast in eager mode: torchao's INT8 configs measured 14-24x slower than FP32 eager here,
and its INT4 weight-only kernels do not run on CPU. Dynamic = int8 weights, activations quantized
per batch at run time; static = int8 weights and activations, activation ranges calibrated once.
Static quantization wraps each nn.Linear in quant/dequant stubs (eager mode cannot trace a HF
model whole), so the int8 islands are the linears; LayerNorm, GELU and softmax stay FP32.
Embeddings get 8-bit weight-only rows in both (they hold half of MiniLM's parameters). Quantized
embeddings need contiguous index tensors: pass `token_type_ids` (tokenizers do) rather than letting
HF BERT expand its buffer.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from torch.ao import quantization as tq

from qlib.core.errors import QlabError
from qlib.core.io import atomic_write_bytes

# torch.ao's own deprecation notices (quantized dtypes, reduce_range): known, stated above.
warnings.filterwarnings("ignore", message=r".*quantize_per_(tensor|channel).*deprecated", category=UserWarning)
warnings.filterwarnings("ignore", message=r".*reduce_range will be deprecated", category=UserWarning)
warnings.filterwarnings("ignore", message=r"TypedStorage is deprecated", category=UserWarning)


def _linear_qconfig(per_channel: bool, dynamic: bool) -> tq.QConfig:
    if dynamic:
        return tq.per_channel_dynamic_qconfig if per_channel else tq.default_dynamic_qconfig
    weight = tq.default_per_channel_weight_observer if per_channel else tq.default_weight_observer
    return tq.QConfig(activation=tq.HistogramObserver.with_args(reduce_range=True), weight=weight)


def set_engine() -> str:
    """x86 (fbgemm + onednn) where available, else qnnpack (ARM)."""
    engines = torch.backends.quantized.supported_engines
    torch.backends.quantized.engine = "x86" if "x86" in engines else "qnnpack"
    return torch.backends.quantized.engine


def dynamic_int8(model: nn.Module, per_channel: bool = True, embeddings: bool = True) -> nn.Module:
    """A copy with every nn.Linear dynamic-INT8 (and embeddings 8-bit weight-only)."""
    set_engine()
    spec: dict[type, tq.QConfig] = {nn.Linear: _linear_qconfig(per_channel, dynamic=True)}
    if embeddings:
        spec[nn.Embedding] = tq.float_qparams_weight_only_qconfig
    return tq.quantize_dynamic(copy.deepcopy(model).eval(), spec, dtype=torch.qint8)


def _wrap_linears(model: nn.Module, qconfig: tq.QConfig) -> int:
    """Put each nn.Linear inside a QuantWrapper (quant -> linear -> dequant); returns how many."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                wrapper = tq.QuantWrapper(child)
                wrapper.qconfig = qconfig
                setattr(parent, name, wrapper)
                n += 1
    return n


def static_int8(model: nn.Module, calib_batches: Iterable[dict[str, torch.Tensor]],
                per_channel: bool = True, embeddings: bool = True) -> nn.Module:
    """A copy with INT8 linears whose activation ranges come from the calibration batches.

    To rebuild a saved model, calibrate on any one batch: load_state_dict overwrites every scale.
    """
    set_engine()
    q = copy.deepcopy(model).eval()
    q.qconfig = None
    if _wrap_linears(q, _linear_qconfig(per_channel, dynamic=False)) == 0:
        raise QlabError("static INT8: the model has no nn.Linear to quantize")
    if embeddings:
        for m in q.modules():
            if type(m) is nn.Embedding:
                m.qconfig = tq.float_qparams_weight_only_qconfig
    tq.prepare(q, inplace=True)
    n = 0
    with torch.no_grad():
        for batch in calib_batches:
            q(**{k: v for k, v in batch.items() if k != "labels"})
            n += 1
    if n == 0:
        raise QlabError("static INT8 needs at least one calibration batch")
    return tq.convert(q, inplace=True)


def count_quantized(model: nn.Module) -> dict[str, int]:
    """How many modules really are INT8, by kind: check that a variant quantized what it claims."""
    from torch.ao.nn import quantized as nnq
    from torch.ao.nn.quantized import dynamic as nnqd

    kinds = {"linear_dynamic": nnqd.Linear, "linear_static": nnq.Linear,
             "embedding": nnq.Embedding, "linear_fp32": nn.Linear}
    return {k: sum(type(m) is t for m in model.modules()) for k, t in kinds.items()}


def save_quantized(model: nn.Module, path: str | Path) -> Path:
    """torch.save the quantized state_dict (atomically); it loads back with weights_only=True."""
    import io

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_quantized(path: str | Path, skeleton: nn.Module) -> nn.Module:
    """Load a saved INT8 state_dict with weights_only=True into a skeleton of the same variant."""
    p = Path(path)
    if not p.is_file():
        raise QlabError(f"quantized checkpoint not found: {p}")
    try:
        state = torch.load(p, weights_only=True, map_location="cpu")
        skeleton.load_state_dict(state)
    except Exception as e:  # pickle/zip errors, or keys/shapes of another architecture
        detail = " ".join(line.strip() for line in str(e).splitlines()[:2])[:300]
        raise QlabError(f"cannot load {p} into {type(skeleton).__name__}: "
                        f"{type(e).__name__}: {detail}") from None
    return skeleton.eval()
