"""Device and numerics: CUDA when present else CPU, the compute dtype (fp16 on a T4, bf16 from Ampere, fp32 on
CPU), acting like a T4 on a bigger GPU, and seeding (same seed + machine -> same numbers)."""
from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

from qlib.core.errors import QlabError


def pick_device(prefer: str = "auto", profile: str | None = None) -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' on a CPU machine is a clear error, and so is the `gpu`
    profile left on 'auto' there (its full sizes would run for hours on a CPU; device='cpu' rehearses it)."""
    if prefer == "auto":
        if profile == "gpu" and not torch.cuda.is_available():
            raise QlabError("the gpu profile measures a CUDA GPU and none is visible on this machine; "
                            "to rehearse it on the CPU, pass device=cpu and small sizes (tests/test_gpu_profile.py)")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = parse_device(prefer)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QlabError("device 'cuda' was asked for but no CUDA GPU is visible on this machine")
    return dev


def parse_device(name: str) -> torch.device:
    """'cpu' or 'cuda[:N]' as a torch.device; anything else (a typo, 'tpu', 'mps', a negative index) is one line."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index):
        raise QlabError(f"unknown device {name!r}: use auto, cpu or cuda[:N]")
    return dev


_FORCED_CUDA_DTYPE: list[torch.dtype] = []  # set by `t4_conditions` to act like a T4 on a newer GPU
_MEMORY_FRACTION: list[float] = []          # the allocator cap `t4_conditions` set, if any


def memory_fraction() -> float:
    """The share of the GPU this process may allocate (1.0 unless `t4_conditions` capped it)."""
    return _MEMORY_FRACTION[-1] if _MEMORY_FRACTION else 1.0


def compute_dtype_name(device: str | torch.device | None = None) -> str:
    """The compute dtype as rows record it: float32, bfloat16 or float16."""
    return str(compute_dtype(device)).removeprefix("torch.")


def compute_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """fp32 on CPU (bf16 is 4-6x slower on AVX2); on CUDA bf16 from compute capability 8.0 (Ampere) up, else
    fp16 (a T4 is 7.5). `torch.cuda.is_bf16_supported()` is not the test: by default it counts emulation and
    says True on a T4, where bf16 runs emulated and slow."""
    dev = torch.device(device) if device is not None else pick_device()
    if dev.type != "cuda":
        return torch.float32
    if _FORCED_CUDA_DTYPE:
        return _FORCED_CUDA_DTYPE[-1]
    major, _ = torch.cuda.get_device_capability(dev)
    return torch.bfloat16 if major >= 8 else torch.float16


@contextlib.contextmanager
def t4_conditions(device: str | torch.device, memory_gib: float = 15.0) -> Iterator[float]:
    """On a bigger GPU, behave like a 16 GB T4: fp16 compute and the allocator capped at `memory_gib`
    (`torch.cuda.set_per_process_memory_fraction`); yields the fraction. CUDA only: a clear error elsewhere."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise QlabError("the T4 memory cap is a CUDA-only option (it caps the GPU allocator); "
                        f"this run is on {dev.type}")
    if dev.index is None:  # the allocator cap wants an index: plain "cuda" is the current device
        dev = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(dev).total_memory
    fraction = min(1.0, memory_gib * 2**30 / total)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(fraction, dev)
    _FORCED_CUDA_DTYPE.append(torch.float16)
    _MEMORY_FRACTION.append(fraction)
    try:
        yield fraction
    finally:
        _FORCED_CUDA_DTYPE.pop()
        _MEMORY_FRACTION.pop()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, dev)


def device_map(device: torch.device) -> dict[str, int | str]:
    """transformers' `device_map` placing a whole model on `device` (bitsandbytes needs one, even on CPU)."""
    return {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bf16' (the short names run names and metadata use)."""
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def set_seed(seed: int, threads: int | None = None) -> None:
    """Seed python, numpy and torch, and fix the thread count: same seed + machine -> same numbers."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads is None:
        threads = int(os.environ.get("QLAB_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
