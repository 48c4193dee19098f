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
    rest_mass: np.ndarray    # [n] float64: probability outside the top k (what the KL bound merges into one bucket)


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
    top-k view, to serve as the reference of other models on the same tokens. Torch on one thread (llama.cpp's
    worker threads run between windows: two pools spinning on 2 cores collapse)."""
    if keep_top and reference is not None:
        raise ValueError("a model is either the reference (keep_top) or scored against one, not both")
    nll, kl, same, dp, tops = [], [], [], [], []
    at = 0
    with metrics.torch_threads(1):
        for logits, targets in windows:
            d = _Dist(logits)
            t = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
            n = t.numel()
            tgt = d.logp(t[:, None])[:, 0]
            nll.append(-tgt)
            if keep_top:
                ids = d.top_k(keep_top)
                tops.append((ids, d.logp(ids), tgt, d.rest(ids)))
            if reference is not None:
                if at + n > reference.target_logp.size:
                    raise ValueError(f"the reference holds {reference.target_logp.size} tokens; the windows have more")
                k_ids = torch.from_numpy(reference.top_ids[at:at + n])
                kl.append(_bucket_kl(reference.top_logp[at:at + n], reference.rest_mass[at:at + n], d.logp(k_ids),
                                     d.rest(k_ids)))
                same.append(d.argmax[:, 0].numpy() == reference.top_ids[at:at + n, 0])
                dp.append(np.exp(tgt) - np.exp(reference.target_logp[at:at + n]))
                at += n
    if reference is not None and at != reference.target_logp.size:
        raise ValueError(f"scored {at} tokens but the reference holds {reference.target_logp.size}")
    cat = (lambda xs: np.concatenate(xs) if xs else None)  # noqa: E731
    ref = Reference(*(np.concatenate(x) for x in zip(*tops))) if tops else None
    return TokenScores(np.concatenate(nll), cat(kl), cat(same), cat(dp)), ref


class _Dist:
    """One window's next-token distributions from float32 logits: exp in float32 (the costly part, 12M values a
    window), sums in float64, so a gathered log-probability is exact to ~1e-7 and the bucket of the rest is summed
    over its own tokens (exactly 0 when the top k hold every token)."""

    def __init__(self, logits: torch.Tensor | np.ndarray):
        self.x = torch.as_tensor(np.asarray(logits, dtype=np.float32))
        self.m, self.argmax = self.x.max(-1, keepdim=True)  # first of tied maxima, as argmax
        self.e = torch.sub(self.x, self.m).exp_()
        self.total = _sum(self.e)[:, None]

    def logp(self, ids: torch.Tensor) -> np.ndarray:
        """Float64 log-probabilities of the tokens `ids` [n, j] of each row."""
        return (self.x.gather(1, ids).double() - self.m.double() - self.total.log()).numpy()

    def rest(self, ids: torch.Tensor) -> np.ndarray:
        """Probability of every token but `ids` [n, j], per row (the last use of this window: it zeroes them)."""
        return (_sum(self.e.scatter_(1, ids, 0.0)) / self.total[:, 0]).numpy()

    def top_k(self, k: int) -> torch.Tensor:
        """The k most likely token ids per row, most likely first (ties: lower id first, as argmax picks)."""
        ids = torch.topk(self.x, min(k, self.x.shape[-1]), -1, sorted=False).indices.numpy()
        vals = np.take_along_axis(self.x.numpy(), ids, 1)
        return torch.from_numpy(np.take_along_axis(ids, np.lexsort((ids, -vals), axis=-1), 1))


def _sum(e: torch.Tensor) -> torch.Tensor:
    """Row sums in float64 of float32 values (each converted exactly: the rest bucket and a near-zero KL, such as
    llama.cpp F16 against transformers, ~1e-6, stay exact to ~3e-8 a token; float32 blocks were 5x worse)."""
    return torch.sum(e, -1, dtype=torch.float64)


def _bucket_kl(ref_logp: np.ndarray, rest_p: np.ndarray, logq: np.ndarray, rest_q: np.ndarray) -> np.ndarray:
    """KL(P || Q) over the reference's top-k tokens plus one bucket for the rest of the vocabulary."""
    head = (np.exp(ref_logp) * (ref_logp - logq)).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(rest_p > 0, rest_p * (np.log(np.maximum(rest_p, 1e-300)) - np.log(np.maximum(rest_q, 1e-300))),
                        0.0)
    return np.clip(head + tail, 0.0, None)


def exact_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) over the whole vocabulary per row (what the top-k bucket bounds; for tests and spot checks)."""
    lp, lq = torch.log_softmax(ref_logits.double(), -1), torch.log_softmax(logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


KEYS = ("kl_mean", "kl_mean_lo", "kl_mean_hi", "top1_agreement", "top1_agreement_lo", "top1_agreement_hi", "rms_dp",
        "rms_dp_lo", "rms_dp_hi", "kl_median", "kl_p99", "kl_max")


def summary(s: TokenScores | None, block: int, seed: int = 0, groups: np.ndarray | None = None
            ) -> dict[str, float | None]:
    """Row keys: mean KL, top-1 agreement and RMS Δp each with a 95 % bootstrap interval over whole windows (`block`
    scored tokens each) or whole `groups` (modules, articles), KL's median, 99th percentile and max; all None
    without a reference."""
    if s is None or s.kl is None:
        return dict.fromkeys(KEYS)
    out: dict[str, float | None] = {}
    for key, values in (("kl_mean", s.kl), ("top1_agreement", s.same_top.astype(float)), ("dp_ms", s.dp ** 2)):
        m = metrics.mean_interval(values, block=block, seed=seed, groups=groups)
        if key == "dp_ms":  # the interval of the mean square, reported as a root mean square
            key, m = "rms_dp", {k: float(np.sqrt(v)) for k, v in m.items()}
        out.update({key: m["mean"], f"{key}_lo": m["lo"], f"{key}_hi": m["hi"]})
    out.update(kl_median=float(np.median(s.kl)), kl_p99=float(np.percentile(s.kl, 99)), kl_max=float(s.kl.max()))
    return out
