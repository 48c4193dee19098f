"""Per-token NLL of fixed windows, recomputed only from the first decoder layer that changed.

06's block search scores the same dev windows some sixty times, each time with one block's weights changed
from a bitmap already scored. The layers before that block see the same inputs and weights, so their outputs
are recorded once and replayed: a decoder layer is swapped for a module that returns its recorded output. On a
LLaMA-architecture model (the decoder layers at `model.model.layers`) that skips on average half of the layers;
the head over the vocabulary is always computed. Nothing here knows which weights changed: the caller says
where to start, and the result equals a full forward bit for bit (the layers from `start` on run on the same
inputs, in the same batches). No library caches activations across weight edits, hence this file.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


class _Replay(torch.nn.Module):
    """Stands in for a decoder layer whose output is known: returns it, computes nothing."""

    def __init__(self, out: Any):
        super().__init__()
        self.out = out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.out


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The decoder's layer list of a LLaMA-style causal LM (None for another layout: no replay)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


class PrefixNLL:
    """NLL of `ids` in windows of `context`, `batch` windows per forward, with every layer's output kept."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, context: int, batch: int = 4):
        n = ids.numel() // context
        if n == 0:
            raise ValueError(f"{ids.numel()} tokens make no window of {context}")
        self.model, self.layers = model, decoder_layers(model)
        self.batches = list(ids[: n * context].view(n, context).split(batch))
        self.outputs: list[list[Any]] | None = None  # [batch][layer], from the last pass recorded

    def nll(self, start: int = 0, record: bool = False) -> np.ndarray:
        """Per-token NLL (window order, each window's first token unscored) with layers before `start` replayed
        from the recorded pass; `record` keeps this pass's outputs as the new record."""
        if self.layers is None or self.outputs is None:
            start = 0
        new = [] if record else None
        out = [self._batch(i, start, new) for i in range(len(self.batches))]
        if new is not None:
            self.outputs = new
        return np.concatenate(out)

    @torch.no_grad()
    def _batch(self, i: int, start: int, new: list[list[Any]] | None) -> np.ndarray:
        layers, ids = self.layers, self.batches[i]
        kept = list(self.outputs[i]) if self.outputs is not None else [None] * len(layers or [])
        hooks, swapped = [], {}
        try:
            for j in range(start):  # each returns layer start-1's output: only the last one's is read
                swapped[j], layers[j] = layers[j], _Replay(self.outputs[i][start - 1])
            if new is not None and layers is not None:
                hooks = [layers[j].register_forward_hook(_keep(kept, j)) for j in range(start, len(layers))]
            logits = self.model(input_ids=ids.to(next(self.model.parameters()).device)).logits[:, :-1].float()
        finally:
            for h in hooks:
                h.remove()
            for j, layer in swapped.items():
                layers[j] = layer
        if new is not None:
            new.append(kept)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:].to(logits.device),
                                                reduction="none")
        return nll.double().cpu().numpy().reshape(-1)


def _keep(store: list[Any], j: int) -> Any:
    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        store[j] = output
    return hook
