"""torchao's weight-only integer configs, quantized while transformers loads the FP16 folder (`TorchAoConfig`) and
saved in torchao's safetensors layout (codes, scales and zero points per tensor), which transformers reloads.

INT8 (one scale per output row) runs on the CPU here. INT4 (groups of 128 along the input) needs torchao's `mslk`
CUDA kernels to pack its codes, even on the CPU: on a machine without them the row is one line saying so.
"""
from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qlib import runmeta
from qlib.core.errors import QlabError
from qlib.core.io import atomic_dir, tensor_bytes
from qlib.methods.hf import copy_tokenizer
from qlib.methods.registry import Job, Method, register


def _config(bits: int) -> Any:
    """torchao's config for `bits`-bit weight-only integers (an optional install; missing is one line)."""
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    except ImportError as e:
        raise QlabError(f"torchao does not import ({e}); `make setup` installs it") from None
    return Int8WeightOnlyConfig() if bits == 8 else Int4WeightOnlyConfig(group_size=128)


def _writer(bits: int) -> Callable[[Job], Path]:
    def write(job: Job) -> Path:
        from transformers import AutoModelForCausalLM, TorchAoConfig

        if bits == 4 and importlib.util.find_spec("mslk") is None:  # torchao's Int4Tensor packs with its kernels
            raise QlabError("torchao int4 weight-only needs its mslk kernels (built for CUDA), not installed here")
        config = _config(bits)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(job.src), dtype=torch.float16,
                                                         quantization_config=TorchAoConfig(config))
        except (ImportError, RuntimeError, NotImplementedError, AssertionError) as e:
            raise QlabError(f"torchao int{bits} weight-only does not run here: "
                            f"{(str(e).splitlines() or [type(e).__name__])[0][:200]}") from None
        name = job.info.name("PTQ", job.peft, "rtn", bits, "fp16", variant=f"torchao-int{bits}wo")
        with atomic_dir(job.out / name) as tmp:
            model.save_pretrained(tmp)
            copy_tokenizer(job.src, tmp)
            runmeta.write_meta(tmp, job.info.meta(name, "rtn", "model", "fp16", weights_bits=bits,
                                                  extras={"library": "torchao", "config": type(config).__name__},
                                                  source=job.src.name, **job.meta))
        return job.out / name
    return write


def stored_bits(path: Path) -> float | None:
    """Stored bits per quantized weight: codes, scales and zero points over the weights they stand for (an
    Int4Tensor packs two codes a byte, as its safetensors metadata says)."""
    from safetensors import safe_open

    n_bytes, n_weights = 0, 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            keys, about = set(st.keys()), st.metadata() or {}
            for k in (k for k in keys if k.endswith("._weight_qdata")):
                base = k.removesuffix("qdata")
                packed = json.loads(about.get(base.removesuffix("._weight_") + ".weight", "{}")).get("_type") == \
                    "Int4Tensor"
                n_weights += math.prod(st.get_slice(k).get_shape()) * (2 if packed else 1)
                n_bytes += sum(tensor_bytes(st, base + p) for p in ("qdata", "scale", "zero_point") if base + p in keys)
    return 8.0 * n_bytes / n_weights if n_weights else None


register(Method("torchao_int8wo", "transformers", _writer(8), bits=stored_bits,
                about="torchao INT8 weight-only, one scale per output row"))
register(Method("torchao_int4wo", "transformers", _writer(4), bits=stored_bits,
                about="torchao INT4 weight-only, groups of 128 (needs torchao's CUDA kernels)"))
