"""This machine's two ceilings, measured: sustained memory read bandwidth (what bounds batch-1 decode, which reads
every weight once per token) and matrix-multiply throughput (what bounds prefill), on 1 thread and on all cores.

No library measures these from Python on every CPU and GPU alike (STREAM and likwid are separate C tools, not on
the package lists); the recipe is STREAM's read kernel: a reduction over a buffer four times the last-level cache,
the median of timed repeats after a warm-up. Matmul throughput is torch's own GEMM (oneDNN/MKL on a CPU, cuBLAS on
a GPU) at a square size, so it is what a framework reaches, not a vendor's peak."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from qlib.metrics import cpu_info, torch_threads

MIN_BUFFER = 1 << 30  # the read buffer: at least 1 GiB, and 4x the last-level cache


def last_level_cache_bytes() -> int | None:
    """The largest cache the kernel reports for CPU 0 (Linux sysfs), in bytes; None where it says nothing."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return max(sizes) if sizes else None


def _median_s(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def read_bandwidth(threads: int, device: torch.device, buffer_bytes: int | None = None, repeats: int = 5) -> float:
    """Bytes per second a reduction streams from memory (a float32 buffer far past the last-level cache)."""
    size = buffer_bytes or max(MIN_BUFFER, 4 * (last_level_cache_bytes() or 0))
    x = torch.ones(size // 4, dtype=torch.float32, device=device)
    with torch_threads(threads):
        s = _median_s(lambda: x.sum(), repeats, _sync(device))
    return x.numel() * 4 / s


MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}


def usable_dtypes(device: torch.device) -> list[str]:
    """The matmul element types this device runs natively: fp32 always; bf16 with AVX-512 BF16 or AMX, int8 with
    VNNI or AMX on a CPU; fp16 (and bf16 where the GPU has it) on CUDA."""
    if device.type == "cuda":
        return ["fp32", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    isa = set(cpu_info()[1])
    return ["fp32"] + (["bf16"] if isa & {"avx512_bf16", "amx_bf16"} else []) + \
        (["int8"] if isa & {"avx512_vnni", "avx_vnni", "amx_int8"} else [])


def matmul_throughput(dtype: str, threads: int, device: torch.device, n: int | None = None, repeats: int = 5) -> float:
    """Multiply-adds x 2 per second of an n x n GEMM in `dtype` (int8: torch._int_mm, int32 accumulation); n is
    1024 on a CPU and 4096 on a GPU, where a smaller product measures the kernel launch, not the arithmetic."""
    n = n or (4096 if device.type == "cuda" else 1024)
    gen = torch.Generator().manual_seed(0)
    if dtype == "int8":
        a, b = (torch.randint(-128, 127, (n, n), generator=gen, dtype=torch.int8).to(device) for _ in range(2))
        fn: Callable[[], Any] = lambda: torch._int_mm(a, b)  # noqa: E731
    else:
        a, b = (torch.randn(n, n, generator=gen).to(device, MATMUL_DTYPES[dtype]) for _ in range(2))
        fn = lambda: a @ b  # noqa: E731
    with torch_threads(threads):
        s = _median_s(fn, repeats, _sync(device))
    return 2 * n**3 / s


def ceilings(device: torch.device, threads: tuple[int, ...] = (1, 2)) -> dict[str, Any]:
    """Read bandwidth (bytes/s) and matmul throughput (FLOP/s, or int8 OP/s) per thread count, with the CPU and
    its flags: the `ceilings` block of `env`. On CUDA the thread count does not apply and one value is kept."""
    cpu, isa = cpu_info()
    counts = (1,) if device.type == "cuda" else threads
    out: dict[str, Any] = {"device": device.type, "cpu": cpu, "isa": isa, "llc_bytes": last_level_cache_bytes(),
                           "read_bytes_per_s": {}, "matmul_per_s": {}}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    for t in counts:
        out["read_bytes_per_s"][str(t)] = read_bandwidth(t, device)
        out["matmul_per_s"][str(t)] = {d: matmul_throughput(d, t, device) for d in usable_dtypes(device)}
    return out
