"""HQQ (half-quadratic quantization; Badri & Shaji 2023) through the `hqq` package: no calibration data, the zero
point and scale of every group fitted to the weights by a proximal solver. Its control is the same grid from the
same quantizer with the solver off (min-max zero point and scale, rounded to nearest), so the paired difference is
the optimisation alone.

hqq saves its models with torch's pickle, which qlib never loads; the artifact here is a folder with
`model.safetensors` (each quantized linear as hqq's packed codes `W_q` and FP16 `scale` and `zero`, the other
tensors as the FP16 source stores them), `hqq.json` (bits, group, packing, shapes) and the config and tokenizer.
`load` rebuilds the model and dequantizes with hqq's own `Quantizer.dequantize`, as hqq's PyTorch backend does
before every matmul. transformers' `HqqConfig` cannot load it in 5.23 (not implemented), and torchao's HQQ path
asserts CUDA.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qlib import models, runmeta
from qlib.core.errors import QlabError
from qlib.core.io import atomic_dir, tensor_bytes
from qlib.methods.hf import copy_tokenizer
from qlib.methods.grid import group_size, linears
from qlib.methods.registry import Job, Method, register

META = "hqq.json"


def _quantizer() -> Any:
    """hqq's Quantizer (an optional install); missing is one line."""
    try:
        from hqq.core.quantize import Quantizer
    except ImportError as e:
        raise QlabError(f"hqq does not import ({e}); `make setup` installs it") from None
    return Quantizer


def quantize(weight: torch.Tensor, bits: int, group: int, optimize: bool) -> dict[str, torch.Tensor]:
    """One weight matrix as hqq stores it: packed codes, FP16 scale and zero per group along the input dimension."""
    w_q, meta = _quantizer().quantize(weight.float(), nbits=bits, group_size=group, optimize=optimize,
                                      round_zero=bits == 4, axis=1, bitpack=True, device="cpu")
    return {"W_q": w_q.contiguous(), "scale": meta["scale"].half().contiguous(),
            "zero": meta["zero"].half().contiguous()}


def dequantize(parts: dict[str, torch.Tensor], bits: int, group: int, shape: list[int],
               dtype: torch.dtype) -> torch.Tensor:
    """A stored matrix back in `dtype` through hqq's own dequantizer."""
    q = _quantizer()
    meta = {"nbits": bits, "group_size": group, "shape": torch.Size(shape), "axis": 1, "view_as_float": False,
            "packing": q.bit_to_packing[bits], "compute_dtype": dtype,
            "scale": parts["scale"].to(dtype), "zero": parts["zero"].to(dtype)}
    return q.dequantize(parts["W_q"], meta)


def _writer(bits: int, optimize: bool) -> Callable[[Job], Path]:
    def write(job: Job) -> Path:
        from safetensors.torch import save_file

        model = models.load_causal_lm(job.src, None, torch.device("cpu"), dtype=torch.float16).eval()
        group, targets, t0 = group_size(model), linears(model), time.perf_counter()
        tensors: dict[str, torch.Tensor] = {}
        for name, lin in targets.items():
            for k, v in quantize(lin.weight.data, bits, group, optimize).items():
                tensors[f"{name}.{k}"] = v
        seconds = time.perf_counter() - t0
        skip = {f"{n}.weight" for n in targets} | ({"lm_head.weight"} if _tied(model) else set())
        tensors.update({k: v.contiguous() for k, v in model.state_dict().items() if k not in skip})
        method = "hqq" if optimize else "rtn"
        name = job.info.name("PTQ", job.peft, method, bits, "fp16", variant=f"hqq-w{bits}g{group}")
        spec = {"bits": bits, "group_size": group, "axis": 1, "optimize": optimize, "library": "hqq",
                "shapes": {n: list(m.weight.shape) for n, m in targets.items()}}
        with atomic_dir(job.out / name) as tmp:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "quantization": "hqq"})
            model.config.save_pretrained(tmp)
            (tmp / META).write_text(json.dumps(spec, indent=1))
            copy_tokenizer(job.src, tmp)
            runmeta.write_meta(tmp, job.info.meta(name, method, "model", "fp16", weights_bits=bits,
                                                  extras={k: v for k, v in spec.items() if k != "shapes"},
                                                  source=job.src.name, quantize_seconds=round(seconds, 2), **job.meta))
        return job.out / name
    return write


def _tied(model: torch.nn.Module) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


def load(path: Path, device: torch.device) -> torch.nn.Module:
    """An hqq folder as a transformers model: every quantized linear dequantized, the rest as stored."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        spec = json.loads((Path(path) / META).read_text())
        stored = load_file(str(Path(path) / "model.safetensors"))
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise QlabError(f"{path} is not an hqq folder qlib wrote: {type(e).__name__}: {e}") from None
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v for k, v in stored.items() if not k.endswith((".W_q", ".scale", ".zero"))}
    for name, shape in spec["shapes"].items():
        parts = {k: stored[f"{name}.{k}"] for k in ("W_q", "scale", "zero")}
        state[f"{name}.weight"] = dequantize(parts, spec["bits"], spec["group_size"], shape, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if _tied(model) else set()):
        raise QlabError(f"{path}: weights do not match its config (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]})")
    model.tie_weights()
    return model.to(device)


def stored_bits(path: Path) -> float | None:
    """Stored bits per quantized weight: packed codes, scales and zeros over the weights they stand for."""
    from safetensors import safe_open

    spec = json.loads((Path(path) / META).read_text())
    with safe_open(str(Path(path) / "model.safetensors"), "pt") as st:
        n_bytes = sum(tensor_bytes(st, f"{n}.{k}") for n in spec["shapes"] for k in ("W_q", "scale", "zero"))
    n_weights = sum(s[0] * s[1] for s in spec["shapes"].values())
    return 8.0 * n_bytes / n_weights if n_weights else None


for _b in (4, 3, 2):
    register(Method(f"hqq_w{_b}_rtn", "transformers", _writer(_b, False), load=load, bits=stored_bits,
                    about=f"hqq's {_b}-bit grid with a zero point, min-max, rounded to nearest (HQQ's control)"))
    register(Method(f"hqq_w{_b}", "transformers", _writer(_b, True), control=f"hqq_w{_b}_rtn", load=load,
                    bits=stored_bits, about=f"HQQ, {_b}-bit groups, zero and scale fitted without data (hqq)"))
