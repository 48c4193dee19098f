"""The grid shared by the weight-only integer methods (RTN, GPTQ, AWQ, HQQ): which linears they quantize, and the
group size along the input dimension, the same for a method and its round-to-nearest control."""
from __future__ import annotations

import torch

from qlib.core.errors import QlabError

GROUPS = (128, 64, 32)  # 128 as the papers use where it divides every row; SmolLM2's 576-wide rows take 64
KEEP = ("lm_head",)     # the LM head (tied to the embeddings in most small LMs) stays as stored


def linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The linears a weight-only method quantizes: every one but the LM head."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith(KEEP)}


def group_size(model: torch.nn.Module) -> int:
    """The largest group of GROUPS that divides the input width of every linear to be quantized."""
    widths = sorted({m.in_features for m in linears(model).values()})
    for g in GROUPS:
        if all(w % g == 0 for w in widths):
            return g
    raise QlabError(f"no group size of {GROUPS} divides every linear's input width {widths}")
