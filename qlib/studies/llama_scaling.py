"""Study 07: the QLoRA recipe scaled to LLaMA-7B: exact accounting, a measured ladder, fit and projection."""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from qlib import accounting, adapters, assets, budget, hub, metrics, models, results, roofline
from qlib.config import make_config, parse_params
from qlib.core import dist
from qlib.core.device import compute_dtype, pick_device, set_seed, t4_conditions
from qlib.core.errors import QlabError
from qlib.core.io import atomic_write_text
from qlib.core.paths import cache_dir, results_dir
from qlib.studies import StudyResult, llama_finetune, staged

STUDY = "07_llama_scaling"
METHODS = ("full", "lora", "qlora")
# LLaMA-architecture rungs (hidden, intermediate, layers, heads) at the real 32k vocabulary
SIZES: dict[str, tuple[int, int, int, int]] = {
    "llama-2m": (64, 176, 2, 4), "llama-5m": (128, 344, 2, 4),
    "llama-20m": (256, 688, 4, 4), "llama-60m": (512, 1376, 8, 8),
    "llama-130m": (768, 2048, 12, 12), "llama-270m": (1024, 2752, 16, 16),
    "llama-7b": (4096, 11008, 32, 32),
}
T4_USABLE_GIB = budget.T4_GIB
T4_FIT_GIB = budget.MARGIN * budget.T4_GIB  # a fit keeps the accounting's known error in hand, as `plan` does
# The workplace's own check with plain bitsandbytes 0.50.2 + peft on an H100 80GB (docs/assets.md, "Reference
# measurements"): LLaMA-7B architecture, LoRA r16 on 7 projections, bf16, seq 512, batch 1, checkpointing,
# PagedAdamW8bit, torch.cuda.max_memory_allocated. The measured training peak the 7B projection is held against
# (a reference, not a result of this code).
PLAIN_BNB_PEFT_H100 = {"qlora": {"peak_gib": 4.29, "step_s": 0.78}, "lora": {"peak_gib": 13.13, "step_s": 0.45}}
H100_SOURCE = ("plain bitsandbytes 0.50.2 + peft on an H100 80GB, LLaMA-7B architecture, LoRA r16 on 7 projections, "
               "bf16, seq 512, batch 1, checkpointing, PagedAdamW8bit (docs/assets.md, measured 2026-11-23)")


# the asset role of each id parameter (`python -m qlib run` resolves a -p id before papermill starts)
ASSET_ROLES = {"model_id": "llama-arch", "dataset_id": "code"}


@dataclass(frozen=True)
class Config:
    """Notebook 07's parameters."""

    profile: str = "default"
    seed: int = 0
    rungs: tuple[str, ...] = ("llama-20m", "llama-60m", "llama-130m", "llama-270m")
    methods: tuple[str, ...] = METHODS
    vocab_size: int = 32000
    lora_rank: int = 16
    seq: int = 256
    batch: int = 1
    steps: int = 3              # timed steps per rung and method (after one warm-up step)
    checkpointing: bool = True
    projection_seq: int = 512   # the 7B projection's sequence (the QLoRA recipe: seq 512, batch 1)
    finetune_7b: bool = False   # t4: a real QLoRA fine-tune of the hub LLaMA-7B (CUDA + hub only)
    model_id: str = "llama-2-7b"              # registry key, hub id or local folder (Kaggle input)
    dataset_id: str = "codesearchnet-python"  # the fine-tune's text: hub id, registry key or local folder
    finetune_steps: int = 30
    lora_alpha: int | None = None          # the fine-tune's LoRA alpha (None: 2 x lora_rank)
    lora_dropout: float = 0.05             # the fine-tune's LoRA dropout (0: runs comparable step for step)
    quant_storage: str | None = None       # the 4-bit codes' dtype (None: uint8; under FSDP the compute dtype)
    lora_targets: str = "attention+mlp"    # the fine-tune's preset: attention (q/k/v/o_proj) | attention+mlp (all 7)
    keep_lm_head_fp16: bool = True         # False: NF4 for LLaMA's untied lm_head too
    optimizer: str = "paged_adamw_8bit"    # the fine-tune's: paged_adamw_8bit | paged_adamw_32bit | adamw_torch
    t4_check: bool = False      # CUDA: rerun the 7B QLoRA rung as on a T4 (fp16, allocator capped at 15 GiB)
    # decode and prefill against this machine's ceilings (qlib.roofline): random-weight LLaMAs of these sizes
    roofline_sizes: tuple[str, ...] = roofline.Spec.sizes      # () skips the roofline
    roofline_formats: tuple[str, ...] = roofline.Spec.formats  # GGUF types, in llama.cpp
    roofline_hf_sizes: tuple[str, ...] = roofline.Spec.hf_sizes  # transformers FP32 / bnb INT8 / NF4 at these sizes
    roofline_threads: tuple[int, ...] = roofline.Spec.threads
    roofline_repeats: int = roofline.Spec.repeats
    roofline_variants: bool = True  # llama.cpp built per instruction set, the best for this CPU against the AVX2 wheel
    roofline_amx: bool = False      # let ggml's AMX variant be chosen (it crashed here before: tried apart otherwise)
    roofline_tokenizer: str = "smollm2-135m"  # the vocabulary the random models and their GGUF files carry
    device: str = "auto"


PROFILES: dict[str, dict[str, Any]] = {
    "smoke": dict(rungs=("llama-2m", "llama-5m"), vocab_size=1000, seq=32, steps=1, projection_seq=64,
                  roofline_sizes=("tiny",), roofline_formats=("f16", "q4_0"), roofline_hf_sizes=("tiny",),
                  roofline_threads=(1,), roofline_repeats=2, roofline_variants=False,
                  roofline_tokenizer="llama-stdlib-tiny"),
    "default": {},
    "t4": dict(finetune_7b=True, seq=512, roofline_variants=False),
    "gpu": dict(rungs=("llama-60m", "llama-130m", "llama-270m", "llama-7b"), methods=("lora", "qlora"), seq=512,
                steps=5, t4_check=True, roofline_variants=False, roofline_formats=(),
                roofline_hf_sizes=("60m", "135m", "360m", "1b")),  # the GPU's roofline: llama.cpp's wheel is CPU-only
}


def config(profile: str = "default", **overrides: Any) -> Config:
    cfg = make_config(Config, PROFILES, profile, **overrides)
    bad = [r for r in cfg.rungs if r not in SIZES] + [m for m in cfg.methods if m not in METHODS]
    if bad:
        raise QlabError(f"unknown rung/method {bad}; rungs: {', '.join(SIZES)}; methods: {', '.join(METHODS)}")
    llama_finetune.knobs(cfg)  # the fine-tune's preset and optimizer: one line
    return cfg


def rung_config(name: str, vocab_size: int) -> Any:
    h, i, layers, heads = SIZES[name]
    return accounting.llama_config(vocab_size=vocab_size, hidden_size=h, intermediate_size=i,
                                   num_hidden_layers=layers, num_attention_heads=heads,
                                   num_key_value_heads=heads, max_position_embeddings=2048)


def setup_for(method: str, device: torch.device, rank: int) -> accounting.TrainingSetup:
    """The method's recipe on this device (its compute dtype, T4 conditions included): paged 8-bit AdamW on
    CUDA (2 bytes of state per trainable parameter), torch's AdamW on the CPU (8)."""
    return accounting.recipe(method, compute_dtype(device), 2 if device.type == "cuda" else 8, rank,
                             lora_dropout=True)  # add_causal_lora: dropout 0.05 keeps each target's input


def weights_dtype(method: str, device: torch.device) -> torch.dtype:
    """The dtype `prepare` loads a rung's unquantized weights in (see `setup_for`)."""
    return torch.float32 if setup_for(method, device, 0).weight_format == "fp32" else compute_dtype(device)


def random_init_dir(name: str, vocab_size: int, seed: int, root: Path, device: torch.device | None = None) -> Path:
    """A randomly initialised rung saved once, in FP16, and reused by later runs (bitsandbytes quantizes on load
    from a folder; FP16 halves the disk and RAM a 7B rung needs, and each method loads it in its own dtype).
    Initialised on `device`: on a GPU the 7B draw takes seconds instead of minutes of CPU."""
    from transformers import AutoModelForCausalLM

    def build() -> torch.nn.Module:
        with torch.device(device or "cpu"):
            return AutoModelForCausalLM.from_config(rung_config(name, vocab_size), dtype=torch.float16)

    path = models.save_random_init(root / f"{name}-v{vocab_size}-s{seed}-fp16", build, seed)
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()  # the draw's 13 GB are not the rung's memory
    return path


def prepare(path: Path, method: str, rank: int, checkpointing: bool, device: torch.device) -> Any:
    """Load the rung for `method` and make only what that method trains trainable."""
    model = models.load_causal_lm(path, "qlora" if method == "qlora" else None, device,
                                  dtype=weights_dtype(method, device))
    model.config.use_cache = False
    if method != "full":
        return adapters.add_causal_lora(model, rank, kbit=method == "qlora", gradient_checkpointing=checkpointing)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def optimizer_for(params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """Paged 8-bit AdamW on CUDA (the QLoRA recipe); plain AdamW on CPU, where paging does not apply."""
    if device.type == "cuda":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4)


def _step(model: Any, opt: torch.optim.Optimizer, ids: torch.Tensor, scaler: torch.amp.GradScaler,
          dtype: torch.dtype) -> float:
    import time

    t0 = time.perf_counter()
    with torch.autocast(ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(input_ids=ids, labels=ids).loss
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure_rung(name: str, method: str, cfg: Config, device: torch.device, root: Path) -> dict[str, Any]:
    """One rung x method: peak memory (measured and predicted), step time, tokens/s; OOM -> a status row."""
    arch = rung_config(name, cfg.vocab_size)
    meta = accounting.meta_model(arch)
    setup = setup_for(method, device, cfg.lora_rank)
    predicted = accounting.training_bytes(arch, setup, cfg.batch, cfg.seq, cfg.checkpointing, meta)
    row: dict[str, Any] = {"rung": name, "method": method, "status": "ok", "seq": cfg.seq, "batch": cfg.batch,
                           "total_params": accounting.params_by_kind(meta)["total"],
                           "predicted_peak_mem_bytes": predicted["total"],
                           "predicted_resident_bytes": predicted["weights"] + predicted["trainable_weights"]
                           + predicted["optimizer"],
                           "trainable_params": predicted["trainable_params"]}
    if device.type == "cuda":  # the peak is the allocator's absolute one: what an earlier rung left counts in it
        gc.collect()
        torch.cuda.empty_cache()
        row["allocated_before_bytes"] = torch.cuda.memory_allocated(device)
    try:
        path = random_init_dir(name, cfg.vocab_size, cfg.seed, root, device)
        set_seed(cfg.seed)
        model = prepare(path, method, cfg.lora_rank, cfg.checkpointing, device).train()
        opt = optimizer_for([p for p in model.parameters() if p.requires_grad], device)
        ids = torch.randint(0, cfg.vocab_size, (cfg.batch, cfg.seq), generator=torch.Generator().manual_seed(0))
        ids = ids.to(device)
        # fp16 (a T4, or t4_conditions) trains with a GradScaler as a T4 user would; bf16 and fp32 need none
        dtype = compute_dtype(device)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        _step(model, opt, ids, scaler, dtype)  # warm-up: allocates optimizer states and kernels
        resident = metrics.resident_bytes(model, opt)
        with metrics.PeakMemory(device) as mem:
            times = [_step(model, opt, ids, scaler, dtype) for _ in range(cfg.steps)]
        peak = mem.peak_bytes if device.type == "cuda" else resident + mem.peak_bytes
        row.update(peak_mem_bytes=peak, resident_bytes=resident, peak_mem_source=(
            mem.source if device.type == "cuda" else "resident tensors + cpu_rss_delta of the steps"),
            step_time_s=float(np.median(times)), tokens_per_s=cfg.batch * cfg.seq / float(np.median(times)),
            trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad))
        row["prediction_error"] = predicted["total"] / peak - 1
        row["resident_prediction_error"] = row["predicted_resident_bytes"] / resident - 1
    except torch.OutOfMemoryError:
        row.update(status="oom", note=f"out of memory at {row['total_params']:,} params, seq {cfg.seq}")
    except (RuntimeError, ValueError) as e:  # one failed rung is a row that says why; the ladder goes on
        row.update(status="error", note=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def ladder_plan(cfg: Config) -> list[budget.Prediction]:
    """The ladder's largest rung for each method, as a T4 would train it (fp16, paged 8-bit AdamW)."""
    top = max(cfg.rungs, key=lambda r: SIZES[r][0] * SIZES[r][2])
    steps = 1 + cfg.steps
    return [budget.predict(f"07 ladder {top} {m}, batch {cfg.batch} x {cfg.seq}", rung_config(top, cfg.vocab_size), m,
                           batch=cfg.batch, seq=cfg.seq, steps=steps, compute=torch.float16, optimizer_bytes=2,
                           checkpointing=cfg.checkpointing, rank=cfg.lora_rank) for m in cfg.methods]


def uses_asset(cfg: Config, field: str) -> bool:
    """The hub LLaMA and its text are used only by the real 7B fine-tune."""
    return cfg.finetune_7b


def gpu_predictions(profile: str) -> list[budget.Prediction]:
    """This profile's training runs as a T4 would run them, predicted from the hub's true config
    (the study contract)."""
    cfg = config(profile)
    return ladder_plan(cfg) + (llama_finetune.plan(cfg, budget.hub_config(cfg.model_id), budget.T4)
                               if cfg.finetune_7b else [])


def run_ladder(cfg: Config, device: torch.device, root: Path) -> list[dict[str, Any]]:
    """Rungs in order; before each, the fit over the smaller rungs already measured predicts its step time
    and memory (the accounting predicts memory too), so every row is a prediction checked by a measurement."""
    rows: list[dict[str, Any]] = []
    for rung, method in tqdm([(r, m) for r in cfg.rungs for m in cfg.methods], desc="ladder"):
        n = accounting.params_by_kind(accounting.meta_model(rung_config(rung, cfg.vocab_size)))["total"]
        f = fit(rows, method, n)
        row = measure_rung(rung, method, cfg, device, root)
        row["fit_predicted_peak_mem_bytes"] = f["projected_peak_mem_bytes"] if f else None
        row["fit_predicted_step_time_s"] = f["projected_step_time_s"] if f else None
        rows.append(row)
    return rows


def t4_rung(cfg: Config, device: torch.device, root: Path) -> dict[str, Any]:
    """The 7B QLoRA rung again as a T4 would run it: fp16 compute, allocator capped at 15 GiB."""
    with t4_conditions(device, T4_USABLE_GIB) as fraction:
        row = measure_rung("llama-7b", "qlora", cfg, device, root)
    row.update(method="qlora_t4_conditions", memory_fraction=fraction, compute_dtype="fp16",
               note=f"fp16, allocator capped at {T4_USABLE_GIB:g} GiB; status {row['status']}")
    return row


def fit(rows: list[dict[str, Any]], method: str, target_params: float) -> dict[str, Any] | None:
    """Least squares over the measured rungs: memory = a + b*N (affine), step time = c*N^k (log-log)."""
    ok = [r for r in rows if r["method"] == method and r["status"] == "ok" and r["rung"] != "llama-7b"]
    if len(ok) < 2:
        return None
    n = np.array([r["total_params"] for r in ok], dtype=float)
    mem = np.array([r["peak_mem_bytes"] for r in ok], dtype=float)
    t = np.array([r["step_time_s"] for r in ok], dtype=float)
    b, a = np.polyfit(n, mem, 1)
    k, logc = np.polyfit(np.log(n), np.log(t), 1)
    largest = max(ok, key=lambda r: r["total_params"])
    return {"method": method, "mem_intercept_bytes": float(a), "mem_bytes_per_param": float(b),
            "time_exponent": float(k), "time_coeff": float(math.exp(logc)),
            "projected_peak_mem_bytes": float(a + b * target_params),
            "projected_step_time_s": float(math.exp(logc) * target_params ** k),
            "measured_over_predicted_largest_rung": largest["peak_mem_bytes"] / largest["predicted_peak_mem_bytes"]}


def _accounting_7b(method: str, dtype: torch.dtype, cfg: Config, model: Any) -> dict[str, int]:
    """The accounting of the 7B recipe (paged 8-bit AdamW, batch 1, checkpointing) with compute `dtype`."""
    setup = accounting.recipe(method, dtype, 2, cfg.lora_rank, lora_dropout=True)
    return accounting.training_bytes(accounting.llama_config(), setup, 1, cfg.projection_seq, True, model)


def projection_7b(cfg: Config, fits: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """7B on a 16 GB T4 (fp16 compute, paged 8-bit AdamW, seq 512, batch 1, checkpointing): the accounting, and
    the accounting shifted by its gap at the measured H100 peak of the same recipe in bf16 (an additive correction:
    the gap is the allocator's and the kernels' workspace, which does not scale with the weights' dtype). The CPU
    ladder's fit stays beside it for what it is: a CPU figure, whose gap to the accounting is neither additive
    nor proportional across rungs, so no correction is drawn from it."""
    model = accounting.meta_model(accounting.llama_config())
    rows = []
    for method in cfg.methods:
        parts = _accounting_7b(method, torch.float16, cfg, model)
        ref = PLAIN_BNB_PEFT_H100.get(method) if cfg.projection_seq == 512 and cfg.lora_rank == 16 else None
        h100 = _accounting_7b(method, torch.bfloat16, cfg, model)["total"] if ref else None
        gap = ref["peak_gib"] * 2**30 - h100 if ref else None
        corrected = parts["total"] + gap if ref else None
        f = fits.get(method)
        rows.append({"method": method, "device": "T4 16 GB (projected, fp16)", **parts,
                     "accounting_bytes": parts["total"], "h100_measured_bytes": ref and ref["peak_gib"] * 2**30,
                     "h100_accounting_bytes": h100, "h100_gap_bytes": gap, "corrected_bytes": corrected,
                     "cpu_fit_bytes": f["projected_peak_mem_bytes"] if f else None,
                     "cpu_fit_step_time_s": f["projected_step_time_s"] if f else None,
                     "fits_t4": parts["total"] <= T4_FIT_GIB * 2**30,
                     "fits_t4_corrected": corrected <= T4_FIT_GIB * 2**30 if corrected else None})
    return rows


BAR_7B = {"qlora_over_lora_mem_max": 1 / 3, "qlora_over_lora_time_max": 2.0, "qlora_peak_gib_max": 5.0}


def gpu_benchmark(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue bar at the 7B rung (measured side by side): QLoRA memory <= 1/3 of bf16 LoRA, time <= 2x, <= 5 GiB."""
    by = {r["method"]: r for r in rows if r["rung"] == "llama-7b" and r["status"] == "ok"}
    q, lo = by.get("qlora"), by.get("lora")
    if not q:
        return {"evaluated": False, "why": "no successful llama-7b QLoRA rung in this run"}
    out: dict[str, Any] = {"evaluated": True, **BAR_7B, "qlora_peak_gib": q["peak_mem_bytes"] / 2**30}
    out["qlora_peak_ok"] = out["qlora_peak_gib"] <= BAR_7B["qlora_peak_gib_max"]
    if lo:
        out["qlora_over_lora_mem"] = q["peak_mem_bytes"] / lo["peak_mem_bytes"]
        out["qlora_over_lora_time"] = q["step_time_s"] / lo["step_time_s"]
        out["mem_ok"] = out["qlora_over_lora_mem"] <= BAR_7B["qlora_over_lora_mem_max"]
        out["time_ok"] = out["qlora_over_lora_time"] <= BAR_7B["qlora_over_lora_time_max"]
    return out


@dataclass
class ScalingResult(StudyResult):
    ladder: list[dict[str, Any]]
    fits: dict[str, dict[str, Any]]
    projection: list[dict[str, Any]]
    accounting_7b: dict[str, Any]
    finetune: dict[str, Any] | None
    roofline: roofline.Result | None = None


def accounting_table() -> dict[str, Any]:
    """LLaMA-7B: parameters by module and weight bytes by format, from the meta-device model."""
    model = accounting.meta_model(accounting.llama_config())
    return {"params": accounting.params_by_kind(model),
            "weight_bytes": {f: accounting.weight_bytes(model, f) for f in accounting.FORMATS},
            "lora_r16_params": accounting.lora_params(model.config, 16),
            "activations_seq512_b1_fp16": {
                "no_checkpointing": accounting.activation_bytes(model.config, 1, 512, 2, False)["total"],
                "checkpointing": accounting.activation_bytes(model.config, 1, 512, 2, True)["total"]}}


@staged(STUDY)
def run(cfg: Config) -> ScalingResult:
    """Accounting at 7B, the measured ladder, fits and the 7B projection; metrics.json."""
    device = pick_device(cfg.device, cfg.profile)
    if cfg.roofline_sizes:  # a size past this machine's memory or more threads than cores: one line, now
        roofline.check(roofline_spec(cfg, roofline.Spec.vocab_size), device)
    asset_7b = None
    if cfg.finetune_7b:  # device, hub access (gated, offline) and the memory prediction: before the ladder's minutes
        llama_finetune.check_finetune_device(cfg, device)
        asset_7b = assets.resolve_model("llama-arch", cfg.model_id)
        budget.announce(llama_finetune.plan(cfg, hub.model_config(asset_7b.path), device), device)
    if budget.wanted(cfg.profile, device) and "llama-7b" not in cfg.rungs:
        budget.announce(ladder_plan(cfg), device)
    root = cache_dir() / "random-init"  # 14 GB at 7B: built once per rung, vocabulary and seed, not per run
    n_7b = accounting.params_by_kind(accounting.meta_model(accounting.llama_config()))["total"]
    part = metrics.Sections()
    with part("memory and speed ladder"):
        ladder = run_ladder(cfg, device, root)
        if cfg.t4_check:
            ladder.append(t4_rung(cfg, device, root))
    fits = {m: f for m in cfg.methods if (f := fit(ladder, m, n_7b)) is not None}
    projection = projection_7b(cfg, fits)
    bench = gpu_benchmark(ladder)
    acc7 = accounting_table()
    with part("7B fine-tune"):
        finetune = llama_finetune.finetune_7b(cfg, device, asset_7b) if cfg.finetune_7b else None
    with part("roofline"):
        roof, spec = run_roofline(cfg, device)
    rows = [results.make_row(f"{r['method']}", model=r["rung"], dataset="random tokens", **{
        k: v for k, v in r.items() if k not in ("method",)}) for r in ladder]
    doc_assets = {"model": {"role": "llama-arch", "id": ",".join(cfg.rungs), "source": "random-init",
                            "note": "memory and speed do not depend on the weights' values"},
                  "data": {"id": "random tokens", "source": "torch.randint, seed 0"}}
    env = metrics.runtime_env(device) | ({"ceilings": roof.ceilings, "llama_cpp": {
        "build": roof.variants["chosen"], "system_info": roof.variants.get("system_info")}} if roof else {})
    path = results.write_metrics(STUDY, cfg.profile, cfg.seed, env, doc_assets, rows,
                                 config=asdict(cfg), fits=fits, projection_7b=projection, accounting_7b=acc7,
                                 finetune_7b=finetune, benchmark=bench, roofline=roofline_block(roof, spec),
                                 readme=results.readme_block(gpu_pairs=[("qlora", "lora")], lines=measured_7b_lines(
                                     {"rows": rows, "benchmark": bench})),
                                 reference={f"{m}_7b_peak_gib": v["peak_gib"] for m, v in PLAIN_BNB_PEFT_H100.items()}
                                 | {"source": H100_SOURCE}, section_seconds=part.seconds)
    return ScalingResult(rows, results.load_metrics(path), path, ladder, fits, projection, acc7, finetune, roof)


def roofline_spec(cfg: Config, vocab_size: int) -> roofline.Spec:
    return roofline.Spec(sizes=cfg.roofline_sizes, formats=cfg.roofline_formats, threads=cfg.roofline_threads,
                         hf_sizes=cfg.roofline_hf_sizes, repeats=cfg.roofline_repeats, amx=cfg.roofline_amx,
                         compare_sizes=tuple(s for s in roofline.Spec.compare_sizes if s in cfg.roofline_sizes),
                         vocab_size=vocab_size, seed=cfg.seed)


def run_roofline(cfg: Config, device: torch.device) -> tuple[roofline.Result | None, roofline.Spec | None]:
    """The roofline ladder (qlib.roofline) with the tokenizer's vocabulary; its rows also as roofline.csv.gz."""
    if not cfg.roofline_sizes:
        return None, None
    from transformers import AutoTokenizer

    tok_dir = assets.resolve_model("llama-arch", cfg.roofline_tokenizer).path
    spec = roofline_spec(cfg, len(AutoTokenizer.from_pretrained(tok_dir)))
    roofline.check(spec, device)
    res = roofline.run(spec, device, Path(tok_dir), variants=cfg.roofline_variants)
    results.write_per_example(STUDY, cfg.profile, "roofline", roofline.table(res.rows).to_dict("list"))
    return res, spec


def roofline_block(res: roofline.Result | None, spec: roofline.Spec | None) -> dict[str, Any] | None:
    """metrics.json's `roofline`: every row (with its repeats), the build comparison, variants and checks."""
    if res is None or spec is None:
        return None
    return {"spec": asdict(spec), "rows": res.rows, "builds": res.builds, "variants": res.variants,
            "section_seconds": res.section_seconds,
            "benchmark": roofline.benchmark(res, spec), "findings": roofline.findings(res, spec)}


def findings(res: ScalingResult) -> str:
    """Markdown findings from this run's numbers."""
    gib = 2**30
    a = res.accounting_7b
    lines = [f"- LLaMA-7B counted on the meta device: {a['params']['total']:,} parameters "
             f"({a['params']['block_linears']:,} in block linears); "
             f"weights FP16 {a['weight_bytes']['fp16'] / gib:.2f} GiB, "
             f"INT8 {a['weight_bytes']['int8'] / gib:.2f}, NF4+DQ {a['weight_bytes']['nf4'] / gib:.2f}, "
             f"ternary {a['weight_bytes']['ternary'] / gib:.2f} GiB; LoRA r=16 on 7 projections: "
             f"{a['lora_r16_params']:,} trainable."]
    lines += _ladder_lines(res) + measured_7b_lines(res.doc)
    for p in res.projection:
        cons = ("" if p["corrected_bytes"] is None else
                f"; the same accounting in bf16 is {p['h100_accounting_bytes'] / gib:.2f} GiB against "
                f"{p['h100_measured_bytes'] / gib:.2f} GiB measured on an H100 (reference, docs/assets.md), a gap of "
                f"{p['h100_gap_bytes'] / gib:+.2f} GiB; shifted by it: {p['corrected_bytes'] / gib:.2f} GiB -> "
                f"{'fits' if p['fits_t4_corrected'] else 'does not fit'}")
        lines.append(f"- 7B `{p['method']}` on a T4 (fp16, paged 8-bit AdamW, "
                     f"seq {res.doc['config']['projection_seq']}, "
                     f"batch 1, checkpointing): accounting {p['accounting_bytes'] / gib:.2f} GiB -> "
                     f"{'fits' if p['fits_t4'] else 'does not fit'} in {T4_FIT_GIB:.2f} GiB ({budget.MARGIN:.0%} of "
                     f"the {T4_USABLE_GIB:g} GiB a T4 gives a process, the margin `plan` keeps){cons}.")
    lines += (res.doc.get("roofline") or {}).get("findings") or []
    lines.append("- The CPU ladder's gap to the accounting is neither a constant nor a constant factor "
                 "across rungs, so "
                 "the T4 projection takes no correction from it; the extrapolated CPU fits above are CPU figures.")
    return "\n".join(lines)


def _ladder_lines(res: ScalingResult) -> list[str]:
    """How the accounting and the fits did on the ladder below 7B, in the words of the device it ran on."""
    env = res.doc["env"]
    cuda = env["device"] == "cuda"
    where = f"this GPU ({env.get('gpu')})" if cuda else "this CPU"
    ok = [r for r in res.ladder if r["status"] == "ok" and r["rung"] != "llama-7b"]
    if not ok:
        return []
    worst = max(ok, key=lambda r: abs(r["resident_prediction_error"]))
    big = max(r["total_params"] for r in ok)
    misses = ", ".join(f"{100 * r['prediction_error']:+.0f} % ({r['method']})" for r in ok if r["total_params"] == big)
    lines = [f"- Ladder: the tensors held between steps (weights, quantization states, optimizer) match the accounting "
             f"within {100 * abs(worst['resident_prediction_error']):.2f} % on every rung. The whole step's peak "
             + (f"(`torch.cuda.max_memory_allocated`) at {big / 1e6:.0f} M params, accounting vs measurement: {misses}."
                if cuda else
                f"on CPU (resident + RSS growth during the step) at {big / 1e6:.0f} M params, accounting vs "
                f"measurement: {misses}: CPU kernels and the allocator add transient memory the accounting does not "
                "model (NF4 weights dequantized inside each matmul, fp32 logits copies, heap growth), a cost that "
                "grows more slowly than the model (see the fits' intercepts).")]
    setup = "bf16/fp16 weights, paged 8-bit AdamW" if cuda else "fp32 embeddings and AdamW states, so not a T4 number"
    for m, f in res.fits.items():
        lines.append(f"- `{m}` on {where}: memory grows {f['mem_bytes_per_param']:.2f} bytes/param "
                     f"(+{f['mem_intercept_bytes'] / 2**20:.0f} MiB), step time ~ N^{f['time_exponent']:.2f}; "
                     f"extrapolated to 7B: {f['projected_peak_mem_bytes'] / 2**30:.1f} GiB, "
                     f"{f['projected_step_time_s']:.3g} s/step at seq {res.doc['config']['seq']} ({setup}).")
    return lines


def measured_7b_lines(doc: dict[str, Any]) -> list[str]:
    """The 7B rungs that ran: measured vs predicted before they ran (accounting: memory; fit: time), the bars."""
    out = []
    for r in doc["rows"]:
        if r.get("rung") != "llama-7b":
            continue
        if r.get("status") != "ok":
            out.append(f"- 7B `{r['method']}`: {r.get('status')} — {r.get('note')}.")
            continue
        fit_t = r.get("fit_predicted_step_time_s")
        out.append(f"- 7B `{r['method']}`: peak {r['peak_mem_bytes'] / 2**30:.2f} GiB measured, "
                   f"{r['predicted_peak_mem_bytes'] / 2**30:.2f} GiB predicted by the accounting before it ran "
                   f"({100 * r['prediction_error']:+.1f} % off; goal within 15 %); {r['step_time_s']:.3f} s/step "
                   + (f"(the small rungs' fit said {fit_t:.3f}), " if fit_t else "")
                   + f"{r['tokens_per_s']:.0f} tokens/s"
                   + (f"; plain bnb + peft on an H100 (docs/assets.md, reference): {ref['peak_gib']:.2f} GiB, "
                      f"{ref['step_s']:.2f} s/step." if (ref := PLAIN_BNB_PEFT_H100.get(r["method"])) else "."))
    b = doc.get("benchmark") or {}
    if b.get("evaluated"):
        out.append(f"- Bars: QLoRA peak {b['qlora_peak_gib']:.2f} GiB (<= 5: {b['qlora_peak_ok']}); QLoRA / LoRA "
                   f"memory {b.get('qlora_over_lora_mem', float('nan')):.2f} (<= 1/3: {b.get('mem_ok')}), time "
                   f"{b.get('qlora_over_lora_time', float('nan')):.2f} (<= 2: {b.get('time_ok')}).")
    return out


def main(argv: list[str] | None = None) -> int:
    """`accelerate launch -m qlib.studies.llama_scaling --profile t4`: the 7B fine-tune alone, data-parallel over the
    launched processes; rank 0 writes `finetune_launch.json` beside the study's results and prints it."""
    ap = argparse.ArgumentParser(prog="python -m qlib.studies.llama_scaling")
    ap.add_argument("--profile", default="t4")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--model-id", default=None, help="hub id or local folder (default: the profile's)")
    ap.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="override one parameter, as `qlib run -p` (e.g. -p device cpu -p seq 64)")
    a = ap.parse_args(argv)
    params = parse_params(a.param)
    try:
        cfg = config(a.profile, **{"finetune_steps": a.steps, "model_id": a.model_id, **params})
        res = llama_finetune.finetune_7b(cfg, pick_device(cfg.device))
    except QlabError as e:  # one line per process, as `python -m qlib` says it
        print(f"qlab: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        dist.finish()
    if dist.is_main():
        out = atomic_write_text(results_dir(STUDY, cfg.profile) / "finetune_launch.json", json.dumps(res, indent=2))
        print(json.dumps(res, indent=2))
        print(f"[qlab] wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
