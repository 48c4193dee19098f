"""Fidelity to the reference model (KL divergence, top-1 agreement, Δp): the compact top-k reference bounds the
exact KL from below and meets it when nothing is left out; identical models score zero; intervals hold estimates."""
import numpy as np
import pytest
import torch

from qlib import fidelity


def _windows(logits, targets, size):
    return [(logits[i:i + size], targets[i:i + size]) for i in range(0, len(targets), size)]


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(120, 300, generator=g) * 3  # peaked enough that a top-k holds most of the mass
    other = ref + torch.randn(120, 300, generator=g) * 0.5
    targets = torch.randint(0, 300, (120,), generator=g)
    return ref, other, targets


def test_top_k_kl_is_a_lower_bound_that_meets_the_exact_kl_when_nothing_is_left_out(pair):
    ref, other, targets = pair
    exact = fidelity.exact_kl(ref, other).numpy()
    for k, tol in ((300, 1e-7), (128, None), (8, None)):  # exp in float32, sums in float64: exact to ~1e-7
        _, reference = fidelity.score(_windows(ref, targets, 40), keep_top=k)
        scores, _ = fidelity.score(_windows(other, targets, 40), reference)
        assert np.all(scores.kl <= exact + 1e-7)
        if tol:
            np.testing.assert_allclose(scores.kl, exact, atol=tol)
    # the bound is tight where the reference's mass outside its top k is small
    _, r128 = fidelity.score(_windows(ref, targets, 40), keep_top=128)
    s128, _ = fidelity.score(_windows(other, targets, 40), r128)
    assert r128.rest_mass.mean() < 0.01 and s128.kl.mean() > 0.97 * exact.mean()


def test_identical_models_agree_everywhere_and_a_different_one_does_not(pair):
    ref, other, targets = pair
    _, reference = fidelity.score(_windows(ref, targets, 40), keep_top=16)
    same, _ = fidelity.score(_windows(ref, targets, 40), reference)
    assert np.allclose(same.kl, 0, atol=1e-9) and same.same_top.all() and np.allclose(same.dp, 0)
    diff, _ = fidelity.score(_windows(other, targets, 40), reference)
    assert diff.kl.mean() > 0.01 and not diff.same_top.all()
    # Δp is the change in probability of the true token; NLL is the model's own
    p_ref = torch.softmax(ref.double(), -1)[torch.arange(120), targets]
    p_oth = torch.softmax(other.double(), -1)[torch.arange(120), targets]
    np.testing.assert_allclose(diff.dp, (p_oth - p_ref).numpy(), atol=1e-8)
    np.testing.assert_allclose(diff.nll, -p_oth.log().numpy(), atol=1e-9)
    top1 = (other.argmax(-1) == ref.argmax(-1)).double().mean().item()
    assert diff.same_top.mean() == pytest.approx(top1)


def test_summary_intervals_hold_their_estimates_and_repeat_exactly(pair):
    ref, other, targets = pair
    _, reference = fidelity.score(_windows(ref, targets, 40), keep_top=32)
    s, _ = fidelity.score(_windows(other, targets, 40), reference)
    a, b = fidelity.summary(s, block=40, seed=0), fidelity.summary(s, block=40, seed=0)
    assert a == b
    for k in ("kl_mean", "top1_agreement", "rms_dp"):
        assert a[f"{k}_lo"] <= a[k] <= a[f"{k}_hi"], k
    assert a["kl_median"] <= a["kl_p99"] <= a["kl_max"]
    assert a["rms_dp"] == pytest.approx(float(np.sqrt((s.dp ** 2).mean())))


def test_a_reference_of_other_tokens_is_refused(pair):
    ref, other, targets = pair
    _, reference = fidelity.score(_windows(ref[:80], targets[:80], 40), keep_top=8)
    with pytest.raises(ValueError, match="reference holds 80 tokens"):
        fidelity.score(_windows(other, targets, 40), reference)


def test_a_near_zero_kl_on_a_real_vocabulary_is_exact_to_a_few_parts_in_a_hundred_million():
    """llama.cpp's F16 against transformers' FP16 is ~1e-6 a token: float32 exp with float64 sums must resolve it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 49152, generator=g) * 2.5
    x[:, :50] += 8
    y = x + torch.randn(64, 49152, generator=g) * 2e-3
    t = torch.randint(0, 49152, (64,), generator=g)
    _, ref = fidelity.score([(x, t)], keep_top=128)
    got, _ = fidelity.score([(y, t)], ref)
    lp, lq = torch.log_softmax(x.double(), -1), torch.log_softmax(y.double(), -1)
    ids = torch.from_numpy(ref.top_ids)
    p, q = lp.gather(1, ids).numpy(), lq.gather(1, ids).numpy()
    rp, rq = 1 - np.exp(p).sum(1), 1 - np.exp(q).sum(1)
    want = (np.exp(p) * (p - q)).sum(1) + rp * (np.log(rp) - np.log(rq))  # the same bucket bound, all in float64
    assert 1e-7 < want.mean() < 1e-5
    assert np.abs(got.kl - want).max() < 1e-7 and abs(got.kl.mean() - want.mean()) < 1e-9
    with pytest.raises(ValueError, match="either the reference"):
        fidelity.score([(x, t)], ref, keep_top=8)
