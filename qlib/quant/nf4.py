"""NF4 (4-bit NormalFloat, QLoRA) in plain torch: the test oracle for bitsandbytes, not a kernel.

bitsandbytes does the real work on CPU and CUDA; this file exists so a test can check, value for
value, what bitsandbytes stores for single-level NF4: the 16 code values of the QLoRA paper, one fp32
absmax per block of 64 weights, two 4-bit codes per byte (first in the high nibble). Double quantization
here stores the absmax values in 8 bits (blocks of 256, minus their mean) on a *linear* int8 grid, where
bitsandbytes uses its dynamic 8-bit map: the byte count is the same, 4 + 8/64 + 32/(64*256) = 4.127 bits
per weight as saved, but the second-level codes are not bitsandbytes' (only the single-level path is
tested bit for bit). 4.127 describes the stored format, not necessarily what a backend keeps in memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# The 16 NF4 levels: quantiles of N(0,1) normalised to [-1, 1], with an exact zero (Dettmers et al. 2023).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


@dataclass
class NF4Tensor:
    """Packed 4-bit codes plus the per-block absmax (fp32, or 8-bit + offset when double-quantized)."""

    packed: torch.Tensor          # uint8, two codes per byte
    absmax: torch.Tensor          # fp32 per block, or uint8 codes when double-quantized
    shape: torch.Size
    blocksize: int = 64
    dq_scale: torch.Tensor | None = None   # per 256-block group (fp32), only with double quant
    dq_offset: float = 0.0
    dq_blocksize: int = 256

    def bits_per_param(self) -> float:
        """Stored bits per weight: codes + block constants (+ second-level constants)."""
        bits = self.packed.numel() * 8 + self.absmax.numel() * self.absmax.element_size() * 8
        if self.dq_scale is not None:
            bits += self.dq_scale.numel() * 32 + 32
        return bits / self.shape.numel()


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False,
                 dq_blocksize: int = 256) -> NF4Tensor:
    """Blockwise absmax scaling, then the nearest of the 16 NF4 levels for each weight."""
    flat = w.detach().float().reshape(-1)
    if flat.numel() % blocksize or flat.numel() % 2:
        raise ValueError(f"NF4 oracle needs numel divisible by blocksize {blocksize}, got {flat.numel()}")
    blocks = flat.view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    idx = (scaled.unsqueeze(-1) - NF4_CODE.to(scaled.device)).abs().argmin(dim=-1).to(torch.uint8).reshape(-1)
    packed = (idx[0::2] << 4) | idx[1::2]
    out = NF4Tensor(packed, absmax, w.shape, blocksize, dq_blocksize=dq_blocksize)
    if double_quant:
        out.dq_offset = absmax.mean().item()
        pad = -absmax.numel() % dq_blocksize
        centred = torch.nn.functional.pad(absmax - out.dq_offset, (0, pad)).view(-1, dq_blocksize)
        out.dq_scale = centred.abs().amax(dim=1).clamp_min(1e-12) / 127
        q = torch.round(centred / out.dq_scale.unsqueeze(1)).clamp(-127, 127) + 128
        out.absmax = q.reshape(-1)[: absmax.numel()].to(torch.uint8)
    return out


def dequantize_nf4(t: NF4Tensor) -> torch.Tensor:
    """Codes back to floats: level value times its block's absmax."""
    idx = torch.stack([t.packed >> 4, t.packed & 0x0F], dim=1).reshape(-1).long()
    absmax = t.absmax.float()
    if t.dq_scale is not None:
        scale = t.dq_scale.repeat_interleave(t.dq_blocksize)[: absmax.numel()]
        absmax = (absmax - 128) * scale + t.dq_offset
    values = NF4_CODE.to(idx.device)[idx].view(-1, t.blocksize) * absmax.unsqueeze(1)
    return values.reshape(t.shape)
