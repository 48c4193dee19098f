"""Every notebook's predicted GPU memory and training time in a profile (`t4` by default), from the configs
alone: the hub models' true configs (nothing downloaded) and the datasets' published sizes. The README's
`t4` table and `python -m qlib plan` print these; the tests hold the t4 sizes to a T4 with a margin."""
from __future__ import annotations

from qlib import budget
from qlib.budget import Prediction
from qlib.studies import STUDIES, study


def profile_plans(profile: str = "t4") -> dict[str, list[Prediction]]:
    """Predictions per notebook stem for the profile's own sizes (hub models only): each study's
    `gpu_predictions`, part of the study contract."""
    return {stem: study(stem).gpu_predictions(profile) for stem in STUDIES}


def fits(p: Prediction, gib: float = budget.T4_GIB) -> bool:
    return p.peak_bytes <= budget.MARGIN * gib * budget.GIB


def table(plans: dict[str, list[Prediction]]) -> str:
    """Markdown: one line per training run, its predicted peak and time, and whether it fits a T4."""
    lines = ["| notebook | training run (as the t4 profile sizes it) | predicted peak (GiB) | predicted time (min) "
             f"| fits {budget.T4_GIB:g} GiB with {100 * (1 - budget.MARGIN):.0f} % margin |", "|---|---|---|---|---|"]
    for stem, preds in plans.items():
        if not preds:
            lines.append(f"| {stem} | nothing trains on the GPU | – | – | – |")
        for p in preds:
            lines.append(f"| {stem} | {p.what.split(' ', 1)[1]} | {p.peak_bytes / budget.GIB:.2f} | "
                         f"{p.time_s / 60:.1f} | {'yes' if fits(p) else '**no**'} |")
    return "\n".join(lines)
