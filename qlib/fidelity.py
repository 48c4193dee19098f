"""Fidelity to the full-precision model, token by token on the same windows: what perplexity hides.

A quantized model can keep its perplexity while changing which token it predicts (errors that cancel in the mean
NLL). llama.cpp's `perplexity --kl-divergence` reports, against the model it was quantized from, the KL divergence
of the next-token distributions (mean, median, percentiles), how often the top-1 token is the same ("same top p")
and the change in probability of the true token (Δp). This module computes the same quantities from logits of any
runtime (transformers or llama.cpp), so every LM table uses one scale.

The reference is kept compactly: its top-k log-probabilities per token (k = 128 by default), and the log-probability
of the true token. KL is then computed over those k tokens plus one bucket holding the rest of the vocabulary,
which is a lower bound on the full KL (merging outcomes never raises a divergence) and exact up to the reference's
mass outside its top k (`Reference.rest_mass` says how much that is). Top-1 agreement and Δp are exact.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from qlib import metrics

TOP_K = 128


@dataclass
class Reference:
    """The reference model's view of every scored token: its top-k token ids and log-probabilities (descending),
    and the log-probability it gave the true next token."""

    top_ids: np.ndarray      # [n, k] int64
    top_logp: np.ndarray     # [n, k] float64
    target_logp: np.ndarray  # [n] float64

    @property
    def rest_mass(self) -> np.ndarray:
        """Probability the reference puts outside its top k, per token (what the KL bound leaves out)."""
        return np.clip(1.0 - np.exp(self.top_logp).sum(1), 0.0, 1.0)


@dataclass
class TokenScores:
    """Per scored token: NLL, and against a reference KL(reference || model), top-1 agreement, Δp of the true
    token (None without a reference)."""

    nll: np.ndarray
    kl: np.ndarray | None = None
    same_top: np.ndarray | None = None
    dp: np.ndarray | None = None


def score(windows: Iterable[tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray]],
          reference: Reference | None = None, keep_top: int = 0) -> tuple[TokenScores, Reference | None]:
    """Score (logits [n, vocab], targets [n]) windows in order; with `keep_top` > 0 also return this model's own
    top-k view, to serve as the reference of other models on the same tokens. NumPy on one thread, not torch:
    llama.cpp's worker threads run between windows, and two thread pools spinning on 2 cores collapse."""
    nll, kl, same, dp, tops = [], [], [], [], []
    at = 0
    for logits, targets in windows:
        logp = _log_softmax(np.asarray(logits, dtype=np.float64))
        t = np.asarray(targets, dtype=np.int64)
        n = t.size
        tgt = logp[np.arange(n), t]
        nll.append(-tgt)
        if keep_top:
            tops.append((*_top_k(logp, keep_top), tgt))
        if reference is not None:
            if at + n > reference.target_logp.size:
                raise ValueError(f"the reference holds {reference.target_logp.size} tokens; these windows have more")
            k_ids = reference.top_ids[at:at + n]
            kl.append(_bucket_kl(reference.top_logp[at:at + n], np.take_along_axis(logp, k_ids, 1)))
            same.append(logp.argmax(-1) == k_ids[:, 0])
            dp.append(np.exp(tgt) - np.exp(reference.target_logp[at:at + n]))
            at += n
    if reference is not None and at != reference.target_logp.size:
        raise ValueError(f"scored {at} tokens but the reference holds {reference.target_logp.size}")
    cat = (lambda xs: np.concatenate(xs) if xs else None)  # noqa: E731
    ref = Reference(*(np.concatenate(x) for x in zip(*tops))) if tops else None
    return TokenScores(np.concatenate(nll), cat(kl), cat(same), cat(dp)), ref


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _top_k(logp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely token ids per row, most likely first (ties: lower id first, as argmax picks)."""
    k = min(k, logp.shape[-1])
    ids = np.argpartition(-logp, k - 1, axis=-1)[:, :k]
    vals = np.take_along_axis(logp, ids, 1)
    order = np.lexsort((ids, -vals), axis=-1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(vals, order, 1)


def _bucket_kl(ref_logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """KL(P || Q) over the reference's top-k tokens plus one bucket for the rest of the vocabulary."""
    p = np.exp(ref_logp)
    head = (p * (ref_logp - logq)).sum(1)
    rest_p = np.clip(1.0 - p.sum(1), 0.0, None)
    rest_q = np.clip(1.0 - np.exp(logq).sum(1), 1e-300, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(rest_p > 0, rest_p * (np.log(np.maximum(rest_p, 1e-300)) - np.log(rest_q)), 0.0)
    return np.clip(head + tail, 0.0, None)


def exact_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) over the whole vocabulary per row (what the top-k bucket bounds; for tests and spot checks)."""
    lp, lq = torch.log_softmax(ref_logits.double(), -1), torch.log_softmax(logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


KEYS = ("kl_mean", "kl_mean_lo", "kl_mean_hi", "top1_agreement", "top1_agreement_lo", "top1_agreement_hi", "rms_dp",
        "rms_dp_lo", "rms_dp_hi", "kl_median", "kl_p99", "kl_max")


def summary(s: TokenScores | None, block: int, seed: int = 0) -> dict[str, float | None]:
    """Row keys: mean KL, top-1 agreement and RMS Δp each with a 95 % block-bootstrap interval over whole windows
    (`block` scored tokens each), KL's median, 99th percentile and max; all None without a reference."""
    if s is None or s.kl is None:
        return dict.fromkeys(KEYS)
    out: dict[str, float | None] = {}
    for key, values in (("kl_mean", s.kl), ("top1_agreement", s.same_top.astype(float)), ("dp_ms", s.dp ** 2)):
        m = metrics.mean_interval(values, block=block, seed=seed)
        if key == "dp_ms":  # the interval of the mean square, reported as a root mean square
            key, m = "rms_dp", {k: float(np.sqrt(v)) for k, v in m.items()}
        out.update({key: m["mean"], f"{key}_lo": m["lo"], f"{key}_hi": m["hi"]})
    out.update(kl_median=float(np.median(s.kl)), kl_p99=float(np.percentile(s.kl, 99)), kl_max=float(s.kl.max()))
    return out
