"""Count baselines: proper distributions, and scored on exactly the tokens the neural rows score."""
import numpy as np
import pytest
import torch

from qlib import metrics, ngram


def _stream(n=5000, v=50, seed=0):
    return np.random.default_rng(seed).integers(0, v, size=n) ** 2 % v  # skewed: squares mod 50 miss residues


def test_kneser_ney_bigram_is_a_distribution_for_seen_and_unseen_contexts():
    v = 50
    lm = ngram.KneserNeyBigram(_stream(v=v), v)
    unseen = int(np.flatnonzero(lm.context_counts == 0)[0])  # squares mod 50 miss most residues
    for prev in (0, 1, unseen):
        ids = np.array([[prev, w] for w in range(v)]).reshape(-1)
        p = np.exp(-lm.token_nll(ids, context=2))  # windows of 2: each pair scored alone
        assert p.sum() == pytest.approx(1.0, abs=1e-9)


def test_unigram_is_add_one_and_bigram_beats_it_on_structured_text():
    v = 50
    # every other token repeats its predecessor: a bigram sees it, a unigram cannot
    train, held = np.repeat(_stream(v=v, seed=0), 2), np.repeat(_stream(n=2000, v=v, seed=1), 2)
    uni, bi = ngram.Unigram(train, v), ngram.KneserNeyBigram(train, v)
    assert np.exp(uni.logp).sum() == pytest.approx(1.0)
    assert bi.token_nll(held, 64).mean() < uni.token_nll(held, 64).mean() - 0.5


def test_scored_positions_match_the_neural_windows():
    class Uniform(torch.nn.Module):
        def forward(self, input_ids):
            return type("O", (), {"logits": torch.zeros(*input_ids.shape, 11)})()

    ids = torch.arange(300) % 11
    nll = metrics.token_nll(Uniform(), ids, context=64, stride=64)
    assert nll.numel() == ngram.scored_positions(300, 64).size == 300 - 5  # 5 windows, first token of each unscored
