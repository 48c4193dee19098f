"""Training loops: a small, readable fine-tune loop (seeded, device-agnostic, with a progress bar)."""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from qlib.config import compute_dtype


def set_seed(seed: int, threads: int | None = None) -> None:
    """Seed python, numpy and torch, and fix the thread count: same seed + machine -> same numbers."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads is None:
        threads = int(os.environ.get("QLAB_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)


@dataclass
class TrainResult:
    """What a training run reports: per-step loss, wall time, steps."""

    losses: list[float] = field(default_factory=list)
    train_time_s: float = 0.0
    steps: int = 0


def _autocast(device: torch.device):
    """bf16/fp16 autocast on CUDA (fp16 on T4), plain fp32 on CPU."""
    dtype = compute_dtype(device)
    return torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")


def finetune(model: torch.nn.Module, loader: DataLoader, epochs: float, lr: float,
             device: torch.device, weight_decay: float = 0.01, warmup_ratio: float = 0.1,
             max_grad_norm: float = 1.0, desc: str = "fine-tune") -> TrainResult:
    """AdamW + linear warm-up/decay over `epochs` (fractions allowed); returns losses and time."""
    import time

    from transformers import get_linear_schedule_with_warmup

    total = max(1, math.ceil(epochs * len(loader)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(warmup_ratio * total), total)
    use_scaler = device.type == "cuda" and compute_dtype(device) == torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    model.to(device).train()
    res, t0 = TrainResult(), time.perf_counter()
    bar = tqdm(total=total, desc=desc)
    while res.steps < total:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            with _autocast(device):
                loss = model(**batch).loss
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
            res.losses.append(loss.item())
            res.steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if res.steps >= total:
                break
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    res.train_time_s = time.perf_counter() - t0
    model.eval()
    return res


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DataLoader, device: torch.device,
            desc: str = "evaluate") -> tuple[list[int], list[int]]:
    """Argmax predictions and the labels, over a loader of labelled batches."""
    model.to(device).eval()
    preds, labels = [], []
    for batch in tqdm(loader, desc=desc, leave=False):
        y = batch.pop("labels")
        with _autocast(device):
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        preds += logits.argmax(-1).cpu().tolist()
        labels += y.tolist()
    return preds, labels
