"""Per-GPU memory of one fine-tuning step on several GPUs, from the one-GPU accounting (`qlib.accounting`).

DDP keeps a whole replica on every GPU, plus the buckets its reducer all-reduces the gradients in (a second copy
of them). FSDP (FULL_SHARD) splits the weights, the adapters, their gradients and the optimizer states over the
GPUs and gathers a wrapped unit's weights only while it runs: each decoder layer is a unit and two are held at
once (the one running and the one prefetched), and the root unit (embeddings, final norm, LM head) stays gathered
through the step. Activations are per GPU: each holds its own micro-batch. With CPU offload the shards live in CPU
RAM and the GPU holds only what is gathered, the activations and the loss.

FSDP-QLoRA stores the NF4 codes in the compute dtype (`bnb_4bit_quant_storage`) so that FSDP can shard them (the
bytes are the same), and an FSDP unit holds one dtype, so the embeddings, norms and LM head stay in the compute
dtype instead of peft's fp32 upcast. accelerate's `estimate-memory` counts weights only and no library predicts a
sharded step's peak, hence this arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from qlib import accounting
from qlib.core.errors import QlabError

STRATEGIES = ("ddp", "fsdp", "fsdp_offload")
PREFETCH_UNITS = 2   # FSDP's BACKWARD_PRE prefetch: the running decoder layer and the next one are gathered
GIB = 2**30


@dataclass(frozen=True)
class Layout:
    """How a step is spread: `strategy` over `gpus`, each GPU with its own micro-batch."""

    strategy: str
    gpus: int

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise QlabError(f"unknown strategy {self.strategy!r}; valid: {', '.join(STRATEGIES)}")
        if self.gpus < 1:
            raise QlabError(f"gpus must be at least 1, not {self.gpus}")


def _root_params(model: torch.nn.Module) -> int:
    """Parameters of FSDP's root unit: embeddings, LM head and the final norm (what is not in a decoder layer)."""
    c = accounting.params_by_kind(model)
    return c["embedding"] + c["lm_head"] + accounting.arch(model.config).hidden


def per_gpu_bytes(config: Any, setup: accounting.TrainingSetup, layout: Layout, *, batch: int, seq: int,
                  checkpointing: bool = True, model: torch.nn.Module | None = None) -> dict[str, int]:
    """Predicted peak bytes on each GPU (`total`) by part, and the CPU RAM the shards take under offload
    (`cpu_offloaded`); `batch` is each GPU's micro-batch."""
    model = model if model is not None else accounting.meta_model(config)
    if layout.strategy != "ddp" and setup.method != "full":  # one dtype per FSDP unit: no fp32 upcast
        setup = replace(setup, rest_elem=setup.compute_elem)
    one = accounting.training_bytes(config, setup, batch, seq, checkpointing, model)
    per_step = {k: one[k] for k in ("autocast_copies", "activations", "loss_backward")}
    if layout.strategy == "ddp":
        parts = {k: one[k] for k in ("weights", "trainable_weights", "gradients", "optimizer")}
        parts["ddp_buckets"] = one["gradients"] if layout.gpus > 1 else 0
        return _total(parts | per_step, cpu=0)
    n, layers = layout.gpus, accounting.arch(model.config).layers
    shards = {k: -(-one[k] // n) for k in ("weights", "trainable_weights", "gradients", "optimizer")}
    root = _root_params(model) * setup.rest_elem
    unit = (one["weights"] - root + one["trainable_weights"]) // layers
    gathered = {"gathered_root": root, "gathered_layers": PREFETCH_UNITS * unit,
                "unsharded_layer_grads": one["gradients"] // layers} if n > 1 else {}
    if layout.strategy == "fsdp_offload":
        return _total(gathered | per_step, cpu=sum(shards.values()))
    return _total({f"{k}_shard": v for k, v in shards.items()} | gathered | per_step, cpu=0)


def _total(parts: dict[str, int], cpu: int) -> dict[str, int]:
    return parts | {"total": sum(parts.values()), "cpu_offloaded": cpu}


ANSWERAI_TARGETS = ("k_proj", "q_proj", "v_proj", "up_proj", "down_proj", "gate_proj")  # its "all"


@dataclass(frozen=True)
class Recipe:
    """A multi-GPU QLoRA step's settings. The defaults are answer.ai's FSDP-QLoRA `train.py` as its README runs
    LLaMA-2 70B on two 24 GB GPUs: pure bf16 (adapters, gradients and AdamW states in bf16), micro-batch 2 x 2048,
    LoRA rank 64 with dropout on six projections, gradient checkpointing."""

    method: str = "qlora"
    batch: int = 2
    seq: int = 2048
    rank: int = 64
    targets: tuple[str, ...] = ANSWERAI_TARGETS
    compute: torch.dtype = torch.bfloat16
    pure_low_precision: bool = True   # adapters and their AdamW states in the compute dtype (else fp32 adapters)
    checkpointing: bool = True

    def setup(self) -> accounting.TrainingSetup:
        base = accounting.recipe(self.method, self.compute, 8, self.rank, self.targets, lora_dropout=True,
                                 fp32_master=True)
        if not self.pure_low_precision:
            return base
        elem = self.compute_elem()
        return replace(base, trainable_elem=elem, optimizer_bytes=2 * elem)

    def compute_elem(self) -> int:
        return torch.finfo(self.compute).bits // 8

    def describe(self) -> str:
        adapters = "adapters, gradients and AdamW in " + ("bf16" if self.pure_low_precision else "fp32")
        return (f"{self.method} at micro-batch {self.batch} x {self.seq} per GPU, LoRA rank {self.rank} on "
                f"{len(self.targets)} projections, {str(self.compute).removeprefix('torch.')} compute, {adapters}, "
                f"{'gradient checkpointing' if self.checkpointing else 'no checkpointing'}")


# Published peaks of answer.ai's FSDP-QLoRA train.py (Llama-2, qlora, its defaults above; peak *reserved* memory,
# which includes the allocator's cache): benchmarks_03_2024.md in github.com/AnswerDotAI/fsdp_qlora. Reference
# only: measured by them on 2 x RTX 3090/4090, not by qlab.
ANSWERAI_REFERENCE = [
    {"model": "llama-2-7b", "gpus": 2, "strategy": "fsdp", "batch": 1, "seq": 512, "peak_gib": 4.98},
    {"model": "llama-2-7b", "gpus": 2, "strategy": "fsdp", "batch": 1, "seq": 2048, "peak_gib": 5.21},
    {"model": "llama-2-7b", "gpus": 2, "strategy": "fsdp", "batch": 4, "seq": 2048, "peak_gib": 11.22},
    {"model": "llama-2-7b", "gpus": 2, "strategy": "fsdp", "batch": 10, "seq": 2048, "peak_gib": 20.97},
    {"model": "llama-2-7b", "gpus": 2, "strategy": "ddp", "batch": 8, "seq": 2048, "peak_gib": 20.94},
    {"model": "llama-2-7b", "gpus": 2, "strategy": "fsdp_offload", "batch": 12, "seq": 2048, "peak_gib": 22.38},
    {"model": "llama-2-70b", "gpus": 2, "strategy": "fsdp_offload", "batch": 2, "seq": 2048, "peak_gib": 14.92},
]
ANSWERAI_SOURCE = "answer.ai fsdp_qlora, benchmarks_03_2024.md (peak reserved, 2 x RTX 3090/4090)"


PLAN_MODELS = {"llama-2-7b": "meta-llama/Llama-2-7b-hf", "llama-2-13b": "meta-llama/Llama-2-13b-hf",
               "llama-2-70b": "meta-llama/Llama-2-70b-hf"}


def predict(model_id: str, layout: Layout, recipe: Recipe, cache: dict[str, Any] | None = None) -> dict[str, int]:
    """`per_gpu_bytes` for a registry alias or hub id (its true config: nothing downloaded)."""
    from qlib import hub

    cache = {} if cache is None else cache
    if model_id not in cache:
        name = PLAN_MODELS.get(model_id, model_id)
        known = hub.HUB_MODEL_CONFIGS | hub.SIZING_CONFIGS
        if name not in known and not Path(name).is_dir():
            raise QlabError(f"no config for {model_id!r} (plans never reach the hub): use {', '.join(PLAN_MODELS)}, "
                            f"a hub id whose config qlib knows ({', '.join(known)}) or a local "
                            "model folder")
        config = hub.model_config(name)
        cache[model_id] = (config, accounting.meta_model(config))
    config, model = cache[model_id]
    return per_gpu_bytes(config, recipe.setup(), layout, batch=recipe.batch, seq=recipe.seq,
                         checkpointing=recipe.checkpointing, model=model)


def plan_rows(model_ids: list[str], gpu_counts: list[int], recipe: Recipe) -> list[dict[str, Any]]:
    """Per-GPU peak of every model x GPU count x strategy under `recipe`."""
    rows, cache = [], {}
    for mid in model_ids:
        for g in gpu_counts:
            row: dict[str, Any] = {"model": mid, "gpus": g}
            for s in STRATEGIES:
                b = predict(mid, Layout(s, g), recipe, cache)
                row[f"{s}_gib"] = b["total"] / GIB
                if s == "fsdp_offload":
                    row["cpu_offloaded_gib"] = b["cpu_offloaded"] / GIB
            rows.append(row)
    return rows


def reference_rows(recipe: Recipe) -> list[dict[str, Any]]:
    """Each published answer.ai peak beside this accounting's prediction at the same model, GPUs and batch."""
    cache: dict[str, Any] = {}
    out = []
    for ref in ANSWERAI_REFERENCE:
        r = replace(recipe, batch=ref["batch"], seq=ref["seq"])
        pred = predict(ref["model"], Layout(ref["strategy"], ref["gpus"]), r, cache)["total"] / GIB
        out.append({**ref, "predicted_gib": pred, "predicted_over_reference": pred / ref["peak_gib"]})
    return out


def table(rows: list[dict[str, Any]], recipe: Recipe) -> str:
    """Markdown: the per-GPU peak of each strategy, one line per model and GPU count."""
    lines = [f"Per-GPU peak (GiB), predicted: {recipe.describe()}.", "",
             "| model | GPUs | DDP | FSDP | FSDP + CPU offload | CPU RAM for the offloaded shards (GiB) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['gpus']} | {r['ddp_gib']:.1f} | {r['fsdp_gib']:.1f} | "
              f"{r['fsdp_offload_gib']:.1f} | {r['cpu_offloaded_gib'] * r['gpus']:.1f} |" for r in rows]
    return "\n".join(lines)


def reference_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: predicted against published, one line per published point."""
    lines = [f"Against published peaks ({ANSWERAI_SOURCE}; reference, not measured here):", "",
             "| model | GPUs | strategy | micro-batch x seq | predicted (GiB) | published (GiB) "
             "| predicted / published |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['gpus']} | {r['strategy']} | {r['batch']} x {r['seq']} | "
              f"{r['predicted_gib']:.2f} | {r['peak_gib']:.2f} | {r['predicted_over_reference']:.2f} |" for r in rows]
    return "\n".join(lines)


def tables(models: tuple[str, ...] = tuple(PLAN_MODELS), gpus: tuple[int, ...] = (1, 2, 4), **recipe: Any) -> str:
    """`plan --gpus`'s two tables: the per-GPU peaks under `recipe` overrides, and the published points beside
    their predictions."""
    r = replace(Recipe(), **recipe)
    return table(plan_rows(list(models), list(gpus), r), r) + "\n\n" + reference_table(reference_rows(Recipe()))
