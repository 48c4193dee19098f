"""GPTQ and AWQ through llm-compressor (the vLLM project's library), each beside round-to-nearest on the same grid
from the same library: integer weights in groups along the input dimension with FP16 scales (symmetric for GPTQ,
a zero point per group for AWQ), stored in compressed-tensors' pack-quantized safetensors, which transformers
reloads (dequantized to the compute dtype: transformers has no packed-int4 CPU kernel).

Why this library: AutoGPTQ and AutoAWQ are deprecated; GPTQModel 7.7 needs torch>=2.14.1, and 7.6's in-memory model
gives wrong logits on the CPU until it is saved and reloaded. llm-compressor 0.14.0.1 declares transformers<=5.17
while qlib pins 5.23, so `make setup` installs it with --no-deps beside its own dependencies; its GPTQ, AWQ and RTN
run with 5.23 on the CPU (tests/test_llm_compressor.py). Its AWQ caches activations with `pin_memory`, which needs
an accelerator: on the CPU that one call is skipped (it only speeds up host-to-device copies).

The group is `grid.group_size`'s (128 where it divides every row): the row's name keeps the bits, its metadata the
group.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from qlib import models, runmeta
from qlib.core.errors import QlabError
from qlib.core.quiet import quiet_libraries, transient_bars
from qlib.core.io import atomic_dir, tensor_bytes
from qlib.methods.hf import copy_tokenizer
from qlib.methods.grid import group_size
from qlib.methods.registry import Job, Method, register

ALGOS = {"rtn": "QuantizationModifier", "gptq": "GPTQModifier", "awq": "AWQModifier"}


def _library() -> Any:
    """llm-compressor, imported only when asked for (it is an optional install); missing is one line."""
    try:
        import llmcompressor
        import llmcompressor.modifiers.awq
        import llmcompressor.modifiers.quantization
    except ImportError as e:
        raise QlabError(f"llm-compressor does not import ({e}); `make setup` installs it") from None
    # its INFO lines name every module it touches; errors still show, and its progress bars
    llmcompressor.configure_logger(llmcompressor.LoggerConfig(console_log_level="ERROR", metrics_disabled=True))
    quiet_libraries()  # configure_logger re-enables every llmcompressor module, the ones core.quiet names too
    transient_bars(*_bar_modules())
    return llmcompressor


@contextlib.contextmanager
def _no_pinned_memory() -> Iterator[None]:
    """AWQ's activation cache pins host memory, which fails without an accelerator; skip it on the CPU."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    pin = IntermediatesCache.pin_memory
    if not torch.cuda.is_available():
        IntermediatesCache.pin_memory = lambda self, *a, **k: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = pin


def _bar_modules() -> list[Any]:
    """Where llm-compressor and compressed-tensors draw a bar per stage and per layer (two per layer for GPTQ)."""
    import compressed_tensors.compressors.model_compressors.model_compressor as compress
    import compressed_tensors.offload.dispatch as dispatch
    import compressed_tensors.quantization.lifecycle.apply as apply
    import llmcompressor.pipelines.cache as cache
    import llmcompressor.pipelines.sequential.pipeline as sequential

    return [compress, dispatch, apply, cache, sequential]


def _recipe(algo: str, bits: int, symmetric: bool, group: int) -> Any:
    """The llm-compressor modifier: every linear but the LM head, `bits`-bit integers in groups of `group`."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    import llmcompressor.modifiers.awq as awq
    import llmcompressor.modifiers.quantization as q

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}
    return getattr(awq if algo == "awq" else q, ALGOS[algo])(config_groups=groups, ignore=["lm_head"])


@contextlib.contextmanager
def _library_log(into: dict[str, Any]) -> Iterator[None]:
    """llm-compressor's warnings (a Hessian that could not be inverted: that module fell back to rounding) and GPTQ's
    per-module errors on the calibration windows, kept for the artifact's metadata: its console shows only errors."""
    from loguru import logger

    said: list[str] = []
    errors: list[float] = []

    def sink(message: Any) -> None:
        r = message.record
        if r["level"].name == "WARNING":
            said.append(r["message"])
        elif r["level"].name == "METRIC" and r["message"].startswith("error "):
            errors.append(float(r["message"].removeprefix("error ")))

    handler = logger.add(sink, level="WARNING", filter="llmcompressor", format="{message}")
    try:
        yield
    finally:
        logger.remove(handler)
        into["library_warnings"] = said
        if errors:
            into["gptq_module_error"] = {"modules": len(errors), "sum": round(sum(errors), 4),
                                         "max": round(max(errors), 4)}


def _calibrate(model: torch.nn.Module, job: Job, algo: str, bits: int, symmetric: bool,
               group: int) -> dict[str, Any]:
    """Run llm-compressor's one-shot pass (the calibration windows for GPTQ and AWQ): the seconds it took and what
    the library warned of (`_library_log`)."""
    from datasets import Dataset

    oneshot = _library().oneshot
    kw: dict[str, Any] = {}
    if algo != "rtn":
        if job.calibration is None or not job.calibration.windows:
            raise QlabError(f"{algo.upper()} needs calibration text; none was given")
        ids = torch.stack(job.calibration.windows)
        rows = {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
        # the windows come shuffled with the run's seed; the library's own shuffle draws from torch's global
        # generator, so the artifact would depend on what the process drew before
        kw = {"dataset": Dataset.from_dict(rows), "max_seq_length": ids.shape[1],
              "num_calibration_samples": ids.shape[0], "shuffle_calibration_samples": False}
    log: dict[str, Any] = {}
    t0 = time.perf_counter()
    with _no_pinned_memory(), _library_log(log):
        oneshot(model=model, recipe=_recipe(algo, bits, symmetric, group), **kw)
    return {"seconds": round(time.perf_counter() - t0, 2), **log}


def _writer(algo: str, bits: int, symmetric: bool) -> Callable[[Job], Path]:
    def write(job: Job) -> Path:
        model = models.load_causal_lm(job.src, None, torch.device("cpu"), dtype=torch.float32).eval()
        group = group_size(model)
        done = _calibrate(model, job, algo, bits, symmetric, group)
        model.to(torch.float16)  # what is not quantized (embeddings, norms) is stored as the FP16 source has it
        name = job.info.name("PTQ", job.peft, algo, bits, "fp16", variant=f"w{bits}g{group}")
        quant = {"bits": bits, "group_size": group, "symmetric": symmetric, "library": "llm-compressor",
                 "format": "compressed-tensors pack-quantized"}
        cal = None if algo == "rtn" else {**job.calibration.record(), **done}
        with atomic_dir(job.out / name) as tmp:
            model.save_pretrained(tmp, save_compressed=True)
            copy_tokenizer(job.src, tmp)
            runmeta.write_meta(tmp, job.info.meta(name, algo, "model", "fp16", weights_bits=bits, extras=quant,
                                                  source=job.src.name, calibration=cal, **job.meta))
        return job.out / name
    return write


def load(path: Path, device: torch.device) -> torch.nn.Module:
    """A compressed-tensors folder through transformers, dequantized on load (`dequantize=True`)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    _library()
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, quantization_config=CompressedTensorsConfig(dequantize=True))
    except (OSError, ValueError, RuntimeError) as e:
        raise QlabError(f"cannot load compressed-tensors model {path}: {str(e).splitlines()[0][:300]}") from None
    return model.to(device)


def stored_bits(path: Path) -> float | None:
    """Stored bits per quantized weight: packed codes, scales and zero points over the weights they stand for."""
    from safetensors import safe_open

    n_bytes, n_weights = 0, 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            keys = set(st.keys())
            for k in keys:
                if not k.endswith(".weight_packed"):
                    continue
                base = k.removesuffix("weight_packed")
                n_weights += int(torch.prod(st.get_tensor(base + "weight_shape")))
                n_bytes += sum(tensor_bytes(st, base + part) for part in
                               ("weight_packed", "weight_scale", "weight_zero_point") if base + part in keys)
    return 8.0 * n_bytes / n_weights if n_weights else None


def _register(name: str, algo: str, bits: int, symmetric: bool, control: str | None, about: str) -> None:
    register(Method(name, "transformers", _writer(algo, bits, symmetric), control=control,
                    calibration=algo != "rtn", load=load, bits=stored_bits, about=f"{about} (llm-compressor)"))


for _b in (4, 3, 2):
    _register(f"rtn_w{_b}", "rtn", _b, True, None, f"{_b}-bit symmetric integer groups, rounded to nearest")
    _register(f"gptq_w{_b}", "gptq", _b, True, f"rtn_w{_b}", f"GPTQ, {_b}-bit symmetric integer groups")
_register("rtn_w4_asym", "rtn", 4, False, None, "4-bit integer groups with a zero point, rounded to nearest")
_register("awq_w4", "awq", 4, False, "rtn_w4_asym", "AWQ's activation-aware scaling, then 4-bit groups with zeros")
