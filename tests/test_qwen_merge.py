"""Study 08's arithmetic on hand-made per-token NLLs: how much of the adapter each format keeps, inside the format and
against the unquantized base, and the advice that follows only from what the intervals allow."""
import numpy as np
import pytest

from qlib import formats
from qlib.studies import qwen_merge


def _m(name, backend, nll):
    return formats.Measured(name, backend, np.asarray(nll, dtype=float))


def _measured(rng, n=400):
    base = 3.0 + rng.normal(0, 0.3, n)
    merged = base - 0.20 + rng.normal(0, 0.02, n)        # the adapter gains 0.20 nats a token
    return [_m("base", "transformers", base), _m("merged_fp16", "transformers", merged),
            _m("base_bnb_nf4", "transformers", base + 0.10), _m("bnb_nf4", "transformers", merged + 0.15),
            _m("base_gguf_f16", "llama.cpp", base), _m("gguf_f16", "llama.cpp", merged),
            _m("base_gguf_q4_0", "llama.cpp", base + 0.02), _m("gguf_q4_0", "llama.cpp", merged + 0.30),
            _m("base_gguf_q8_0", "llama.cpp", base), _m("gguf_q8_0", "llama.cpp", merged + 0.01),
            _m("unigram", "counts", base + 5)]


def test_the_gain_kept_is_measured_inside_the_format_and_against_the_fp16_base():
    measured = _measured(np.random.default_rng(0))
    groups = np.repeat(np.arange(40), 10)  # 40 modules of 10 tokens
    cfg = qwen_merge.config("default")
    kept = qwen_merge.adapter_kept(measured, cfg, groups)
    assert "unigram" not in kept and kept["merged_fp16"]["in_format"] == pytest.approx(1.0)
    nf4, by = kept["bnb_nf4"], {m.method: m.nll for m in measured}
    gain = (by["base"] - by["merged_fp16"]).sum()
    assert nf4["in_format"] == pytest.approx((by["base_bnb_nf4"] - by["bnb_nf4"]).sum() / gain)  # ~0.75: inside NF4
    assert nf4["vs_fp16_base"] == pytest.approx((by["base"] - by["bnb_nf4"]).sum() / gain)  # ~0.25: vs the FP16 base
    assert 0.7 < nf4["in_format"] < 0.8 and 0.2 < nf4["vs_fp16_base"] < 0.3
    assert nf4["vs_fp16_base_lo"] <= nf4["vs_fp16_base"] <= nf4["vs_fp16_base_hi"]
    q4 = kept["gguf_q4_0"]
    assert q4["vs_fp16_base"] == pytest.approx(-0.5, abs=0.01)
    assert q4["ppl_vs_fp16_base"] == pytest.approx(np.exp(0.10), rel=1e-3)
    assert q4["ppl_vs_fp16_base_real"] and kept["gguf_q8_0"]["ppl_vs_fp16_base_hi"] < 1
    advice = "\n".join(qwen_merge.advice(kept))
    assert "`gguf_q8_0`" in advice.split("Better than")[1].splitlines()[0]
    assert "`gguf_q4_0`" in advice.split("Worse than")[1] and "merged_fp16" not in advice


def test_the_interval_resamples_whole_groups_so_correlated_tokens_widen_it():
    rng = np.random.default_rng(1)
    measured = _measured(rng)
    by = {m.method: m for m in measured}
    shift = np.repeat(rng.normal(0, 0.3, 8), 50)  # 8 modules whose tokens move together
    by["bnb_nf4"].nll = by["bnb_nf4"].nll + shift
    cfg = qwen_merge.config("default")
    tokens = qwen_merge.adapter_kept(measured, cfg, np.arange(400))["bnb_nf4"]
    modules = qwen_merge.adapter_kept(measured, cfg, np.repeat(np.arange(8), 50))["bnb_nf4"]
    width = lambda k: k["ppl_vs_fp16_base_hi"] - k["ppl_vs_fp16_base_lo"]  # noqa: E731
    assert width(modules) > 2 * width(tokens)
