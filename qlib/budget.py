"""What a training run will need on a GPU, said before it starts: predicted peak memory and time.

Memory comes from `qlib.accounting` (exact parameter counts on the meta device, bytes per format, the tensors
autograd saves): the same accounting study 07 checks against measurements. Time is a rough prediction:
training FLOPs (6 x matmul parameters x tokens for a full fine-tune, 4x for LoRA, +2x with gradient
checkpointing) over an assumed sustained rate of a T4, which no session here has measured; it is printed as
an assumption, never as a result. On CUDA a run stops with one line when the prediction exceeds
`MARGIN` of the memory the device gives this process.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from qlib import accounting, assets, hub
from qlib.core.device import compute_dtype, memory_fraction
from qlib.core.errors import QlabError

GIB = 2**30
T4_GIB = 15.0          # what a 16 GB T4 gives one process (CUDA context and allocator reserve the rest)
MARGIN = 0.85          # a prediction must stay under this share of the device: the accounting's known error
SESSION_S = 1.5 * 3600 # a Colab session a notebook must fit in
# Assumed sustained training throughput of a T4 in transformers (peak: 65 TFLOPS fp16 tensor cores, 8.1 fp32)
T4_TFLOPS = {"float16": 12.0, "bfloat16": 12.0, "float32": 4.0}
QLORA_SLOWDOWN = 1.7   # NF4 dequantization in every matmul: QLoRA 0.78 vs LoRA 0.45 s/step (7B, H100, docs/assets.md)
T4 = torch.device("cpu")  # `compute_for` predicts a T4 (fp16) for a device without CUDA
# Training rows of the hub datasets (their cards), for predictions made before anything is downloaded
TRAIN_ROWS = {"stanfordnlp/sst2": 67_349}


def hub_config(key: str) -> Any:
    """A model's true config (config.json only, from the registry's hub id or the id itself): predictions need no
    weights."""
    a = assets.REGISTRY.get(key)
    return hub.model_config(a.hub_id if a and a.hub_id else key)


def train_rows(dataset_id: str, n: int | None) -> int:
    """Training examples a run will see: its cap, else the hub dataset's published size."""
    a = assets.REGISTRY.get(dataset_id)
    return n or TRAIN_ROWS[a.hub_id if a and a.hub_id else dataset_id]


@dataclass(frozen=True)
class Prediction:
    """One training run's predicted peak memory (with its parts) and time on a T4."""

    what: str
    method: str
    peak_bytes: int
    parts: dict[str, int]
    steps: int
    tokens_per_step: int
    time_s: float
    compute: str

    def line(self) -> str:
        parts = ", ".join(f"{k.replace('_', ' ')} {v / GIB:.2f}" for k, v in self.parts.items()
                          if k != "trainable_params" and v)
        return (f"{self.what}: predicted peak {self.peak_bytes / GIB:.2f} GiB ({parts}); {self.steps} steps of "
                f"{self.tokens_per_step} tokens, about {self.time_s / 60:.0f} min on a T4 ({self.compute}, "
                f"assumed {T4_TFLOPS[self.compute]:g} TFLOPS sustained"
                f"{f', x{QLORA_SLOWDOWN:g} for NF4' if self.method == 'qlora' else ''})")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def training_flops(model: torch.nn.Module, method: str, tokens: int, seq: int, checkpointing: bool) -> float:
    """Matmul FLOPs of `tokens` training tokens: forward 2N, backward 4N (full) or 2N (frozen base), plus the
    attention scores (4 s h per layer and token, forward), plus a second forward with checkpointing."""
    counts = accounting.params_by_kind(model)
    a = accounting.arch(model.config)
    n = counts["block_linears"] + (a.hidden * a.vocab if a.causal else 0)
    fwd = 2 * n + 4 * seq * a.hidden * a.layers
    per_token = fwd * (3 if method == "full" else 2) + (fwd if checkpointing else 0)
    return per_token * tokens


def predict(what: str, config: Any, method: str, *, batch: int, seq: int, steps: int, compute: torch.dtype,
            optimizer_bytes: float = 8, checkpointing: bool = False, rank: int = 16,
            targets: tuple[str, ...] = accounting.LORA_TARGETS, lora_dropout: bool = False,
            extra: dict[str, int] | None = None) -> Prediction:
    """Peak memory of one step of `method` on `config` (accounting) and the run's time on a T4 (FLOPs).
    Full fine-tunes keep fp32 master weights (qlib's loop and Trainer both do); AdamW keeps 8 bytes of state
    per trainable parameter unless `optimizer_bytes` says otherwise (paged 8-bit AdamW: 2)."""
    model = accounting.meta_model(config)
    setup = accounting.recipe(method, compute, optimizer_bytes, rank, targets, lora_dropout, fp32_master=True)
    parts = accounting.training_bytes(config, setup, batch, seq, checkpointing, model)
    parts = {k: v for k, v in parts.items() if k != "total"} | dict(extra or {})
    peak = sum(v for k, v in parts.items() if k != "trainable_params")
    name = str(compute).removeprefix("torch.")
    time_s = training_flops(model, method, steps * batch * seq, seq, checkpointing) / (T4_TFLOPS[name] * 1e12)
    if method == "qlora":
        time_s *= QLORA_SLOWDOWN
    return Prediction(what, method, int(peak), parts, steps, batch * seq, time_s, name)


def device_bytes(device: torch.device) -> int | None:
    """What this process may allocate on the device: the GPU's memory, under any per-process cap (a T4
    stand-in capped by `t4_conditions`); None on a CPU."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).total_memory * memory_fraction())


def announce(preds: list[Prediction], device: torch.device) -> list[dict[str, Any]]:
    """Print each prediction before training; on CUDA stop with one line if one exceeds the device."""
    avail = device_bytes(device)
    for p in preds:
        print(f"[qlab] {p.line()}", flush=True)
    if avail is None:
        print("[qlab] (no GPU here: the predictions are for a T4; nothing is checked against this CPU)", flush=True)
        return [p.as_dict() for p in preds]
    worst = max(preds, key=lambda p: p.peak_bytes)
    if worst.peak_bytes > MARGIN * avail:
        raise QlabError(f"predicted out of memory: {worst.what} needs about {worst.peak_bytes / GIB:.1f} GiB and "
                        f"this GPU gives {avail / GIB:.1f} GiB (kept under {MARGIN:.0%} of it); lower batch_size or "
                        "the sequence length, or turn on gradient checkpointing")
    print(f"[qlab] fits: largest {worst.peak_bytes / GIB:.2f} GiB of {avail / GIB:.1f} GiB on this GPU", flush=True)
    return [p.as_dict() for p in preds]


def wanted(profile: str, device: torch.device) -> bool:
    """Predictions are printed on a GPU and in the t4 profile (the run a T4 user starts)."""
    return device.type == "cuda" or profile == "t4"


def compute_for(device: torch.device) -> torch.dtype:
    """The compute dtype to predict with: the GPU's own, or a T4's (fp16) when this run is on a CPU."""
    return compute_dtype(device) if device.type == "cuda" else torch.float16
