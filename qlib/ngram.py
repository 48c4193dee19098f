"""Count-based language models over token ids: the floor a neural perplexity is read against.

A unigram (add-one) and an interpolated Kneser-Ney bigram, fitted on the training tokens and scored on
exactly the tokens the neural rows score. Written here rather than taken from nltk.lm: nltk works on
word strings and scores one n-gram per Python call, minutes for a 49k-id vocabulary; this is a few numpy
lines that score the same windows as `metrics.token_nll`.
"""
from __future__ import annotations

import numpy as np


def scored_positions(n_tokens: int, context: int) -> np.ndarray:
    """Positions scored by non-overlapping windows of `context` (a window's first token has no history)."""
    pos = np.arange(1, n_tokens)
    return pos[pos % context != 0]


class Unigram:
    """Add-one unigram: P(w) = (c(w) + 1) / (N + V)."""

    def __init__(self, train_ids: np.ndarray, vocab_size: int):
        counts = np.bincount(np.asarray(train_ids, dtype=np.int64), minlength=vocab_size).astype(np.float64)
        self.logp = np.log((counts + 1.0) / (counts.sum() + vocab_size))

    def token_nll(self, ids: np.ndarray, context: int) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        return -self.logp[ids[scored_positions(ids.size, context)]]


class KneserNeyBigram:
    """Interpolated Kneser-Ney bigram (absolute discount D) with an add-one continuation unigram, so an
    unseen word or context still gets probability mass."""

    def __init__(self, train_ids: np.ndarray, vocab_size: int, discount: float = 0.75):
        ids = np.asarray(train_ids, dtype=np.int64)
        self.v, self.d = vocab_size, discount
        self.keys, self.pair_counts = np.unique(ids[:-1] * vocab_size + ids[1:], return_counts=True)
        prev, nxt = self.keys // vocab_size, self.keys % vocab_size
        self.context_counts = np.bincount(prev, weights=self.pair_counts, minlength=vocab_size)
        self.followers = np.bincount(prev, minlength=vocab_size).astype(np.float64)   # N1+(v .)
        preceders = np.bincount(nxt, minlength=vocab_size).astype(np.float64)        # N1+(. w)
        self.p_cont = (preceders + 1.0) / (preceders.sum() + vocab_size)

    def token_nll(self, ids: np.ndarray, context: int) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        pos = scored_positions(ids.size, context)
        prev, cur = ids[pos - 1], ids[pos]
        key = prev * self.v + cur
        at = np.clip(np.searchsorted(self.keys, key), 0, self.keys.size - 1)
        pair = np.where(self.keys[at] == key, self.pair_counts[at], 0).astype(np.float64)
        c_prev = self.context_counts[prev]
        seen = c_prev > 0
        safe = np.where(seen, c_prev, 1.0)
        p = np.where(seen, np.maximum(pair - self.d, 0.0) / safe
                     + self.d * self.followers[prev] / safe * self.p_cont[cur], self.p_cont[cur])
        return -np.log(p)
