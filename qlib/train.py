"""Training loops: a small, readable fine-tune loop (seeded, device-agnostic, with a progress bar)."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from qlib.core.device import compute_dtype
from qlib.core.errors import QlabError
from qlib.runmeta import OPTIMIZERS


def seeds(seed: int, n: int) -> list[int]:
    """Training seeds of a comparison run `n` times: seed, seed+1, ... (the first is the main, saved run)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise QlabError(f"n_seeds must be an integer >= 1, got {n!r}")
    return [seed + i for i in range(n)]


def seed_column(method: str, seed: int) -> str:
    """Per-example column name of a replicate run."""
    return f"{method}@seed{seed}"


@dataclass
class TrainResult:
    """What a training run reports: per-step loss, wall time, steps."""

    losses: list[float] = field(default_factory=list)
    train_time_s: float = 0.0
    steps: int = 0
    step_times: list[float] = field(default_factory=list)  # per step, each ended by loss.item() (a CUDA sync)

    @property
    def final_loss(self) -> float:
        """Mean loss of the last 10 steps (one step's loss is too noisy to quote)."""
        return sum(self.losses[-10:]) / len(self.losses[-10:])

    @property
    def median_step_s(self) -> float:
        """Median step time without the first step (CUDA/kernel warm-up), or the mean when too few."""
        timed = self.step_times[1:] if len(self.step_times) > 2 else self.step_times
        return statistics.median(timed) if timed else self.train_time_s / max(1, self.steps)


def _autocast(device: torch.device, enabled: bool = True):
    """bf16/fp16 autocast on CUDA (fp16 on T4), plain fp32 on CPU."""
    dtype = compute_dtype(device)
    return torch.autocast(device.type, dtype=dtype, enabled=enabled and device.type == "cuda")




def make_optimizer(params: list[torch.nn.Parameter], name: str, lr: float, weight_decay: float
                   ) -> torch.optim.Optimizer:
    """AdamW by transformers' `optim` name: torch's (fused or not), or bitsandbytes' paged AdamW with 32- or 8-bit state
    (its state pages to host memory under GPU pressure; on a CPU bitsandbytes runs it unpaged and warns so, the 8-bit
    state still 8-bit)."""
    if name in ("adamw_torch", "adamw_torch_fused"):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=name == "adamw_torch_fused")
    if name not in OPTIMIZERS:
        raise QlabError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.PagedAdamW
    return cls(params, lr=lr, weight_decay=weight_decay)


def finetune(model: torch.nn.Module, loader: DataLoader, epochs: float, lr: float,
             device: torch.device, weight_decay: float = 0.01, warmup_ratio: float = 0.1,
             max_grad_norm: float = 1.0, desc: str = "fine-tune", autocast: bool = True,
             optimizer: str = "adamw_torch") -> TrainResult:
    """AdamW (`optimizer`: torch's, or bitsandbytes' paged 32-/8-bit) + linear warm-up/decay over `epochs`
    (fractions allowed); returns losses and time. `autocast=False` keeps a CUDA run in fp32 (torch.ao's
    fake-quant kernels expect fp32 inputs)."""
    import time

    from transformers import get_linear_schedule_with_warmup

    total = max(1, math.ceil(epochs * len(loader)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, optimizer, lr, weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(warmup_ratio * total), total)
    use_scaler = autocast and device.type == "cuda" and compute_dtype(device) == torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    model.to(device).train()
    res, t0 = TrainResult(), time.perf_counter()
    bar = tqdm(total=total, desc=desc)
    while res.steps < total:
        for batch in loader:
            t_step = time.perf_counter()
            batch = {k: v.to(device) for k, v in batch.items()}
            with _autocast(device, autocast):
                loss = model(**batch).loss
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
            res.losses.append(loss.item())
            res.step_times.append(time.perf_counter() - t_step)
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
