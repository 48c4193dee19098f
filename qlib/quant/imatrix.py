"""llama.cpp's importance matrix, computed in PyTorch on calibration tokens.

For every linear layer, the sum over calibration tokens of each input column's squared activation, and the token
count: exactly what `llama-imatrix` accumulates per weight (`in_sum2`, `counts`) from the inputs of each matrix
multiplication. llama.cpp's quantizers weight a column's rounding error by its mean, so columns that carry large
activations are rounded more carefully. Computed here rather than with `llama-imatrix` so the statistic comes from
the model as the user holds it (any PyTorch model, any device) and can serve other calibration-aware methods;
`tests/test_imatrix.py` holds it against the file `llama-imatrix` writes.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm


@dataclass
class Stat:
    """One weight's statistic: sum of squared inputs per input column, and how many token rows went in."""

    in_sum2: np.ndarray
    count: int

    @property
    def mean(self) -> np.ndarray:
        """Mean squared activation per column: what llama.cpp's quantizer weights errors by."""
        return self.in_sum2 / max(self.count, 1)


def _linears(model: torch.nn.Module, skip: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """Every matrix multiplication with a weight: nn.Linear and GPT-2's Conv1D, the output head left out."""
    return {n: m for n, m in model.named_modules()
            if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and n.split(".")[-1] not in skip}


def collect(model: torch.nn.Module, windows: Iterable[torch.Tensor], device: str | torch.device = "cpu",
            skip: tuple[str, ...] = ("lm_head",), min_rows: int = 16, batch: int = 4) -> dict[str, Stat]:
    """Run `windows` (1-D token tensors) through the model and return `<module>.weight` -> Stat. Windows shorter
    than `min_rows` tokens are skipped, as llama-imatrix skips matrix products of fewer than 16 rows; windows of one
    length go `batch` at a time (each row's statistic is its own: batching only saves time)."""
    stats: dict[str, Stat] = {}

    def hook(name: str):
        def fn(_m: torch.nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
            s = stats.setdefault(f"{name}.weight", Stat(np.zeros(x.shape[-1]), 0))
            s.in_sum2 += (x * x).sum(0).double().cpu().numpy()
            s.count += x.shape[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in _linears(model, skip).items()]
    body = getattr(model, "base_model", model)  # the blocks without the LM head: its logits are not needed
    kept = [w.reshape(-1) for w in windows if w.numel() >= min_rows]
    groups = [kept[i:i + batch] for i in range(0, len(kept), batch)]
    try:
        with torch.no_grad():
            for group in tqdm(groups, desc="importance matrix", leave=False):
                if len({w.numel() for w in group}) == 1:
                    body(input_ids=torch.stack(group).to(device))
                else:
                    for w in group:
                        body(input_ids=w.reshape(1, -1).to(device))
    finally:
        for h in handles:
            h.remove()
    return stats
