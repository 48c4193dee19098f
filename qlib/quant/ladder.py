"""Post-training weight formats as round trips (quantize, then dequantize to fp32): where each one breaks.

A ladder of weight-only formats applied to a trained model's block linears without any training, so their
quality can be read on one model, one tokenizer, one set of windows. NF4 and FP4 are bitsandbytes' own
quantizers (`quantize_4bit` / `dequantize_4bit`); the integer grids are the textbook symmetric absmax
quantizer in groups of 64 (NF4's block size, so every 4-bit-or-less rung has the same scale overhead);
ternary is BitNet b1.58's absmean (one scale per matrix, `qlib.quant.bitnet`). Q4_1 is llama.cpp's
asymmetric 4-bit format (blocks of 32, fp16 scale and minimum): a model shipped as Q4_1 comes back through
it almost unchanged, which is the control for a reference that already lies on that grid.
Written here, not taken from a library, only where no library offers the format as a round trip on CPU
(grouped int3/int2, Q4_1 outside llama.cpp).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qlib.core.errors import QlabError
from qlib.quant import bitnet

GROUP = 64


def grouped_int(w: torch.Tensor, bits: int, group: int = GROUP) -> torch.Tensor:
    """Symmetric absmax integer grid, one scale per `group` consecutive weights of a row."""
    rows, cols = w.shape
    if cols % group:
        raise QlabError(f"rows of {cols} do not split into groups of {group}")
    g = w.reshape(rows, cols // group, group)
    qmax = 2 ** (bits - 1) - 1
    scale = g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
    return (torch.round(g / scale).clamp(-qmax, qmax) * scale).reshape(rows, cols)


def bnb_4bit(w: torch.Tensor, kind: str) -> torch.Tensor:
    """bitsandbytes' NF4 or FP4 (blocks of 64, fp32 absmax), quantized and dequantized by bitsandbytes."""
    import bitsandbytes.functional as F

    q, state = F.quantize_4bit(w.contiguous(), blocksize=GROUP, quant_type=kind)
    return F.dequantize_4bit(q, state).to(w.dtype).reshape(w.shape)


def q4_1(w: torch.Tensor, block: int = 32) -> torch.Tensor:
    """llama.cpp's Q4_1: per block of 32, d = (max - min) / 15 and min stored in fp16, codes round((w-min)/d)."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // block, block)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    d = ((hi - lo) / 15).half().float()
    m = lo.half().float()
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round((g - m) * inv).clamp(0, 15)
    return (q * d + m).reshape(rows, cols)


def ternary(w: torch.Tensor) -> torch.Tensor:
    codes, scale = bitnet.quantize_weights(w)
    return codes * scale


@dataclass(frozen=True)
class Rung:
    """One post-training format: its round trip and its stored bits per weight (codes + scales)."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    bits_per_weight: float
    what: str


RUNGS: dict[str, Rung] = {r.name: r for r in [
    Rung("q4_1_control", q4_1, 4 + 32 / 32, "llama.cpp Q4_1, the grid the reference was shipped on: the control"),
    Rung("int8", lambda w: grouped_int(w, 8), 8 + 16 / GROUP, "symmetric int8, absmax per 64"),
    Rung("nf4", lambda w: bnb_4bit(w, "nf4"), 4 + 32 / GROUP, "bitsandbytes NF4, absmax per 64 (no double quant)"),
    Rung("fp4", lambda w: bnb_4bit(w, "fp4"), 4 + 32 / GROUP, "bitsandbytes FP4 (e2m1), absmax per 64"),
    Rung("int4", lambda w: grouped_int(w, 4), 4 + 16 / GROUP, "symmetric int4 (15 levels), absmax per 64"),
    Rung("int3", lambda w: grouped_int(w, 3), 3 + 16 / GROUP, "symmetric int3 (7 levels), absmax per 64"),
    Rung("int2", lambda w: grouped_int(w, 2), 2 + 16 / GROUP, "symmetric int2 = {-s, 0, +s}, absmax per 64"),
    Rung("ternary_absmean", ternary, 1.58, "BitNet b1.58 absmean ternary, one scale per matrix, no training"),
]}


def block_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The transformer blocks' nn.Linear layers (embeddings and the tied output head stay as they are)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    if not found:
        raise QlabError("no block linears found (expected a LLaMA/Qwen2-style model with model.layers.N.*)")
    return found


def block_index(name: str) -> int:
    """The transformer block a `model.layers.N.*` module belongs to."""
    return int(name.split(".layers.")[1].split(".")[0])


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the block linears' weights, to round from and to restore."""
    return {n: m.weight.detach().clone() for n, m in block_linears(model)}


@torch.no_grad()
def restore(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    for n, m in block_linears(model):
        m.weight.copy_(weights[n])


@torch.no_grad()
def apply(model: torch.nn.Module, rung: str | Rung) -> int:
    """Replace every block linear's weight by its round trip through `rung`, in place; how many weights."""
    r = RUNGS[rung] if isinstance(rung, str) else rung
    n = 0
    for _, lin in block_linears(model):
        lin.weight.copy_(r.fn(lin.weight.float()).to(lin.weight.dtype))
        n += lin.weight.numel()
    return n
