"""Mixed precision for a switchable model: per-layer sensitivity, then a greedy search under a quality budget."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from qlib.core.errors import QlabError
from qlib.quant.uniform import QuantLinear
from qlib.switchable import SwitchableQuantLoRAModel, bitmap_str


@torch.no_grad()
def _block_outputs(model: SwitchableQuantLoRAModel, batches: list[dict[str, torch.Tensor]],
                   layers: list[int]) -> dict[int, list[torch.Tensor]]:
    """Hidden states leaving each block in `layers`, for every calibration batch."""
    out: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    hooks = [model.blocks[i].register_forward_hook(
        lambda _m, _inp, o, i=i: out[i].append((o[0] if isinstance(o, tuple) else o).detach().clone()))
        for i in layers]
    try:
        for b in batches:
            model(**{k: v for k, v in b.items() if k != "labels"})
    finally:
        for h in hooks:
            h.remove()
    return out


def _only_rounded(model: SwitchableQuantLoRAModel, layer: int, bits: int) -> None:
    """Full-precision config, then block `layer`'s weights rounded to `bits` (its adapter stays the FP one)."""
    model.set_config(max(model.widths))
    for m in model.blocks[layer].modules():
        if isinstance(m, QuantLinear):
            m.set_bit_width(bits)


def _errors(got: list[torch.Tensor], ref: list[torch.Tensor]) -> dict[str, float]:
    diff = torch.cat([(g - r).flatten() for g, r in zip(got, ref)])
    return {"mse": float(diff.pow(2).mean()), "mae": float(diff.abs().mean())}


def sensitivity(model: SwitchableQuantLoRAModel, batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """For each block and width, the block's output error against full precision, with only that block
    changed (earlier blocks full precision, so each number is that block's own): `mse`/`mae` when only its
    weights are rounded (the quantization error), `mse_deployed`/`mae_deployed` when it also switches to
    that width's adapter, as `set_config` runs it."""
    fp = max(model.widths)
    quant = [w for w in model.widths if w < fp]
    layers = list(range(model.n_layers))
    model.eval().set_config(fp)
    ref = _block_outputs(model, batches, layers)
    result: dict[str, Any] = {}
    for i in tqdm(layers, desc="sensitivity"):
        result[str(i)] = {}
        for w in quant:
            _only_rounded(model, i, w)
            rounded = _errors(_block_outputs(model, batches, [i])[i], ref[i])
            model.set_config([w if j == i else fp for j in layers])
            deployed = _errors(_block_outputs(model, batches, [i])[i], ref[i])
            result[str(i)][str(w)] = {**rounded, "mse_deployed": deployed["mse"], "mae_deployed": deployed["mae"]}
    model.set_config(fp)
    return result


def layer_order(sens: dict[str, Any]) -> list[int]:
    """Least to most sensitive: by the MSE at the lowest width measured (ties by the next width)."""
    widths = sorted({int(w) for v in sens.values() for w in v})
    return sorted((int(i) for i in sens), key=lambda i: [sens[str(i)][str(w)]["mse"] for w in widths])


def average_bits(bitmap: list[int], layer_params: list[int]) -> float:
    """Parameter-weighted mean width of the quantized blocks."""
    return sum(b * n for b, n in zip(bitmap, layer_params)) / sum(layer_params)


def greedy_search(model: SwitchableQuantLoRAModel, sens: dict[str, Any],
                  evaluate: Callable[[list[int]], dict[str, float]], budget: float,
                  layer_params: list[int], metric: str = "f1") -> list[dict[str, Any]]:
    """Start at full precision; take blocks from least to most sensitive and give each the lowest width
    whose `metric` (0..1, higher is better) stays within `budget` (absolute) of full precision. Every trial
    is a row, its drop under `drop`."""
    fp = max(model.widths)
    current = [fp] * model.n_layers
    base = evaluate(current)
    if metric not in base:
        raise QlabError(f"the search metric {metric!r} is not among the scores {sorted(base)}")
    rows = [{"step": 0, "layer": None, "width": None, "bitmap": bitmap_str(current),
             "avg_bits": average_bits(current, layer_params), **base, "metric": metric, "drop": 0.0,
             "accepted": True}]
    for layer in layer_order(sens):
        for w in sorted(w for w in model.widths if w < fp):
            trial = [w if j == layer else b for j, b in enumerate(current)]
            got = evaluate(trial)
            ok = base[metric] - got[metric] <= budget
            rows.append({"step": len(rows), "layer": layer, "width": w, "bitmap": bitmap_str(trial),
                         "avg_bits": average_bits(trial, layer_params), **got, "metric": metric,
                         "drop": base[metric] - got[metric], "accepted": ok})
            if ok:
                current = trial
                break
    model.set_config(fp)
    return rows


def best_bitmap(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The last accepted step: the lowest average bits found within the budget."""
    return [r for r in rows if r["accepted"]][-1]
