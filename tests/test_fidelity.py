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
    for k, tol in ((300, 1e-9), (128, None), (8, None)):
        _, reference = fidelity.score(_windows(ref, targets, 40), keep_top=k)
        scores, _ = fidelity.score(_windows(other, targets, 40), reference)
        assert np.all(scores.kl <= exact + 1e-9)
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
    assert np.allclose(same.kl, 0, atol=1e-12) and same.same_top.all() and np.allclose(same.dp, 0)
    diff, _ = fidelity.score(_windows(other, targets, 40), reference)
    assert diff.kl.mean() > 0.01 and not diff.same_top.all()
    # Δp is the change in probability of the true token; NLL is the model's own
    p_ref = torch.softmax(ref.double(), -1)[torch.arange(120), targets]
    p_oth = torch.softmax(other.double(), -1)[torch.arange(120), targets]
    np.testing.assert_allclose(diff.dp, (p_oth - p_ref).numpy(), atol=1e-12)
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
