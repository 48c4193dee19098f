"""From a LoRA adapter to the files people deploy: merged FP16, bitsandbytes INT8 / NF4, GGUF F16 and quantized types.

Every step is the library's own: peft's `merge_and_unload`, transformers' `dequantize` for a 4-bit
base, bitsandbytes through `from_pretrained(quantization_config=...)`, llama.cpp's converter and
quantizer through `qlib.backends.gguf`. What qlib adds: the checks (tokenizer present, adapter fits the base),
atomic folders, and a logit-level proof that the merge changed nothing.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlib import adapters, runmeta
from qlib.backends import gguf
from qlib.config import build_quantization_plan
from qlib.core import dist
from qlib.core.errors import QlabError
from qlib.core.io import atomic_dir
from qlib.models import load_causal_lm

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
ADAPTER_META = "qlab_adapter.json"  # `save_adapter`'s note of the base precision (study runs write runmeta's qlab.json)


def require_tokenizer(model_dir: str | Path) -> None:
    """Refuse a model folder without tokenizer files: conversions and users both need them."""
    d = Path(model_dir)
    missing = [f for f in TOKENIZER_FILES if not (d / f).is_file()]
    if missing:
        raise QlabError(f"{d} has no tokenizer ({', '.join(missing)} missing): tokenizer files must travel "
                        "with the model (save them with tokenizer.save_pretrained into the same folder)")


def save_adapter(model: Any, tokenizer: Any, out: Path, trained_on: str) -> Path:
    """The adapter folder plus a note of the base precision it was trained against (the studies save theirs with
    `adapters.save_adapter` and full run metadata)."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / ADAPTER_META).write_text(json.dumps({"trained_on": trained_on}, indent=2))
    return out


def adapter_trained_on(adapter_dir: str | Path, default: str) -> str:
    """The base precision an adapter was trained against: from its run metadata or name (qlora: nf4), else the
    older note, else `default`."""
    d = runmeta.detect(adapter_dir)
    if d.source in ("metadata", "run name"):
        return "nf4" if d.method in ("qlora", "nf4") else "fp32"
    meta = Path(adapter_dir) / ADAPTER_META
    return json.loads(meta.read_text())["trained_on"] if meta.is_file() else default


def merge_base(base_dir: str | Path, trained_on: str) -> torch.nn.Module:
    """The full-precision base to merge into: the original weights, or, for an adapter trained on an NF4
    base, those weights dequantized from NF4 (what the adapter actually learned against)."""
    cpu = torch.device("cpu")
    if trained_on == "fp32":
        return load_causal_lm(base_dir, None, cpu)
    if trained_on != "nf4":
        raise QlabError(f"unknown adapter base precision {trained_on!r}; valid: fp32, nf4")
    model = load_causal_lm(base_dir, "qlora", cpu)
    return model.dequantize().to(torch.float32)


@dataclass
class MergeInfo:
    """Where the merged model went and how far its logits moved (should be rounding only)."""

    path: Path
    trained_on: str
    merge_base: str
    max_abs_logit_diff_fp32: float
    max_abs_logit_diff_fp16: float


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out: str | Path, trained_on: str,
                  probe: torch.Tensor, meta: dict[str, Any] | None = None) -> MergeInfo:
    """Base + adapter -> one FP16 model with tokenizer files; logits on `probe` compared before/after."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    if dist.uses_fsdp():
        raise QlabError("merging needs the whole model in one process and this is an FSDP launch: train under FSDP, "
                        "then merge without `accelerate launch` (peft cannot merge sharded weights)")
    require_tokenizer(base_dir)
    base = merge_base(base_dir, trained_on).eval()
    adapters.check_adapter(base, adapter_dir)
    x = probe.reshape(1, -1)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        before = peft_model(input_ids=x).logits
        merged = peft_model.merge_and_unload().eval()
        after32 = merged(input_ids=x).logits
        merged.to(torch.float16).float()  # weights rounded to FP16, computed in FP32 (CPU has no fast FP16)
        after16 = merged(input_ids=x).logits
    merged.to(torch.float16)
    with atomic_dir(Path(out)) as tmp:
        merged.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(tmp)
        if meta is not None:
            runmeta.write_meta(tmp, meta)
    return MergeInfo(Path(out), trained_on, "nf4-dequantized" if trained_on == "nf4" else "original-fp32",
                     float((before - after32).abs().max()), float((before - after16).abs().max()))


def merged_meta(adapter_dir: str | Path, name: str, info: runmeta.RunInfo, trained_on: str, device: torch.device
                ) -> dict[str, Any]:
    """The merged model's metadata: the adapter run's (its method, knobs and head), stored FP16, `merged`."""
    a = runmeta.read_meta(adapter_dir)
    if a is None or a.get("quantization") is None:  # an adapter brought from elsewhere: its base precision only
        method = "qlora" if trained_on == "nf4" else "fp32"
        plan = build_quantization_plan(method, device)
        return info.meta(name, plan, "merged", "fp16", stored_dtype="fp16", merged_from=str(adapter_dir),
                         extras={"merge_after_train": True})
    q = a["quantization"]
    return {**a, "run_name": name, "artifact": "merged", "stored_dtype": "fp16", "merged_from": Path(adapter_dir).name,
            "quantization": {**q, "extras": {**q["extras"], "merge_after_train": True}}}


def save_bnb(merged_dir: str | Path, out: str | Path, method: str, device: torch.device,
             meta: dict[str, Any] | None = None, keep_lm_head: bool = True) -> torch.nn.Module:
    """The merged model quantized by bitsandbytes on load (int8 = LLM.int8, nf4 = NF4 + double quant), saved."""
    from transformers import AutoTokenizer

    model = load_causal_lm(merged_dir, method, device, keep_lm_head=keep_lm_head).eval()
    with atomic_dir(Path(out)) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(merged_dir)).save_pretrained(tmp)
        if meta is not None:
            runmeta.write_meta(tmp, meta)
    return model


def export_gguf(merged_dir: str | Path, out_dir: str | Path, pre_tokenizer: str | None,
                types: tuple[str, ...] = ("q4_0",)) -> dict[str, Path]:
    """model.gguf (F16, llama.cpp's converter) and model-<type>.gguf for each type (llama.cpp's quantizer)."""
    require_tokenizer(merged_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    f16 = gguf.convert(merged_dir, out / "model.gguf", "f16", pre_tokenizer=pre_tokenizer)
    files = {"gguf_f16": f16}
    for t in types:
        files[f"gguf_{t}"] = gguf.quantize(f16, out / f"model-{t}.gguf", t)
    return files


def stored_params(folder: str | Path) -> int:
    """Elements stored in an unquantized folder's *.safetensors (a tied matrix is stored, and counted, once)."""
    from safetensors import safe_open

    n = 0
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    if not n:
        raise QlabError(f"{folder} holds no .safetensors weights")
    return n


def stored_dtypes(folder: str | Path) -> dict[str, int]:
    """Tensors of a folder's *.safetensors by stored dtype (F16, F32, U8 for bitsandbytes' packed 4-bit, I8)."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                t = st.get_slice(k).get_dtype()
                counts[t] = counts.get(t, 0) + 1
    return dict(sorted(counts.items()))


def weights_bytes(path: str | Path) -> int:
    """Bytes of the weights themselves: the GGUF file, or a folder's *.safetensors (tokenizer files excluded)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    files = list(p.glob("*.safetensors"))
    if not files:
        raise QlabError(f"{p} holds no .safetensors weights")
    return sum(f.stat().st_size for f in files)
