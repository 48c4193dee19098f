"""Every notebook's predicted GPU memory and training time in a profile (`t4` by default), from the configs
alone: the hub models' true configs (nothing downloaded) and the datasets' published sizes. The README's
`t4` table and `python -m qlib plan` print these; the tests hold the t4 sizes to a T4 with a margin."""
from __future__ import annotations

from typing import Any

import torch

from qlib import assets, budget, hub
from qlib.budget import Prediction
from qlib.studies import baseline, gpt2_bitnet, llama_finetune, llama_scaling, qat, qlora_bert, qwen_merge, switchable

# Training rows of the hub datasets (their cards), for predictions made before anything is downloaded
TRAIN_ROWS = {"stanfordnlp/sst2": 67_349}
_T4 = torch.device("cpu")  # `budget.compute_for` predicts a T4 (fp16) for a device without CUDA


def _config(key: str) -> Any:
    a = assets.REGISTRY.get(key)
    return hub.model_config(a.hub_id if a and a.hub_id else key)


def _rows(dataset_id: str, n: int | None) -> int:
    a = assets.REGISTRY.get(dataset_id)
    return n or TRAIN_ROWS[a.hub_id if a and a.hub_id else dataset_id]


def profile_plans(profile: str = "t4") -> dict[str, list[Prediction]]:
    """Predictions per notebook stem for the profile's own sizes (hub models only)."""
    b = baseline.config(profile)
    n = _rows(b.dataset_id, b.n_train)
    q = qlora_bert.config(profile)
    g = gpt2_bitnet.config(profile)
    s = switchable.config(profile)
    sc = llama_scaling.config(profile)
    w = qwen_merge.config(profile)
    out = {
        "01_baseline": baseline.plan(b, _config(b.model_id), n, _T4),
        "02_ptq": [],  # INT8 kernels are CPU kernels: nothing trains on the GPU
        "03_qat": qat.plan(qat.config(profile), _config(b.model_id), n, b.max_length, _T4),
        "04_qlora_bert": qlora_bert.plan(q, b, _config(b.model_id), n, _T4),
        "05_gpt2_bitnet": gpt2_bitnet.plan(g, _config(g.model_id), _T4),
        "06_switchable_precision": switchable.plan(s, _config(s.model_id), s.max_len or 1024, _T4),
        "07_llama_scaling": llama_scaling.ladder_plan(sc)
        + (llama_finetune.plan(sc, _config(sc.model_id), _T4) if sc.finetune_7b else []),
        "08_qwen_merge_gguf": qwen_merge.plan(w, _config(w.model_id), _T4),
    }
    return out


def fits(p: Prediction, gib: float = budget.T4_GIB) -> bool:
    return p.peak_bytes <= budget.MARGIN * gib * budget.GIB


def table(plans: dict[str, list[Prediction]]) -> str:
    """Markdown: one line per training run, its predicted peak and time, and whether it fits a T4."""
    lines = ["| notebook | training run (as the t4 profile sizes it) | predicted peak (GiB) | predicted time (min) "
             f"| fits {budget.T4_GIB:g} GiB with {100 * (1 - budget.MARGIN):.0f} % margin |", "|---|---|---|---|---|"]
    for stem, preds in plans.items():
        if not preds:
            lines.append(f"| {stem} | nothing trains on the GPU (INT8 kernels are CPU kernels) | – | – | – |")
        for p in preds:
            lines.append(f"| {stem} | {p.what.split(' ', 1)[1]} | {p.peak_bytes / budget.GIB:.2f} | "
                         f"{p.time_s / 60:.1f} | {'yes' if fits(p) else '**no**'} |")
    return "\n".join(lines)
