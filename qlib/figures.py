"""Figures the notebooks share (loss curves, confusion matrices, intervals against a reference), saved atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from qlib.core.io import atomic_write_bytes


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return atomic_write_bytes(path, buf.getvalue())


def plot_loss(losses: list[float], ax: Any, window: int = 10, title: str = "training loss") -> Any:
    """Per-step loss and its rolling mean."""
    import pandas as pd
    import seaborn as sns

    df = pd.DataFrame({"step": range(1, len(losses) + 1), "loss": losses})
    df["rolling mean"] = df["loss"].rolling(min(window, len(df)), min_periods=1).mean()
    sns.lineplot(data=df, x="step", y="loss", ax=ax, alpha=0.35, label="per step")
    sns.lineplot(data=df, x="step", y="rolling mean", ax=ax, label=f"mean of {window}")
    ax.set(title=title, ylabel="cross-entropy")
    return ax


def plot_confusion(preds: list[int], labels: list[int], names: list[str], ax: Any,
                   title: str = "held-out confusion matrix") -> Any:
    """Counts of (true, predicted) label pairs as an annotated heat-map."""
    import numpy as np
    import seaborn as sns

    k = len(names)
    m = np.zeros((k, k), dtype=int)
    for p, y in zip(preds, labels):
        m[y, p] += 1
    sns.heatmap(m, annot=True, fmt="d", cmap="Blues", cbar=False, xticklabels=names,
                yticklabels=names, ax=ax)
    ax.set(title=title, xlabel="predicted", ylabel="true")
    return ax


def plot_losses(losses: dict[Any, list[float]], ax: Any, window: int = 10,
                title: str = "training loss") -> Any:
    """Several runs' losses as rolling means of `window` steps, one line each (empty runs left out)."""
    import pandas as pd

    for name, values in losses.items():
        if values:
            ax.plot(pd.Series(values).rolling(window, min_periods=1).mean(), label=str(name))
    ax.set(title=f"{title} (rolling mean of {window})", xlabel="step", ylabel="loss")
    ax.legend(fontsize=7)
    return ax


def plot_interval(rows: Any, key: str, ax: Any, labels: str = "method", scale: float = 100.0, offset: float = 0.0,
                  title: str = "", xlabel: str = "points", log: bool = False) -> Any:
    """Each row's paired comparison `key` with its 95 % interval (`key_lo`, `key_hi`), drawn as
    scale * (value - offset) against a line at no change (0, or 1 on a log axis); rows without it are left out.
    Accuracy differences: scale 100 (points); perplexity ratios: offset 1 (percent), or scale 1 on a log axis."""
    import pandas as pd

    q = pd.DataFrame(rows)
    q = q[q[key].notna()] if key in q else q.iloc[:0]
    ax.set(title=title, xlabel=xlabel, ylabel="")
    if not len(q):
        return ax
    mid, lo, hi = (scale * (q[k] - offset) for k in (key, f"{key}_lo", f"{key}_hi"))
    ax.errorbar(mid, range(len(q)), xerr=[mid - lo, hi - mid], fmt="o", capsize=3)
    ax.set_yticks(range(len(q)), q[labels])
    ax.axvline(1.0 if log else 0.0, color="grey", lw=1)
    if log:
        ax.set_xscale("log")
    return ax


def plot_scaling(ladder: Any, fits: dict[str, Any], projection: Any, methods: list[str], n_target: int,
                 references: dict[str, dict[str, float]], budget_gib: float, device: str, axes: Any) -> Any:
    """Study 07's two panels: peak memory and step time against parameters for each method (measured rungs, the
    accounting's prediction, the fit) with the projection at `n_target` parameters, the published measurements
    (`references`: method -> peak_gib, shown as references) and the memory budget line."""
    import numpy as np
    import seaborn as sns

    gib = 2**30
    xs = np.logspace(np.log10(ladder.total_params.min()), np.log10(n_target), 50)
    for m, color in zip(methods, sns.color_palette(n_colors=len(methods))):
        pts = ladder[ladder.method == m]
        axes[0].scatter(pts.total_params, pts.peak_mem_bytes / gib, color=color, label=f"{m}: measured ({device})")
        axes[0].plot(pts.total_params, pts.predicted_peak_mem_bytes / gib, ":", color=color,
                     label=f"{m}: accounting (this run's setup)")
        f = fits.get(m)
        if f:
            axes[0].plot(xs, (f["mem_intercept_bytes"] + f["mem_bytes_per_param"] * xs) / gib, "--", color=color,
                         alpha=.6)
            axes[1].scatter(pts.total_params, pts.step_time_s, color=color, label=f"{m}: measured")
            axes[1].plot(xs, f["time_coeff"] * xs ** f["time_exponent"], "--", color=color, alpha=.6,
                         label=f"{m}: fit")
        p = projection[projection.method == m].iloc[0]
        axes[0].scatter([n_target], [p.accounting_bytes / gib], marker="*", s=250, color=color, edgecolor="k",
                        label=f"{m}: 7B on T4, accounting")
    for m, v in references.items():
        axes[0].scatter([n_target], [v["peak_gib"]], marker="X", s=150, color="k")
        axes[0].annotate(f"{m}: H100 bf16, measured (reference)", (n_target, v["peak_gib"]), fontsize=7,
                         xytext=(-150, 5), textcoords="offset points")
    axes[0].axhline(budget_gib, color="r", lw=1, label=f"T4 usable ({budget_gib:g} GiB)")
    axes[0].set(xscale="log", yscale="log", xlabel="parameters", ylabel="peak memory (GiB)",
                title="memory: measured ladder, fit (dashed), 7B projection")
    axes[0].legend(fontsize=7)
    axes[1].set(xscale="log", yscale="log", xlabel="parameters", ylabel=f"s / step ({device})", title="step time")
    axes[1].legend(fontsize=7)
    return axes
