"""Formats llama.cpp reloads, rounded to nearest: the F16 file its converter writes, and every llama.cpp file type
quantized from it by `llama_model_quantize` without an importance matrix."""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qlib import merge
from qlib.backends import gguf
from qlib.core.errors import QlabError
from qlib.methods.registry import Job, Method, register


def ship(job: Job, qtype: str, make: Callable[[Path], Path], **meta: Any) -> Path:
    """Write one GGUF file through `make(tmp_file)` in a staging folder, then give it its run name and metadata."""
    tmp = job.out / f".gguf-{qtype}"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        return gguf.ship(make(tmp / "model.gguf"), job.info, "PTQ", job.peft, qtype, job.out, source=job.src.name,
                         **job.meta, **meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def f16_file(job: Job) -> Path:
    """The F16 GGUF file of this run, which every GGUF type is quantized from."""
    if "gguf_f16" not in job.made:
        raise QlabError("needs the F16 GGUF file, which was not made")
    return job.made["gguf_f16"]


def _f16(job: Job) -> Path:
    merge.require_tokenizer(job.src)
    return ship(job, "f16", lambda dst: gguf.convert(job.src, dst, "f16", pre_tokenizer=job.pre_tokenizer))


def _rtn(qtype: str) -> Callable[[Job], Path]:
    def write(job: Job) -> Path:
        return ship(job, qtype, lambda dst: gguf.quantize(f16_file(job), dst, qtype))
    return write


register(Method("gguf_f16", "llama.cpp", _f16, about="llama.cpp's converter, F16: the llama.cpp rows' reference"))
for _t in gguf.QUANT_TYPES:
    register(Method(f"gguf_{_t}", "llama.cpp", _rtn(_t), needs=("gguf_f16",),
                    about=f"llama.cpp {_t.upper()}, rounded to nearest (no importance matrix)"))
