"""Formats transformers reloads: the FP16 folder itself, and bitsandbytes INT8 / NF4 (quantized while loading,
saved in bitsandbytes' serialization)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch

from qlib import merge
from qlib.backends import bnb
from qlib.config import build_quantization_plan
from qlib.core.device import compute_dtype, dtype_name
from qlib.methods.registry import Job, Method, register

BNB = {"bnb_int8": "int8", "bnb_nf4": "nf4"}


def head_name(job: Job, method: str | None) -> str:
    """The LM head as a run name states it: the load dtype unless bitsandbytes was let quantize it."""
    if method in ("int8", "nf4", "qlora") and not job.keep_lm_head:
        return "int8" if method == "int8" else "nf4"
    return dtype_name(torch.float32 if job.device.type == "cpu" else compute_dtype(job.device))


def copy_tokenizer(src: Path, dst: Path) -> None:
    """The source folder's tokenizer beside a written model, so the artifact loads as a user would load it."""
    from transformers import AutoTokenizer

    with contextlib.suppress(OSError, ValueError):
        AutoTokenizer.from_pretrained(str(src)).save_pretrained(dst)


def _bnb(fmt: str) -> Callable[[Job], Path]:
    def write(job: Job) -> Path:
        method = BNB[fmt]
        plan = build_quantization_plan(method, job.device, keep_lm_head=job.keep_lm_head)
        head = head_name(job, method)
        run = job.info.name("PTQ", job.peft, method, plan.spec.weights_bits, head)
        merge.save_bnb(job.src, job.out / run, method, job.device,
                       job.info.meta(run, plan, "model", head, source=job.src.name, **job.meta),
                       keep_lm_head=job.keep_lm_head)
        return job.out / run
    return write


register(Method("fp16", "transformers", lambda job: job.src, about="the FP16 model folder: every row's reference"))
for _fmt in BNB:
    register(Method(_fmt, "transformers", _bnb(_fmt), about=f"bitsandbytes {BNB[_fmt].upper()}, quantized on load",
                    bits=bnb.quantized_weight_bits))
