"""How close each format runs to this machine's limits: batch-1 decode against the memory-bandwidth ceiling (it
reads every weight once per token) and prefill against the matmul ceiling, across model sizes.

The models are LLaMA-architecture (SmolLM2's family: tied embeddings, grouped-query attention) with random weights:
speed does not depend on the values, so the ladder costs no download and runs unchanged on CUDA. Each size is
written once as GGUF F16 and quantized by llama.cpp (cached); llama.cpp runs in worker processes
(`backends.llama_variants`) so that the AVX2 wheel and the variant built for this CPU are measured in one run.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlib import machine, metrics
from qlib.core.errors import QlabError
from qlib.core.paths import cache_dir

# hidden, intermediate, layers, heads, kv heads
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (256, 512, 2, 4, 2),          # the smoke profile's
    "60m": (512, 1536, 12, 8, 2),         # SmolLM2's family, scaled down
    "135m": (576, 1536, 30, 9, 3),        # SmolLM2-135M's shape
    "360m": (960, 2560, 32, 15, 5),       # SmolLM2-360M's shape
    "1b": (2048, 5632, 22, 32, 4),        # TinyLlama-1.1B's shape at SmolLM2's vocabulary
}
GGUF_FORMATS = ("f16", "q8_0", "q4_0", "q4_k_m", "tq2_0")
HF_FORMATS = {"fp32": None, "bnb_int8": "int8", "bnb_nf4": "nf4"}  # transformers format -> load_causal_lm method


@dataclass(frozen=True)
class Spec:
    """What the ladder runs (07's `roofline_*` parameters)."""

    sizes: tuple[str, ...] = ("60m", "135m", "360m", "1b")
    formats: tuple[str, ...] = GGUF_FORMATS
    threads: tuple[int, ...] = (1, 2)
    hf_sizes: tuple[str, ...] = ("60m", "135m")
    hf_formats: tuple[str, ...] = tuple(HF_FORMATS)
    compare_sizes: tuple[str, ...] = ("135m",)  # measured on the AVX2 wheel too, rounds interleaved
    prompt: int = 64
    gen: int = 16
    repeats: int = 3
    vocab_size: int = 49152  # SmolLM2's tokenizer
    amx: bool = False        # allow ggml's AMX variant (it crashed on this kind of CPU before)
    seed: int = 0


def check(spec: Spec, device: torch.device) -> None:
    """Bad input in one line before anything is built: an unknown size or format, more threads than cores, a
    size whose random draw does not fit in memory."""
    bad = [s for s in (*spec.sizes, *spec.hf_sizes, *spec.compare_sizes) if s not in SIZES]
    bad += [f for f in spec.formats if f not in GGUF_FORMATS] + [f for f in spec.hf_formats if f not in HF_FORMATS]
    if bad:
        raise QlabError(f"unknown roofline size/format {bad}; sizes: {', '.join(SIZES)}; GGUF: "
                        f"{', '.join(GGUF_FORMATS)}; transformers: {', '.join(HF_FORMATS)}")
    cores = os.cpu_count() or 1
    if device.type == "cpu" and max(spec.threads) > cores:
        raise QlabError(f"roofline threads {max(spec.threads)} is more than this machine's {cores} cores")
    import psutil

    need = max(4 * n_params(s, spec.vocab_size) * 1.5 for s in spec.sizes)  # the fp32 draw and its fp16 copy
    have = psutil.virtual_memory().available
    if need > have:
        big = max(spec.sizes, key=lambda s: n_params(s, spec.vocab_size))
        raise QlabError(f"roofline size {big} needs about {need / 2**30:.1f} GiB of memory to draw; "
                        f"{have / 2**30:.1f} GiB is free")


def n_params(size: str, vocab: int) -> int:
    """Parameters of the tied-embedding LLaMA of `size` (norms included)."""
    h, i, layers, heads, kv = SIZES[size]
    hd = h // heads
    per_layer = h * h * 2 + 2 * h * kv * hd + 3 * h * i + 2 * h
    return vocab * h + layers * per_layer + h


def hf_config(size: str, vocab: int) -> Any:
    from transformers import LlamaConfig

    h, i, layers, heads, kv = SIZES[size]
    return LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True,
                       max_position_embeddings=2048, rms_norm_eps=1e-5)


def model_dir(size: str, tok_dir: Path, spec: Spec) -> Path:
    """The random model in FP16 with the tokenizer beside it (what llama.cpp's converter needs), saved once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlib import models

    path = cache_dir() / "roofline" / f"{size}-v{spec.vocab_size}-s{spec.seed}-{tok_dir.name}"
    if not (path / "config.json").is_file():
        def build() -> torch.nn.Module:
            return AutoModelForCausalLM.from_config(hf_config(size, spec.vocab_size), dtype=torch.float16)

        models.save_random_init(path, build, spec.seed)
        AutoTokenizer.from_pretrained(tok_dir).save_pretrained(path)
    return path


def gguf_files(size: str, tok_dir: Path, spec: Spec) -> dict[str, Path]:
    """GGUF F16 of the size's model and each format quantized from it by llama.cpp (cached)."""
    from qlib import pretrain
    from qlib.backends import gguf

    folder = cache_dir() / "roofline" / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    f16 = folder / f"{size}-v{spec.vocab_size}-s{spec.seed}-{tok_dir.name}-f16.gguf"
    if not f16.is_file():
        gguf.convert(model_dir(size, tok_dir, spec), f16, "f16", pre_tokenizer=pretrain.gguf_pre_tokenizer(tok_dir))
    out = {}
    for fmt in spec.formats:
        path = f16 if fmt == "f16" else f16.with_name(f16.name.replace("-f16.", f"-{fmt}."))
        if not path.is_file():
            gguf.quantize(f16, path, fmt)
        out[fmt] = path
    return out


def kv_bytes(size: str, context: float, element_bytes: int) -> float:
    """Bytes of the K and V cache a decode step reads at `context` tokens."""
    h, _, layers, heads, kv = SIZES[size]
    return 2 * layers * kv * (h // heads) * context * element_bytes


def flops_per_token(size: str, vocab: int, context: float) -> float:
    """Multiply-adds x 2 per token: every weight matrix (the tied output head included), and attention's scores
    and weighted sum over `context` positions."""
    h, _, layers, _, _ = SIZES[size]
    matrices = n_params(size, vocab) - layers * 2 * h - h  # norms are not matrices
    return 2 * matrices + layers * 4 * h * context


def gguf_weight_bytes(path: Path) -> int:
    """Tensor bytes a decode step reads from a GGUF file: all of them, less the embedding table when the file has
    its own output matrix (then a step reads one embedding row)."""
    from qlib.backends import gguf

    table = gguf._table(path)
    total = sum(int(t.n_bytes) for t in table.values())
    if "output.weight" in table and "token_embd.weight" in table:
        total -= int(table["token_embd.weight"].n_bytes)
    return total


# ---------------------------------------------------------------- the ladder


@dataclass
class Result:
    rows: list[dict[str, Any]]       # one per runtime, build, size, format and thread count
    builds: list[dict[str, Any]]     # the chosen variant against the AVX2 wheel, per size and format
    ceilings: dict[str, Any]         # per device: read bandwidth and matmul throughput (`machine.ceilings`)
    variants: dict[str, Any]         # ggml's scores, the variant chosen, the AMX variant's fate, system info
    section_seconds: dict[str, float] = field(default_factory=dict)  # wall seconds per part of the run


def run(spec: Spec, device: torch.device, tok_dir: Path, variants: bool = True) -> Result:
    """Ceilings, the GGUF ladder on the best build (and the AVX2 wheel beside it at `compare_sizes`), and the
    transformers formats at `hf_sizes`."""
    from tqdm.auto import tqdm

    from qlib.backends import llama_variants as lv

    check(spec, device)
    part = metrics.Sections()
    with part("ceilings"):
        ceil = {"cpu": machine.ceilings(torch.device("cpu"), spec.threads)}
        if device.type == "cuda":
            ceil["cuda"] = machine.ceilings(device)
    gguf_sizes = spec.sizes if spec.formats else ()  # no GGUF formats (the gpu profile): transformers only
    with part("GGUF files"):
        files = {s: gguf_files(s, tok_dir, spec) for s in tqdm(gguf_sizes, desc="roofline: GGUF files")}
    info: dict[str, Any] = {"chosen": lv.WHEEL, "scores": None, "amx": None}
    if variants and files:
        with part("variant build and scores"):
            info["scores"] = lv.scores()
            info["chosen"] = lv.best(info["scores"], spec.amx)
    prompt = np.random.default_rng(spec.seed).integers(0, spec.vocab_size, spec.prompt).tolist()
    rows: list[dict[str, Any]] = []
    for size in tqdm(gguf_sizes, desc="roofline: llama.cpp"):
        for t in spec.threads:
            with part(f"llama.cpp {size}"):
                got = lv.measure(info["chosen"], files[size], prompt, spec.gen, t, spec.repeats)
            info.setdefault("system_info", got.pop("system_info"))
            rows += [_row("llama.cpp", info["chosen"], size, fmt, t, got[fmt], spec, gguf_weight_bytes(p), 2,
                          ceil["cpu"]) for fmt, p in files[size].items()]
    with part("AVX2 wheel and AMX variant beside it"):
        builds = compare_builds(lv, info["chosen"], files, prompt, spec, ceil["cpu"]) if variants and files else []
        if variants and files and (info["scores"] or {}).get("sapphirerapids", 0) > 0 and not spec.amx:
            info["amx"] = _try_amx(lv, files, prompt, spec)
    for size in tqdm(spec.hf_sizes, desc="roofline: transformers"):
        with part(f"transformers {size}"):
            rows += hf_rows(size, tok_dir, spec, device, ceil.get("cuda", ceil["cpu"]))
    return Result(rows, builds, ceil, info, part.seconds)


def _row(runtime: str, build: str, size: str, fmt: str, threads: int, times: dict[str, list[float]], spec: Spec,
         weight_bytes: int, kv_element_bytes: int, ceil: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s with intervals, bytes and FLOPs per token, and the fractions of the ceilings they reach."""
    bpt = weight_bytes + kv_bytes(size, spec.prompt + spec.gen / 2, kv_element_bytes)
    fpt = flops_per_token(size, spec.vocab_size, spec.prompt / 2)
    d = metrics.median_interval([spec.gen / s for s in times["decode_s"]])
    p = metrics.median_interval([spec.prompt / s for s in times["prefill_s"]])
    key = str(threads) if str(threads) in ceil["read_bytes_per_s"] else "1"
    bw, mm = ceil["read_bytes_per_s"][key], ceil["matmul_per_s"][key]["fp32"]
    return {"runtime": runtime, "build": build, "size": size, "params": n_params(size, spec.vocab_size),
            "format": fmt, "threads": threads, "decode_tokens_per_s": d[0], "decode_tokens_per_s_lo": d[1],
            "decode_tokens_per_s_hi": d[2], "prefill_tokens_per_s": p[0], "prefill_tokens_per_s_lo": p[1],
            "prefill_tokens_per_s_hi": p[2], "weight_bytes": weight_bytes, "bytes_per_token": bpt,
            "achieved_bytes_per_s": d[0] * bpt, "bandwidth_fraction": d[0] * bpt / bw,
            "decode_ceiling_tokens_per_s": bw / bpt, "flops_per_token": fpt,
            "prefill_flops_fraction": p[0] * fpt / mm, "decode_s": times["decode_s"],
            "prefill_s": times["prefill_s"]}


def compare_builds(lv: Any, chosen: str, files: dict[str, dict[str, Path]], prompt: list[int], spec: Spec,
                   ceil: dict[str, Any]) -> list[dict[str, Any]]:
    """The chosen variant against the AVX2 wheel on one thread, the two builds' worker processes alternating round
    by round: speed ratios with intervals over rounds."""
    out = []
    for size in spec.compare_sizes:
        if size not in files:
            continue
        times: dict[str, dict[str, dict[str, list[float]]]] = {lv.WHEEL: {}, chosen: {}}
        for _ in range(spec.repeats):
            for build in times:
                got = lv.measure(build, files[size], prompt, spec.gen, 1, 1)
                for fmt in files[size]:
                    for k in ("prefill_s", "decode_s"):
                        times[build].setdefault(fmt, {"prefill_s": [], "decode_s": []})[k] += got[fmt][k]
        for fmt in files[size]:
            a, b = times[lv.WHEEL][fmt], times[chosen][fmt]
            pr, dr = metrics.speed_ratio(a["prefill_s"], b["prefill_s"]), metrics.speed_ratio(a["decode_s"],
                                                                                              b["decode_s"])
            out.append({"size": size, "format": fmt, "threads": 1, "build": chosen, "against": lv.WHEEL,
                        "prefill_speedup": pr["ratio"], "prefill_speedup_lo": pr["lo"], "prefill_speedup_hi": pr["hi"],
                        "decode_speedup": dr["ratio"], "decode_speedup_lo": dr["lo"], "decode_speedup_hi": dr["hi"],
                        "rounds": spec.repeats})
    return out


def _try_amx(lv: Any, files: dict[str, dict[str, Path]], prompt: list[int], spec: Spec) -> dict[str, Any]:
    """One round of the AMX variant on the first compared size's Q4_0 (or first format): does it run, how fast."""
    size = next((s for s in spec.compare_sizes if s in files), next(iter(files)))
    fmt = "q4_0" if "q4_0" in files[size] else next(iter(files[size]))
    got = lv.run_job({"build": "sapphirerapids", "paths": {fmt: str(files[size][fmt])}, "prompt": prompt,
                      "gen": spec.gen, "threads": 1, "repeats": 1})
    if "crashed" in got:
        return {"size": size, "format": fmt, "ran": False, "crashed": got["crashed"]}
    return {"size": size, "format": fmt, "ran": True, "prefill_tokens_per_s": spec.prompt / got[fmt]["prefill_s"][0],
            "decode_tokens_per_s": spec.gen / got[fmt]["decode_s"][0]}


def hf_rows(size: str, tok_dir: Path, spec: Spec, device: torch.device, ceil: dict[str, Any]) -> list[dict[str, Any]]:
    """The transformers formats of one size (FP32, bitsandbytes INT8 and NF4), rounds interleaved over formats."""
    from qlib import models

    path = model_dir(size, tok_dir, spec)
    loaded = {fmt: models.load_causal_lm(path, HF_FORMATS[fmt], device).eval() for fmt in spec.hf_formats}
    ids = np.random.default_rng(spec.seed).integers(0, spec.vocab_size, spec.prompt)
    prompt = torch.from_numpy(ids)[None].to(device)
    rows = []
    for t in (spec.threads if device.type == "cpu" else (1,)):
        times = {fmt: {"prefill_s": [], "decode_s": []} for fmt in loaded}
        with metrics.torch_threads(t):
            for r in range(spec.repeats + 1):
                for fmt, m in loaded.items():
                    p, d = _hf_prefill_decode(m, prompt, spec.gen, device)
                    if r:  # the first round warms up
                        times[fmt]["prefill_s"].append(p)
                        times[fmt]["decode_s"].append(d)
        rows += [_row("transformers", device.type, size, fmt, t, times[fmt], spec, metrics.resident_bytes(m), 4, ceil)
                 for fmt, m in loaded.items()]
    return rows


def _hf_prefill_decode(model: torch.nn.Module, prompt: torch.Tensor, gen: int,
                       device: torch.device) -> tuple[float, float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        sync()
        t1 = time.perf_counter()
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(gen):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync()
    return t1 - t0, time.perf_counter() - t1


# ---------------------------------------------------------------- what the ladder says


def speed_ratio(rows: list[dict[str, Any]], size: str, fmt: str, against: str = "f16", threads: int = 1,
                runtime: str = "llama.cpp", key: str = "decode_s") -> dict[str, Any] | None:
    """How many times faster `fmt` ran than `against` at one size and thread count (rounds are interleaved over
    formats, so repeats pair up), with its interval; None where either is missing."""
    pick = {r["format"]: r for r in rows if (r["runtime"], r["size"], r["threads"]) == (runtime, size, threads)}
    if fmt not in pick or against not in pick:
        return None
    return metrics.speed_ratio(pick[against][key], pick[fmt][key])


def benchmark(res: Result, spec: Spec) -> dict[str, Any]:
    """The issue's checks: Q4_0 decode over F16 at the largest size on one thread (at least 2x), the new build's
    Q4_0 prefill over the AVX2 wheel's at the compared size (at least 1.3x on an AVX-512 machine)."""
    top = max(spec.sizes, key=lambda s: n_params(s, spec.vocab_size)) if spec.sizes else None
    dec = speed_ratio(res.rows, top, "q4_0") if top else None
    pre = next((b for b in res.builds if b["format"] == "q4_0"), None)
    avx512 = "avx512f" in res.ceilings["cpu"]["isa"]
    return {"size": top, "q4_0_decode_vs_f16": dec, "q4_0_decode_vs_f16_min": 2.0,
            "q4_0_decode_ok": None if dec is None else dec["ratio"] >= 2.0,
            "q4_0_prefill_vs_avx2": None if pre is None else {k: pre[k] for k in (
                "prefill_speedup", "prefill_speedup_lo", "prefill_speedup_hi", "size", "build")},
            "q4_0_prefill_vs_avx2_min": 1.3 if avx512 else None,
            "q4_0_prefill_ok": None if pre is None or not avx512 else pre["prefill_speedup"] >= 1.3}


def findings(res: Result, spec: Spec) -> list[str]:
    """Markdown lines from this run's numbers: where each format sits against the ceilings, where decode becomes
    bandwidth-bound, what the instruction set buys."""
    c = res.ceilings["cpu"]
    gb = 1e9
    bw = ", ".join(f"{t} thread(s) {v / gb:.1f} GB/s" for t, v in c["read_bytes_per_s"].items())
    mm = "; ".join(f"{t} thread(s) " + ", ".join(f"{d} {v / 1e9:.0f} G/s" for d, v in per.items())
                   for t, per in c["matmul_per_s"].items())
    llc = f"{c['llc_bytes'] / 2**20:.0f} MiB" if c.get("llc_bytes") else "unknown"
    lines = [f"- Ceilings of this CPU ({c['cpu']}; last-level cache {llc}): read bandwidth {bw}; matmul {mm}."]
    if g := res.ceilings.get("cuda"):
        mm_gpu = ", ".join(f"{d} {v / 1e12:.1f} T/s" for d, v in g["matmul_per_s"]["1"].items())
        lines.append(f"- Ceilings of this GPU ({g['gpu']}): read bandwidth {g['read_bytes_per_s']['1'] / gb:.0f} GB/s; "
                     f"matmul {mm_gpu}. The transformers rows are measured against these.")
    gguf = [r for r in res.rows if r["runtime"] == "llama.cpp" and r["threads"] == 1]
    for size in spec.sizes:
        at = {r["format"]: r for r in gguf if r["size"] == size}
        if not at:
            continue
        parts = ", ".join(f"{f} {r['decode_tokens_per_s']:.1f} tok/s ({r['bandwidth_fraction']:.2f} of the bandwidth "
                          f"ceiling, {r['weight_bytes'] / 2**20:.0f} MiB)" for f, r in at.items())
        lines.append(f"- {size}, llama.cpp, 1 thread, decode: {parts}.")
    lines += _scaling_lines(gguf, spec, c.get("llc_bytes"))
    lines += _transformers_lines(res.rows)
    b = benchmark(res, spec)
    if (d := b["q4_0_decode_vs_f16"]) is not None:
        lines.append(f"- At {b['size']} on 1 thread Q4_0 decodes {d['ratio']:.2f}x [{d['lo']:.2f}, {d['hi']:.2f}] "
                     f"as fast as F16 (the issue asks at least 2x).")
    for r in res.builds:
        lines.append(f"- The {r['build']} build against the AVX2 wheel, {r['size']} {r['format']}, 1 thread: prefill "
                     f"{_x(r, 'prefill_speedup')}, decode {_x(r, 'decode_speedup')}.")
    amx = res.variants.get("amx")
    if amx:
        lines.append(f"- ggml's AMX variant (sapphirerapids) on {amx['size']} {amx['format']}: "
                     + (f"ran, prefill {amx['prefill_tokens_per_s']:.0f} tok/s, decode "
                        f"{amx['decode_tokens_per_s']:.1f} tok/s." if amx["ran"] else f"failed: {amx['crashed']}."))
    return lines


def _scaling_lines(gguf: list[dict[str, Any]], spec: Spec, llc: int | None) -> list[str]:
    """Where the F16 weights leave the last-level cache, and how each format's decode lead over F16 moves with
    size (one thread)."""
    out = []
    if llc:
        past = [s for s in spec.sizes if any(r["size"] == s and r["format"] == "f16" and r["weight_bytes"] > llc
                                             for r in gguf)]
        out.append(f"- F16 weights outgrow the last-level cache ({llc / 2**20:.0f} MiB) "
                   + (f"first at {past[0]}: from there decode streams from DRAM, below it the cache serves part of the "
                      "reads (a bandwidth fraction above 1 is the cache, not a measurement error)." if past else
                      "at none of the sizes run: every decode here is served partly from cache."))
    for fmt in (f for f in spec.formats if f != "f16"):
        ratios = [(s, r) for s in spec.sizes if (r := speed_ratio(gguf, s, fmt)) is not None]
        if ratios:
            out.append(f"- {fmt} decode over F16, 1 thread: " + ", ".join(
                f"{s} {r['ratio']:.2f}x [{r['lo']:.2f}, {r['hi']:.2f}]" for s, r in ratios) + ".")
    return out


def _transformers_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per size, the transformers formats' decode on one thread (or the GPU) against the bandwidth ceiling."""
    hf = [r for r in rows if r["runtime"] == "transformers" and r["threads"] == 1]
    out = []
    for size in dict.fromkeys(r["size"] for r in hf):
        parts = ", ".join(f"{r['format']} {r['decode_tokens_per_s']:.1f} tok/s ({r['bandwidth_fraction']:.2f})"
                          for r in hf if r["size"] == size)
        out.append(f"- {size}, transformers on {hf[0]['build']}, decode (fraction of the bandwidth ceiling): {parts}.")
    return out


def _x(r: dict[str, Any], key: str) -> str:
    lo, hi = r.get(f"{key}_lo"), r.get(f"{key}_hi")
    return f"{r[key]:.2f}x" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None else "")


def table(rows: list[dict[str, Any]]) -> Any:
    """The rows as a DataFrame for the notebook (tokens/s, bytes per token in MiB, fractions of the ceilings)."""
    import pandas as pd

    df = pd.DataFrame([{k: v for k, v in r.items() if k not in ("decode_s", "prefill_s")} for r in rows])
    if df.empty:
        return df
    df["MiB_per_token"] = df["bytes_per_token"] / 2**20
    cols = ["runtime", "build", "size", "format", "threads", "decode_tokens_per_s", "decode_tokens_per_s_lo",
            "decode_tokens_per_s_hi", "MiB_per_token", "bandwidth_fraction", "prefill_tokens_per_s",
            "prefill_flops_fraction"]
    return df[cols]


def plot(rows: list[dict[str, Any]], ceilings: dict[str, Any], ax: Any, threads: int = 1) -> Any:
    """Decode tokens/s against bytes read per token (log-log), one line per format across sizes, and the
    bandwidth ceiling (tokens/s = bandwidth / bytes) as a diagonal."""
    import seaborn as sns

    df = table([r for r in rows if r["threads"] == threads])
    if df.empty:
        return ax
    df["label"] = df["runtime"] + " " + df["format"]
    sns.lineplot(data=df.sort_values("MiB_per_token"), x="MiB_per_token", y="decode_tokens_per_s", hue="label",
                 marker="o", ax=ax)
    dev = "cuda" if "cuda" in ceilings and (df["build"] == "cuda").any() else "cpu"
    bw = ceilings[dev]["read_bytes_per_s"].get(str(threads)) or ceilings[dev]["read_bytes_per_s"]["1"]
    xs = np.geomspace(df["MiB_per_token"].min() / 1.5, df["MiB_per_token"].max() * 1.5, 50)
    ax.plot(xs, bw / (xs * 2**20), "k--", label=f"read-bandwidth ceiling ({bw / 1e9:.1f} GB/s)")
    llc = ceilings["cpu"].get("llc_bytes")
    if llc:
        ax.axvline(llc / 2**20, color="grey", lw=1, ls=":", label="last-level cache")
    ax.set(xscale="log", yscale="log", xlabel="MiB read per decoded token", ylabel="decode tokens/s",
           title=f"batch-1 decode against the bandwidth ceiling, {threads} thread(s)")
    ax.legend(fontsize=7)
    return ax
