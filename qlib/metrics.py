"""What the studies measure: quality, latency, peak memory, parameters, sizes, and the machine."""
from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

# ---------------------------------------------------------------- quality


def accuracy_f1(preds: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro-F1 (mean of per-class F1) over the same held-out labels."""
    if len(preds) != len(labels) or not labels:
        raise ValueError(f"need equal, non-empty preds/labels, got {len(preds)} and {len(labels)}")
    acc = sum(int(p) == int(y) for p, y in zip(preds, labels)) / len(labels)
    f1s = []
    for c in sorted(set(labels) | set(preds)):
        tp = sum(p == c and y == c for p, y in zip(preds, labels))
        fp = sum(p == c and y != c for p, y in zip(preds, labels))
        fn = sum(p != c and y == c for p, y in zip(preds, labels))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "f1": sum(f1s) / len(f1s)}


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Accuracy alone (`accuracy_f1`'s), e.g. one value per training seed."""
    return accuracy_f1(preds, labels)["accuracy"]


@torch.no_grad()
def token_nll(model: torch.nn.Module, input_ids: torch.Tensor, context: int, stride: int,
              device: str | torch.device = "cpu") -> torch.Tensor:
    """Sliding-window negative log-likelihood of every scored token (HF recipe: each token scored once, with up
    to `context` of history), in order: the per-example record paired comparisons resample."""
    ids = input_ids.reshape(-1)
    out, prev_end = [], 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + context, ids.numel())
        chunk = ids[begin:end].unsqueeze(0).to(device)
        logits = model(input_ids=chunk).logits[0, :-1].float()
        targets = chunk[0, 1:]
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        new = min(end - prev_end, nll.numel())
        out.append(nll[nll.numel() - new:].cpu())
        prev_end = end
        if end == ids.numel():
            break
    return torch.cat(out)


def window_logits(model: torch.nn.Module, input_ids: torch.Tensor, context: int, device: str | torch.device = "cpu",
                  batch: int = 4) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, targets) of non-overlapping windows of `context` tokens, in order (each window's first token has no
    history and is not scored): the tokens `token_nll(..., stride=context)` and llama.cpp's scorer score. Full
    windows go `batch` at a time (a tenth faster on a CPU than one by one)."""
    ids = input_ids.reshape(-1)
    n_full = ids.numel() // context
    full = ids[: n_full * context].view(n_full, context)
    for begin in range(0, n_full, batch):
        with torch.no_grad():
            logits = model(input_ids=full[begin:begin + batch].to(device)).logits[:, :-1].float().cpu()
        for row, chunk in zip(logits, full[begin:begin + batch]):
            yield row, chunk[1:]
    tail = ids[n_full * context:]
    if tail.numel() >= 2:
        with torch.no_grad():
            yield model(input_ids=tail.unsqueeze(0).to(device)).logits[0, :-1].float().cpu(), tail[1:]


def perplexity(model: torch.nn.Module, input_ids: torch.Tensor, context: int, stride: int,
               device: str | torch.device = "cpu") -> dict[str, float]:
    """Sliding-window perplexity with the context and stride used, so results can state them."""
    nll = token_nll(model, input_ids, context, stride, device)
    return {"perplexity": math.exp(nll.double().mean().item()), "context": context, "stride": stride,
            "tokens": int(nll.numel())}


def _block_bootstrap(series: Sequence[Any], block: int, n_boot: int, seed: int,
                     groups: Sequence[Any] | None = None) -> list[Any]:
    """Each series' sum over the same resampled units, n_boot sums per series: whole `groups` (every example of a
    module or an article together, wherever it sits) when given, else blocks of `block` consecutive examples.
    Groups labelled "stratum:name" (the shared evaluation set's "code:<module>", "prose:<article>") are resampled
    within their stratum, so each resample keeps the set's fixed share of each domain."""
    import numpy as np

    n = len(series[0])
    strata = None
    if groups is None:
        unit = np.arange(n) // block
    else:
        if len(groups) != n:
            raise ValueError(f"need one group per example: {len(groups)} groups for {n} examples")
        labels, unit = np.unique(np.asarray(groups), return_inverse=True)
        unit, strata = unit.ravel(), _strata(labels)
    k = int(unit.max()) + 1
    rng = np.random.default_rng(seed)
    if strata is None:
        pick = rng.integers(0, k, size=(n_boot, k))
    else:  # each stratum's units drawn from that stratum alone, as many as it has
        pick = np.concatenate([members[rng.integers(0, members.size, size=(n_boot, members.size))]
                               for members in strata], axis=1)
    return [np.bincount(unit, weights=np.asarray(s, dtype=float), minlength=k)[pick].sum(1) for s in series]


def _strata(labels: Any) -> list[Any] | None:
    """The unit indices of each stratum when every label reads "stratum:name" and there are two strata or more."""
    import numpy as np

    names = [str(x) for x in labels]
    if not all(":" in x for x in names):
        return None
    prefix = np.array([x.split(":", 1)[0] for x in names])
    kinds = np.unique(prefix)
    return [np.flatnonzero(prefix == s) for s in kinds] if kinds.size > 1 else None


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0,
                     block: int = 1, groups: Sequence[Any] | None = None, alpha: float = 0.05) -> dict[str, float]:
    """Mean of b - a over paired examples with a (1 - alpha) percentile interval (95 % by default; a smaller alpha,
    for a multiplicity correction, draws more resamples), resampling whole blocks of `block` consecutive examples
    (tokens of one window are not independent; sentences are: block 1), or whole `groups`."""
    import numpy as np

    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"need two equal, non-empty 1-D sequences; got {np.shape(a)} and {np.shape(b)}")
    sums, sizes = _block_bootstrap([d, np.ones_like(d)], block, max(n_boot, int(100 / alpha)), seed, groups)
    lo, hi = np.percentile(sums / sizes, [50 * alpha, 100 - 50 * alpha])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "n": int(d.size), "block": block,
            "excludes_zero": bool(lo > 0 or hi < 0)}


def mean_interval(x: Sequence[float], block: int = 1, n_boot: int = 2000, seed: int = 0,
                  groups: Sequence[Any] | None = None) -> dict[str, float]:
    """Mean of per-example values with a 95 % percentile interval, resampling whole blocks of `block` consecutive
    examples (a window's tokens together), or whole `groups`."""
    import numpy as np

    v = np.asarray(x, dtype=float)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"need a non-empty 1-D sequence; got shape {v.shape}")
    sums, sizes = _block_bootstrap([v, np.ones_like(v)], block, n_boot, seed, groups)
    lo, hi = np.percentile(sums / sizes, [2.5, 97.5])
    return {"mean": float(v.mean()), "lo": float(lo), "hi": float(hi)}


def median_interval(x: Sequence[float], seed: int = 0, n_boot: int = 2000) -> tuple[float, float, float]:
    """Median of timed repeats and a 95 % bootstrap interval over them (a rate's spread run to run)."""
    import numpy as np

    a = np.asarray(x, dtype=float)
    idx = np.random.default_rng(seed).integers(0, a.size, size=(n_boot, a.size))
    lo, hi = np.quantile(np.median(a[idx], axis=1), [0.025, 0.975])
    return float(np.median(a)), float(lo), float(hi)


def accuracy_difference(ref_preds: Sequence[int], preds: Sequence[int], labels: Sequence[int],
                        seed: int = 0) -> dict[str, Any]:
    """Accuracy of `preds` minus that of `ref_preds` on the same examples, with the paired bootstrap 95 % interval
    (sentences resampled together); `real` only when the interval excludes 0."""
    a = [float(int(p) == int(y)) for p, y in zip(ref_preds, labels)]
    b = [float(int(p) == int(y)) for p, y in zip(preds, labels)]
    if not (len(a) == len(b) == len(labels)):
        raise ValueError(f"need predictions for every label: {len(ref_preds)}, {len(preds)}, {len(labels)}")
    d = paired_bootstrap(a, b, seed=seed)
    return {"diff": d["diff"], "lo": d["lo"], "hi": d["hi"], "real": d["excludes_zero"], "n": d["n"]}


def majority_preds(train_labels: Sequence[int], n: int) -> list[int]:
    """The constant answer a classifier must beat: the most frequent training label, n times."""
    from collections import Counter

    return [Counter(int(y) for y in train_labels).most_common(1)[0][0]] * n


def with_difference(row: dict[str, Any], prefix: str, d: dict[str, Any] | None, value: str = "diff") -> dict[str, Any]:
    """Row keys `<prefix>`, `<prefix>_lo`, `<prefix>_hi`, `<prefix>_real` from a paired comparison whose estimate is
    `d[value]` (an accuracy difference's "diff", a perplexity ratio's "ratio"); None: n/a."""
    row.update({prefix: d and d[value], f"{prefix}_lo": d and d["lo"], f"{prefix}_hi": d and d["hi"],
                f"{prefix}_real": d and d["real"]})
    return row


def seed_spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation over training seeds: the run-to-run noise that an interval over the
    examples of one run does not contain (sd None with one seed)."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("need at least one seed's value")
    return {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else None, "n": len(v), "values": v}


def with_seeds(row: dict[str, Any], key: str, values: Sequence[float]) -> dict[str, Any]:
    """Row keys `<key>_seed_mean`, `<key>_seed_sd`, `<key>_seed_values` (and `n_seeds`) from one value per seed."""
    s = seed_spread(values)
    row.update({f"{key}_seed_mean": s["mean"], f"{key}_seed_sd": s["sd"], f"{key}_seed_values": s["values"],
                "n_seeds": s["n"]})
    return row


def perplexity_ratio(ref_nll: Sequence[float], nll: Sequence[float], block: int, seed: int = 0,
                     groups: Sequence[Any] | None = None, alpha: float = 0.05) -> dict[str, Any]:
    """Perplexity of one model over a reference's on the same tokens, exp(mean NLL difference), with the
    paired (1 - alpha) interval resampling whole windows (`block` tokens) or whole `groups`; `real` only when it
    excludes 1."""
    b = paired_bootstrap(ref_nll, nll, block=block, seed=seed, groups=groups, alpha=alpha)
    return {"ratio": math.exp(b["diff"]), "lo": math.exp(b["lo"]), "hi": math.exp(b["hi"]),
            "real": b["excludes_zero"], "tokens": b["n"], "block": block}


def bootstrap_ratio(num: Sequence[float], den: Sequence[float], block: int, n_boot: int = 2000,
                    seed: int = 0, groups: Sequence[Any] | None = None) -> dict[str, float]:
    """mean(num) / mean(den) over paired examples with a 95 % interval from resampling whole blocks of `block`
    consecutive examples (e.g. how much of a fine-tune's per-token gain a format keeps)."""
    import numpy as np

    a, b = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equal, non-empty 1-D sequences; got {a.shape} and {b.shape}")
    sa, sb = _block_bootstrap([a, b], block, n_boot, seed, groups)
    lo, hi = np.percentile(sa / sb, [2.5, 97.5])
    return {"ratio": float(a.sum() / b.sum()), "lo": float(lo), "hi": float(hi), "n": int(a.size), "block": block}


# ---------------------------------------------------------------- speed


def load_average() -> float | None:
    """The 1-minute load average, recorded beside each timing (a loaded 2-core machine times slower)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with `n` intra-op threads (timings on one thread do not collapse when the machine is busy)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


TIMING_THREADS = 1  # CPU timings: one thread, so a busy 2-core machine slows every variant alike instead of 3-5x


def measure_latency(fn: Callable[[], Any], warmup: int = 3, repeats: int = 20,
                    device: str | torch.device = "cpu", threads: int | None = TIMING_THREADS) -> dict[str, float]:
    """Median (and p10/p90) wall time of `fn` in ms after warm-up; CUDA is synchronized."""
    return compare_latency({"fn": fn}, warmup, repeats, device, threads)["fn"]


def compare_latency(fns: dict[str, Callable[[], Any]], warmup: int = 3, repeats: int = 20,
                    device: str | torch.device = "cpu", threads: int | None = TIMING_THREADS
                    ) -> dict[str, dict[str, float]]:
    """Latency of several variants, interleaved round-robin so machine drift hits all of them alike; on CPU with
    `threads` intra-op threads (None: as set), the load average beside each result.

    Use this for ratios (quantized vs fp32) measured in one run; each entry is as measure_latency.
    """
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = threads if threads and not cuda else torch.get_num_threads()
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch_threads(n):
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append((time.perf_counter() - t0) * 1e3)
    load = load_average()
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else [ts[0]] * 9
        out[name] = {"median_ms": statistics.median(ts), "p10_ms": q[0], "p90_ms": q[-1], "times_ms": ts,
                     "repeats": repeats, "threads": n, "load_avg_1m": load}
    return out


def speed_ratio(ref_s: Sequence[float], s: Sequence[float], seed: int = 0, n_boot: int = 2000,
                alpha: float = 0.05) -> dict[str, Any]:
    """How many times faster `s` ran than `ref_s`: median over median of per-repeat times taken in the same
    interleaved rounds, with a (1 - alpha) interval from resampling whole rounds (a slow round slows both);
    `real` only when it excludes 1. Tokens/s ratios are the same number (equal tokens per repeat)."""
    import numpy as np

    a, b = np.asarray(ref_s, dtype=float), np.asarray(s, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equal, non-empty sequences of repeats; got {a.shape} and {b.shape}")
    if a.size == 1:  # one round: a ratio, no interval
        return {"ratio": float(a[0] / b[0]), "lo": None, "hi": None, "real": None, "repeats": 1}
    idx = np.random.default_rng(seed).integers(0, a.size, size=(n_boot, a.size))
    boot = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    lo, hi = (float(x) for x in np.quantile(boot, [alpha / 2, 1 - alpha / 2]))
    return {"ratio": float(np.median(a) / np.median(b)), "lo": lo, "hi": hi, "real": not lo <= 1.0 <= hi,
            "repeats": int(a.size)}


# ---------------------------------------------------------------- memory


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc), so later growth shows up as RSS again."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _maxrss() -> int:
    """The process's lifetime peak RSS in bytes (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory of a block: CUDA max_allocated on GPU, else process-RSS growth on CPU.

    On CPU the peak is the larger of a 5 ms RSS sampler and the kernel's exact high-water mark
    (ru_maxrss) when the block raised it. `source` says which kind, so a row can state it; `report()` gives the
    QLoRA method's peak-memory report (CUDA reserved and allocated, overall and per GPU; on CPU the RSS figures).
    """

    def __init__(self, device: str | torch.device = "cpu", interval_s: float = 0.005):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.source = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_rss_delta"
        self.per_gpu: list[dict[str, Any]] = []
        self.rss_peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            for i in range(torch.cuda.device_count()):
                torch.cuda.synchronize(i)
                torch.cuda.reset_peak_memory_stats(i)
            self._base = torch.cuda.memory_allocated()
            return self
        gc.collect()
        _trim_heap()
        self._base = self._max = _rss()
        self._hwm = _maxrss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _rss())
            time.sleep(self.interval_s)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            for i in range(torch.cuda.device_count()):
                torch.cuda.synchronize(i)
                self.per_gpu.append({"gpu": i, "name": torch.cuda.get_device_name(i),
                                     "max_allocated_bytes": torch.cuda.max_memory_allocated(i),
                                     "max_reserved_bytes": torch.cuda.max_memory_reserved(i)})
            self.peak_bytes = torch.cuda.max_memory_allocated()
            return
        self._stop.set()
        self._thread.join()
        hwm = _maxrss()
        exact = hwm if hwm > self._hwm else 0  # the block set a new lifetime peak: it is exact
        self.rss_peak_bytes = max(self._max, _rss(), hwm)
        self.peak_bytes = max(self._max, _rss(), exact) - self._base

    def report(self) -> dict[str, Any]:
        """The peak-memory report: on CUDA `overall_max_reserved_gb` / `overall_max_allocated_gb` (the largest over
        the GPUs) and `per_gpu`; on CPU the process's RSS, labelled as such (there is no VRAM to report)."""
        gb = lambda b: round(b / 2**30, 4)  # noqa: E731
        if self.device.type == "cuda":
            return {"memory": "cuda", "overall_max_reserved_gb": gb(max(g["max_reserved_bytes"] for g in self.per_gpu)),
                    "overall_max_allocated_gb": gb(max(g["max_allocated_bytes"] for g in self.per_gpu)),
                    "per_gpu": [{"gpu": g["gpu"], "name": g["name"], "max_reserved_gb": gb(g["max_reserved_bytes"]),
                                 "max_allocated_gb": gb(g["max_allocated_bytes"])} for g in self.per_gpu]}
        return {"memory": "cpu_rss", "rss_peak_gb": gb(self.rss_peak_bytes), "rss_growth_peak_gb": gb(self.peak_bytes),
                "note": "CPU run: process resident memory (RSS), not GPU memory; rss_peak_gb is the process's peak "
                        "so far, rss_growth_peak_gb what this block added"}


# ---------------------------------------------------------------- parameters and sizes


def _logical_numel(p: torch.nn.Parameter) -> int:
    """bitsandbytes stores 4-bit weights packed (two per byte); count the weights they stand for."""
    qs = getattr(p, "quant_state", None)
    return int(torch.Size(qs.shape).numel()) if qs is not None else p.numel()


def param_counts(model: torch.nn.Module) -> dict[str, int]:
    """Trainable and total parameters, tied weights once and 4-bit weights as the weights they stand for (what a
    row's trainable_params / total_params mean; `accounting.params_by_kind` splits a model by part)."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n = _logical_numel(p)
            total += n
            trainable += n if p.requires_grad else 0
    return {"trainable_params": trainable, "total_params": total}


def resident_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer | None = None) -> int:
    """Bytes of every tensor the model and optimizer keep between steps: parameters, buffers,
    bitsandbytes quantization states (NF4 absmax and code, INT8 row scales), optimizer states (measured from the
    tensors themselves; a tensor shared by two modules, as a tied embedding, once)."""
    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
        qs = getattr(t, "quant_state", None)
        while qs is not None:
            add(qs.absmax), add(qs.code), add(getattr(qs, "offset", None))
            qs = getattr(qs, "state2", None)
        add(getattr(t, "SCB", None))
    for state in (opt.state.values() if opt else []):
        for v in state.values():
            add(v)
    return sum(seen.values())


def size_on_disk(path: str | Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        raise FileNotFoundError(p)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def bits_per_param(n_bytes: int, n_params: int) -> float:
    """Stored bits per parameter (file bytes include headers, so slightly above the nominal width)."""
    return 8.0 * n_bytes / n_params


# ---------------------------------------------------------------- the machine

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile",
             "amx_int8", "amx_bf16")


def cpu_info() -> tuple[str, list[str]]:
    """CPU model name and the SIMD/matrix flags that decide INT8/bf16 speed."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name, [f for f in ISA_FLAGS if f in flags]


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def runtime_env(device: str | torch.device = "cpu") -> dict[str, Any]:
    """The `env` block of a results file: device, CPU and flags, library versions, threads."""
    dev = torch.device(device)
    cpu, isa = cpu_info()
    env: dict[str, Any] = {"device": dev.type, "cpu": cpu, "isa": isa,
                           "python": platform.python_version(), "torch": torch.__version__,
                           "transformers": _version("transformers"), "peft": _version("peft"),
                           "bitsandbytes": _version("bitsandbytes"),
                           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if dev.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(dev), cuda=torch.version.cuda,
                   gpu_mem_bytes=torch.cuda.get_device_properties(dev).total_memory)
    return env


class Timer:
    """Wall time of a block, in seconds: `with Timer() as t: ...` then `t.seconds`."""

    seconds: float = 0.0

    def __enter__(self) -> Timer:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self._t0


class Sections:
    """Wall seconds of a study's named sections, in order (metrics.json `section_seconds`): where a profile's time
    goes, so a cut to fit a time budget is chosen from measurements."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 1)


def decode_speed(model: Any, prompt: torch.Tensor, n_new: int, repeats: int, eos: int,
                 device: torch.device) -> float:
    """Greedy decode tokens/s with the KV cache (median over repeats)."""
    return decode_speeds({"model": model}, prompt, n_new, repeats, eos, device)["model"]["tokens_per_s"]


def decode_speeds(models: dict[str, Any], prompt: torch.Tensor, n_new: int, repeats: int, eos: int,
                  device: torch.device) -> dict[str, dict[str, Any]]:
    """Greedy decode tokens/s of several models (median) and each repeat's seconds, interleaved repeat by repeat
    (drift hits all alike): their ratio (`speed_ratio` over the repeats) is the number to trust, the absolute
    rates move run to run."""
    def step(model: Any) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                model.generate(input_ids=prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                               pad_token_id=eos)
        return run

    lat = compare_latency({k: step(m) for k, m in models.items()}, warmup=1, repeats=repeats, device=device)
    return {k: {"tokens_per_s": n_new / (v["median_ms"] / 1e3), "repeat_s": [t / 1e3 for t in v["times_ms"]]}
            for k, v in lat.items()}
