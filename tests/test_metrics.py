import math
import time

import pytest
import torch

from qlib import metrics, results


def test_accuracy_and_macro_f1_by_hand():
    # class 1: tp=2 fp=1 fn=1 -> F1 2/3; class 0: tp=1 fp=1 fn=1 -> F1 1/2
    m = metrics.accuracy_f1([1, 1, 0, 1, 0], [1, 0, 0, 1, 1])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    with pytest.raises(ValueError):
        metrics.accuracy_f1([1], [1, 0])


def _tiny_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=64, n_embd=16, n_layer=1,
                                      n_head=2)).eval()


def test_perplexity_full_context_equals_exp_mean_loss():
    model, ids = _tiny_lm(), torch.randint(0, 50, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss.item()
    out = metrics.perplexity(model, ids, context=64, stride=64)
    assert out["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert out["tokens"] == 39 and out["context"] == 64


def test_perplexity_sliding_window_scores_each_token_once():
    model, ids = _tiny_lm(), torch.randint(0, 50, (50,), generator=torch.Generator().manual_seed(2))
    strided = metrics.perplexity(model, ids, context=16, stride=8)
    assert strided["tokens"] == 49
    assert strided["perplexity"] != pytest.approx(metrics.perplexity(model, ids, 64, 64)["perplexity"],
                                                  rel=1e-9)


def test_window_logits_batched_score_the_same_windows_as_one_by_one():
    model = _tiny_lm()
    for n in (39, 41, 48, 49):  # a last window of 7, 9, 0 and 1 tokens (1: nothing left to score)
        ids = torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(n))
        one = list(metrics.window_logits(model, ids, 8, batch=1))
        four = list(metrics.window_logits(model, ids, 8, batch=4))
        assert [t.tolist() for _, t in four] == [t.tolist() for _, t in one]
        assert sum(t.numel() for _, t in four) == n - -(-n // 8)  # every window but its first token
        for (a, _), (b, _) in zip(one, four):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_latency_runs_warmup_plus_repeats():
    calls = []
    out = metrics.measure_latency(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and out["repeats"] == 5 and out["median_ms"] >= 0


def test_count_params_tied_and_frozen():
    model = _tiny_lm()
    n = metrics.param_counts(model)
    # wte 50*16 + wpe 64*16 + block + ln_f; lm_head is tied to wte and counted once
    block = 2 * 16 * 2 + (16 * 48 + 48) + (16 * 16 + 16) + (16 * 64 + 64) + (64 * 16 + 16)
    assert n["total_params"] == 50 * 16 + 64 * 16 + block + 2 * 16
    model.transformer.wte.weight.requires_grad_(False)
    assert metrics.param_counts(model)["trainable_params"] == n["total_params"] - 800


def test_peak_memory_sees_a_large_cpu_allocation():
    with metrics.PeakMemory("cpu") as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        x += 1
        time.sleep(0.05)
        del x
    assert mem.source == "cpu_rss_delta"
    assert mem.peak_bytes > 48 * 2**20


def test_size_and_bits_per_param(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"x" * 28)
    assert metrics.size_on_disk(tmp_path) == 128
    assert metrics.bits_per_param(128, 256) == 4.0


def test_runtime_env_names_cpu_and_versions():
    env = metrics.runtime_env("cpu")
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    assert isinstance(env["isa"], list) and env["threads"] >= 1 and env["cpu"]


def test_compare_latency_interleaves_and_ranks():
    order = []
    fast, slow = (lambda: order.append("f")), (lambda: (order.append("s"), time.sleep(0.004)))
    out = metrics.compare_latency({"fast": fast, "slow": slow}, warmup=1, repeats=4)
    assert order[2:] == ["f", "s"] * 4  # after the warm-ups, round-robin
    assert out["slow"]["median_ms"] > out["fast"]["median_ms"] and out["fast"]["repeats"] == 4
    assert len(out["slow"]["times_ms"]) == 4 and min(out["slow"]["times_ms"]) > 3


def test_speed_ratio_resamples_rounds_and_knows_noise():
    ref = [10.0, 11.0, 10.5, 30.0, 10.2, 10.8, 10.1]        # a slow round (load) hits both variants alike
    fast = [5.0, 5.6, 5.2, 15.5, 5.1, 5.3, 5.0]
    d = metrics.speed_ratio(ref, fast)
    assert d["ratio"] == pytest.approx(10.5 / 5.2) and d["lo"] < d["ratio"] < d["hi"] and d["real"]
    assert d["repeats"] == 7 and metrics.speed_ratio(ref, fast) == d  # seeded
    same = metrics.speed_ratio(ref, [x * 1.01 for x in ref[::-1]])
    assert same["lo"] < 1 < same["hi"] and not same["real"]
    assert metrics.speed_ratio([2.0], [1.0]) == {"ratio": 2.0, "lo": None, "hi": None, "real": None, "repeats": 1}
    with pytest.raises(ValueError, match="equal"):
        metrics.speed_ratio([1.0, 2.0], [1.0])


def test_paired_bootstrap_finds_a_real_shift_and_not_noise():
    import numpy as np

    rng = np.random.default_rng(1)
    a = rng.normal(size=2000)
    shifted = metrics.paired_bootstrap(a, a + 0.1 + rng.normal(scale=0.5, size=2000))
    assert shifted["lo"] < 0.1 < shifted["hi"] and shifted["excludes_zero"] and shifted["n"] == 2000
    noise = metrics.paired_bootstrap(a, a + rng.normal(scale=0.5, size=2000))
    assert noise["lo"] < 0 < noise["hi"] and not noise["excludes_zero"]
    assert metrics.paired_bootstrap(a, a + 1.0)["diff"] == pytest.approx(1.0)
    # correlated tokens: blocks widen the interval (resampling single tokens would overstate the certainty)
    drift = np.repeat(rng.normal(scale=0.3, size=40), 50)
    one = metrics.paired_bootstrap(a, a + drift, block=1)
    fifty = metrics.paired_bootstrap(a, a + drift, block=50)
    assert fifty["hi"] - fifty["lo"] > 3 * (one["hi"] - one["lo"])
    with pytest.raises(ValueError, match="equal, non-empty"):
        metrics.paired_bootstrap([], [])


def test_token_nll_is_what_perplexity_averages():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=97)).eval()
    ids = torch.randint(0, 97, (300,))
    nll = metrics.token_nll(model, ids, 64, 32)
    assert nll.numel() == 299  # every token but the first, each once
    ppl = metrics.perplexity(model, ids, 64, 32)
    assert ppl["perplexity"] == pytest.approx(math.exp(nll.double().mean().item()))
    with torch.no_grad():  # the first window's tokens, scored directly
        direct = torch.nn.functional.cross_entropy(model(input_ids=ids[:64].unsqueeze(0)).logits[0, :-1], ids[1:64],
                                                   reduction="none")
    assert torch.allclose(nll[:63], direct, atol=1e-5)


def test_perplexity_ratio_is_exp_of_the_paired_nll_difference():
    import numpy as np

    rng = np.random.default_rng(0)
    ref = rng.gamma(2.0, 1.5, size=4000)
    same = metrics.perplexity_ratio(ref, ref + rng.normal(0, 0.01, ref.size), block=100)
    worse = metrics.perplexity_ratio(ref, ref + 0.05 + rng.normal(0, 0.3, ref.size), block=100)
    assert not same["real"] and same["lo"] < 1 < same["hi"]
    assert worse["real"] and worse["lo"] > 1
    assert worse["ratio"] == pytest.approx(np.exp(0.05), rel=0.02)


def test_accuracy_difference_pairs_sentences_and_majority_is_the_modal_train_label():
    labels = [0, 1] * 200
    ref = labels[:]  # perfect
    worse = [1 - y if i % 10 == 0 else y for i, y in enumerate(labels)]  # 10 % wrong
    d = metrics.accuracy_difference(ref, worse, labels)
    assert d["diff"] == pytest.approx(-0.1) and d["real"] and d["hi"] < 0
    same = metrics.accuracy_difference(ref, ref, labels)
    assert same["diff"] == same["lo"] == same["hi"] == 0 and not same["real"]
    assert metrics.majority_preds([1, 1, 0], 4) == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="every label"):
        metrics.accuracy_difference(ref[:-1], worse, labels)
    row = metrics.with_difference({}, "acc_diff", d)
    assert row["acc_diff_real"] is True and row["acc_diff_lo"] == d["lo"]
    assert metrics.with_difference({}, "x", None) == {"x": None, "x_lo": None, "x_hi": None, "x_real": None}


def test_bootstrap_ratio_of_means():
    import numpy as np

    rng = np.random.default_rng(0)
    den = rng.normal(1.0, 0.2, 1000)
    r = metrics.bootstrap_ratio(0.5 * den + rng.normal(0, 0.05, 1000), den, block=10)
    assert r["lo"] < 0.5 < r["hi"] and r["ratio"] == pytest.approx(0.5, abs=0.02)


def test_seed_spread_is_mean_and_sample_sd():
    s = metrics.seed_spread([0.80, 0.82, 0.84])
    assert s["mean"] == pytest.approx(0.82) and s["sd"] == pytest.approx(0.02) and s["n"] == 3
    assert metrics.seed_spread([0.8])["sd"] is None
    with pytest.raises(ValueError):
        metrics.seed_spread([])
    row = metrics.with_seeds({}, "accuracy", [0.80, 0.82, 0.84])
    assert row["accuracy_seed_values"] == [0.80, 0.82, 0.84] and row["n_seeds"] == 3
    assert results.seed_spread_text(row, "accuracy") == "0.820 ± 0.020 over 3 seeds"
    d = metrics.with_seeds({}, "accuracy_diff_vs_fp32", [-0.01, 0.01, 0.03])
    assert results.seed_spread_text(d, "accuracy_diff_vs_fp32", 100, "+.1f", " pt") == "+1.0 ± 2.0 pt over 3 seeds"
    assert results.seed_spread_text({}, "accuracy") == "one seed"


def test_training_seeds_follow_the_first_and_refuse_nonsense():
    from qlib.core.errors import QlabError
    from qlib.train import seeds

    assert seeds(5, 3) == [5, 6, 7]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(QlabError, match="n_seeds"):
            seeds(0, bad)


def test_group_bootstrap_resamples_whole_modules():
    """Blocks are groups of consecutive examples (same draws, same numbers); four modules that disagree (+1, +1, -1,
    -1 on 100 tokens each) give an interval over modules far wider than one over tokens, where the tokens of a module
    would be counted as independent."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=300)
    by_block = metrics.mean_interval(x, block=16, seed=3)
    by_group = metrics.mean_interval(x, groups=np.arange(300) // 16, seed=3)
    assert by_block == by_group
    d = np.repeat([1.0, 1.0, -1.0, -1.0], 100) + rng.normal(scale=0.1, size=400)
    modules = np.repeat(["a", "b", "c", "d"], 100)
    tokens = metrics.paired_bootstrap(np.zeros(400), d)
    whole = metrics.paired_bootstrap(np.zeros(400), d, groups=modules[rng.permutation(400)].tolist())
    grouped = metrics.paired_bootstrap(np.zeros(400), d, groups=modules)
    assert tokens["hi"] - tokens["lo"] < 0.25 and grouped["hi"] - grouped["lo"] > 1.0
    assert whole["hi"] - whole["lo"] < 0.5  # shuffled labels: no module structure left to honour
    with pytest.raises(ValueError, match="one group per example"):
        metrics.mean_interval(x, groups=[0] * 10)


def test_groups_of_the_shared_set_resample_within_their_domain():
    """The shared set holds 3 parts code to 1 of prose by construction: "code:<module>" and "prose:<article>" units
    are resampled within their domain, so a resample keeps that share. Code tokens at 0 and prose tokens at 1 (no
    spread inside a domain) leave the stratified interval at exactly 1/4, where pooled resampling moves the share."""
    import numpy as np

    labels = [f"code:m{i}" for i in range(12) for _ in range(10)] + [f"prose:a{i}" for i in range(4) for _ in range(10)]
    d = np.array([0.0] * 120 + [1.0] * 40)
    strat = metrics.paired_bootstrap(np.zeros(160), d, groups=labels)
    assert strat["lo"] == pytest.approx(0.25) and strat["hi"] == pytest.approx(0.25)
    pooled = metrics.paired_bootstrap(np.zeros(160), d, groups=[x.replace(":", "/") for x in labels])
    assert pooled["hi"] - pooled["lo"] > 0.2
    one_domain = [f"code:m{i}" for i in range(16) for _ in range(10)]  # one stratum: plain group resampling
    assert metrics.paired_bootstrap(np.zeros(160), d, groups=one_domain) == \
        metrics.paired_bootstrap(np.zeros(160), d, groups=[x.split(":")[1] for x in one_domain])


def test_resident_bytes_counts_a_tied_matrix_once_and_nf4_scales():
    """What a decode step reads: a tied embedding once; NF4's absmax beside its packed weights."""
    import bitsandbytes as bnb

    emb = torch.nn.Embedding(64, 32)
    head = torch.nn.Linear(32, 64, bias=False)
    head.weight = emb.weight
    assert metrics.resident_bytes(torch.nn.ModuleList([emb, head])) == 64 * 32 * 4
    q = bnb.nn.Linear4bit(256, 128, bias=False, quant_type="nf4", compute_dtype=torch.float32).to("cpu")
    packed = sum(t.numel() * t.element_size() for t in q.parameters())
    assert packed == 128 * 256 // 2  # the packed codes are all that parameters() shows
    assert metrics.resident_bytes(q) >= packed + q.weight.quant_state.absmax.numel()  # the scales count too
