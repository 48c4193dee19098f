"""The bitsandbytes backend's storage, counted: what its 4-bit (NF4/FP4) and LLM.int8 layers really store per
weight, in memory (`nf4_storage`, `stored_bits`) and as saved (`quantized_weight_bits`). The two views differ by
the small companion tensors a saved folder adds (quant map, nested offsets), so each result says which it used."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open

from qlib.core.errors import QlabError
from qlib.core.io import tensor_bytes


def nf4_storage(model: torch.nn.Module) -> dict[str, float]:
    """Bits per weight that the 4-bit linears really store (codes + absmax + DQ constants)."""
    n_weights, n_bits, n_layers, seen = 0, 0, 0, set()
    for m in model.modules():
        w = getattr(m, "weight", None)
        qs = getattr(w, "quant_state", None)
        if qs is None or id(w) in seen:  # peft's LoRA wrapper exposes its base layer's weight too
            continue
        seen.add(id(w))
        n_layers += 1
        n_weights += int(torch.Size(qs.shape).numel())
        n_bits += m.weight.numel() * m.weight.element_size() * 8 + qs.absmax.numel() * qs.absmax.element_size() * 8
        if qs.nested:
            n_bits += qs.state2.absmax.numel() * 32 + 32  # second-level scales + the offset
    if not n_layers:
        raise QlabError("the model has no 4-bit layers")
    return {"nf4_layers": n_layers, "nf4_weights": n_weights, "bits_per_param": n_bits / n_weights}


def stored_bits(model: torch.nn.Module) -> float | None:
    """Stored bits per weight of the bitsandbytes layers (codes + scales), None for a float model."""
    if any(getattr(getattr(m, "weight", None), "quant_state", None) is not None for m in model.modules()):
        return nf4_storage(model)["bits_per_param"]
    n, bits = 0, 0
    state = model.state_dict()  # LLM.int8 layers save int8 weights plus one fp32 scale per row (SCB)
    for key, scb in state.items():
        if key.endswith(".SCB"):
            w = state[key[: -len("SCB")] + "weight"]
            n += w.numel()
            bits += w.numel() * w.element_size() * 8 + scb.numel() * scb.element_size() * 8
    return bits / n if n else None


def quantized_weight_bits(folder: str | Path) -> float | None:
    """Stored bits per weight of the bitsandbytes-quantized linears of a saved folder, every companion tensor
    (absmax, nested absmax, quant map, SCB) counted: NF4 with double quantization comes to ~4.13, LLM.int8
    to 8 + 32 / in_features. None when nothing in the folder is quantized."""
    n_bytes, n_weights = 0, 0
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            keys = set(st.keys())
            for k in keys:
                if not k.endswith(".weight"):
                    continue
                scb = f"{k[:-len('weight')]}SCB"  # LLM.int8's per-row scales sit beside the weight
                nf4, int8 = f"{k}.absmax" in keys, scb in keys
                if not (nf4 or int8):
                    continue
                n_weights += math.prod(st.get_slice(k).get_shape()) * (2 if nf4 else 1)  # NF4: two codes a byte
                parts = [k, *(c for c in keys if c.startswith(f"{k}.")), *([scb] if int8 else [])]
                n_bytes += sum(tensor_bytes(st, c) for c in parts)
    return 8.0 * n_bytes / n_weights if n_weights else None

