"""BitNet b1.58: ternary weights {-1, 0, +1} x absmean scale, 8-bit absmax activations, STE; packing.

Why our own: BitLinear is a training-time layer (a few lines of fake quantization); no maintained
package provides it for HF GPT-2's Conv1D on CPU. Following Ma et al. 2024 ("The Era of 1-bit LLMs"):
  weights      W_q = RoundClip(W / (mean|W| + eps), -1, 1),  W ~ W_q * mean|W|   (one scale per matrix)
  activations  x_q = Clip(round(x * 127 / max|x|), -128, 127) per token,  x ~ x_q * max|x| / 127
  gradients    straight-through: forward uses the quantized values, backward treats rounding as identity.
Storage: 2 bits per weight (four per byte), or base-3 (five trits per byte: 3^5 = 243 <= 256) for
1.6 bits per weight, plus one fp32 scale per matrix.
"""
from __future__ import annotations

import torch
from torch import nn

EPS = 1e-5


def ternary_scale(w: torch.Tensor) -> torch.Tensor:
    """The absmean scale: mean |W| over the whole matrix."""
    return w.abs().mean().clamp_min(EPS)


def quantize_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes in {-1, 0, 1} (same dtype as w) and the scale they multiply."""
    scale = ternary_scale(w)
    return (w / scale).round().clamp(-1, 1), scale


def quantize_activations(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-token absmax fake quantization to `bits` (returns dequantized values)."""
    qmax = 2 ** (bits - 1) - 1
    scale = qmax / x.abs().amax(dim=-1, keepdim=True).clamp_min(EPS)
    return (x * scale).round().clamp(-qmax - 1, qmax) / scale


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Forward q, backward identity (the straight-through estimator)."""
    return x + (q - x).detach()


class BitLinear(nn.Linear):
    """nn.Linear whose forward uses ternary weights and 8-bit activations; keeps FP latent weights."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act_bits: int = 8,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.act_bits = act_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, scale = quantize_weights(self.weight)
        w, xq = codes * scale, quantize_activations(x, self.act_bits)
        if torch.is_grad_enabled():  # training: STE; inference: the exact quantized values
            w = ste(self.weight, w) if self.weight.requires_grad else w
            xq = ste(x, xq) if x.requires_grad else xq
        return nn.functional.linear(xq, w, self.bias)

    @classmethod
    def from_linear(cls, lin: nn.Module) -> BitLinear:
        """From nn.Linear, or GPT-2's Conv1D (weight stored transposed: in x out)."""
        if isinstance(lin, nn.Linear):
            weight, bias = lin.weight.data, lin.bias
        elif type(lin).__name__ == "Conv1D":
            weight, bias = lin.weight.data.t(), lin.bias
        else:
            raise TypeError(f"cannot make a BitLinear from {type(lin).__name__}")
        # on the layer's device and dtype: a model converted on the GPU stays there
        out = cls(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
        out.weight.data.copy_(weight)
        if bias is not None:
            out.bias.data.copy_(bias.data)
        return out


def to_bitnet(model: nn.Module, skip: tuple[str, ...] = ("lm_head", "score", "classifier")) -> int:
    """Replace every Linear/Conv1D of the blocks with a BitLinear in place; returns how many."""
    n = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if any(full == s or full.endswith("." + s) for s in skip) or isinstance(child, BitLinear):
                continue
            if isinstance(child, nn.Linear) or type(child).__name__ == "Conv1D":
                setattr(parent, name, BitLinear.from_linear(child))
                n += 1
    return n


class TernaryLinear(nn.Module):
    """Inference form of a trained BitLinear: int8 codes in {-1,0,1}, one fp32 scale, the bias."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 act_bits: int = 8):
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("scale", scale.detach().float().reshape(()))
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.act_bits = act_bits
        self.out_features, self.in_features = codes.shape

    @classmethod
    def from_bitlinear(cls, b: BitLinear) -> TernaryLinear:
        codes, scale = quantize_weights(b.weight.detach())
        return cls(codes, scale, b.bias, b.act_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.codes.to(x.dtype) * self.scale
        return nn.functional.linear(quantize_activations(x, self.act_bits), w, self.bias)


def freeze_ternary(model: nn.Module) -> int:
    """Swap every BitLinear for its TernaryLinear inference form, in place; returns how many."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BitLinear):
                setattr(parent, name, TernaryLinear.from_bitlinear(child))
                n += 1
    return n


def ternary_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors with each TernaryLinear's codes packed base-3 (1.6 bits per weight)."""
    out, seen = {}, set()
    ternary = {n for n, m in model.named_modules() if isinstance(m, TernaryLinear)}
    for key, t in model.state_dict().items():
        if t.data_ptr() in seen:  # a tied weight (GPT-2's lm_head is wte): stored once
            continue
        seen.add(t.data_ptr())
        mod, _, leaf = key.rpartition(".")
        if mod in ternary and leaf == "codes":
            out[f"{mod}.codes_base3"] = pack_base3(t).cpu()  # a file's state: CPU, whatever trained it
            out[f"{mod}.codes_shape"] = torch.tensor(list(t.shape))
        else:
            out[key] = t.detach().cpu().contiguous()
    return out


def load_ternary_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Unpack a `ternary_state` into a model already frozen to TernaryLinear form (same shapes)."""
    full = {}
    for key, t in state.items():
        if key.endswith(".codes_base3"):
            mod = key[: -len(".codes_base3")]
            shape = torch.Size(state[f"{mod}.codes_shape"].tolist())
            full[f"{mod}.codes"] = unpack_base3(t, shape.numel()).view(shape)
        elif not key.endswith(".codes_shape"):
            full[key] = t
    missing, unexpected = model.load_state_dict(full, strict=False)
    ptrs = {t.data_ptr() for k, t in model.state_dict().items() if k in full}
    untied = [k for k in missing if model.state_dict()[k].data_ptr() not in ptrs]
    if unexpected or untied:
        raise ValueError(f"ternary state does not fit this model: missing {untied}, unexpected {unexpected}")
    return model


# ---------------------------------------------------------------- packing

def pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """Ternary codes -> 2 bits each (code + 1 in {0, 1, 2}), four per byte, first in the low bits."""
    t = (codes.reshape(-1).to(torch.int16) + 1).to(torch.uint8)
    t = nn.functional.pad(t, (0, -t.numel() % 4)).view(-1, 4)
    return t[:, 0] | (t[:, 1] << 2) | (t[:, 2] << 4) | (t[:, 3] << 6)


def unpack_2bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    parts = [(packed >> s) & 0b11 for s in (0, 2, 4, 6)]
    return (torch.stack(parts, dim=1).reshape(-1)[:numel].to(torch.int8) - 1)


_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16)


def pack_base3(codes: torch.Tensor) -> torch.Tensor:
    """Ternary codes -> base-3 digits, five per byte (1.6 bits per weight)."""
    t = (codes.reshape(-1).to(torch.int16) + 1)
    t = nn.functional.pad(t, (0, -t.numel() % 5)).view(-1, 5)
    return (t * _POW3.to(t.device)).sum(dim=1).to(torch.uint8)


def unpack_base3(packed: torch.Tensor, numel: int) -> torch.Tensor:
    v = packed.to(torch.int16).unsqueeze(1)
    digits = (v // _POW3.to(v.device)) % 3
    return (digits.reshape(-1)[:numel] - 1).to(torch.int8)


def packed_bits_per_weight(packed: torch.Tensor, numel: int, n_scales: int = 1) -> float:
    """Stored bits per weight including the fp32 scale(s)."""
    return (packed.numel() * 8 + 32 * n_scales) / numel
