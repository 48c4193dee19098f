"""06's post-training block search on a tiny LLaMA: rounding is exact and reversible, the search obeys its budget."""
import math

import numpy as np
import pytest
import torch

from qlib.studies import block_precision as bp


def test_rounder_sets_and_restores_each_block():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=2))
    r = bp.Rounder(model)
    assert r.n_blocks == 3 and len(r.layers) == 3 * 7
    before = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    r.set([2, 32, 4])
    up = lambda b: model.model.layers[b].mlp.up_proj.weight  # noqa: E731
    assert len(up(0).reshape(-1, 64)[0].unique()) <= 3           # 2 bits: {-s, 0, +s} per group
    assert torch.equal(up(1), before["model.layers.1.mlp.up_proj"])
    assert len(up(2).reshape(-1, 64)[0].unique()) <= 15
    r.set([32, 32, 32])
    assert all(torch.equal(m.weight, before[n]) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))


def test_the_search_stops_at_its_first_refusal():
    class R:
        n_blocks = 4

    cost = {0: 0.01, 1: 0.5, 2: 0.05, 3: 0.001}  # dev loss added by each block at low bits
    spec = bp.BlockSearchSpec(low=2, high=8, budget=0.05)
    sens, chosen, steps, base = bp.search_blocks(R(), lambda bm, keep=False: 1.0 + sum(
        cost[b] for b, x in enumerate(bm) if x == 2), spec)
    assert base == 1.0 and sens == pytest.approx([cost[b] for b in range(4)])
    assert [s["block"] for s in steps] == [3, 0, 2] and [s["kept"] for s in steps] == [True, True, False]
    assert chosen == [2, 8, 8, 2]  # block 2 would take the dev perplexity 6.3 % up; block 1 is never tried


def test_the_search_is_tested_against_random_orders_by_their_percentile():
    ppl = [10.0, 11.0, 12.0, 13.0]
    got = bp.versus_random(np.full(5, np.log(11.5)), [{"bitmap": [], "perplexity": p} for p in ppl])
    assert got["random_as_good_or_better"] == 2 and got["p_value"] == pytest.approx(3 / 5)
    assert got["random_perplexity_median"] == pytest.approx(11.5) and bp.versus_random(np.zeros(3), []) is None


def test_greedy_search_keeps_its_budget_and_controls_match_in_size():
    spec = bp.BlockSearchSpec(model_id="llama-stdlib-tiny", low=2, high=8, budget=0.02, context=64,
                              calib_tokens=512, eval_tokens=1024, qa_questions=12, random_orders=3)
    res = bp.run_block_search(spec, torch.device("cpu"))
    assert len(res.sensitivity) == len(res.chosen) == 2
    kept = [s for s in res.steps if s["kept"]]
    assert all(s["calib_ppl_increase"] <= spec.budget + 1e-9 for s in kept)
    assert [s["block"] for s in res.steps] == sorted(range(2), key=lambda b: res.sensitivity[b])[:len(res.steps)]
    by = {r["bitmap_name"]: r for r in res.rows}
    k = res.info["low_blocks"]
    for name in ("greedy", "most_sensitive_first", "random_order"):
        assert by[name]["bitmap"].split(",").count("2") == k
    assert len(res.info["random_orders"]) == (3 if 0 < k < 2 else 0)
    assert by["uniform_2bit"]["perplexity"] > by["uniform_8bit"]["perplexity"]
    assert by["reference"]["perplexity_ratio"] is None and math.isclose(by["reference"]["avg_bits"], 32)
    # whole-model bits: the blocks with their fp16 scales, the embeddings and norms at 16 bits
    assert by["uniform_2bit"]["bits_per_weight_blocks"] == pytest.approx(2 + 16 / 64)
    assert 2.25 < by["uniform_2bit"]["bits_per_param"] < 16 and by["reference"]["bits_per_param"] == 16
    # the held-out windows are the shared set's, resampled by module and article; Bonferroni over the table
    assert res.info["eval_set"]["windows"] == 1024 // 64
    assert {g.split(":")[0] for g in res.nll["group"]} == {"code", "prose"}
    m = by["greedy"]["bonferroni_comparisons"]
    assert m >= 5 and all(r["perplexity_ratio_bonferroni_lo"] <= r["perplexity_ratio_lo"] for r in res.rows[1:])
    qa_by = {r["bitmap_name"]: r for r in res.qa_rows}
    assert list(qa_by) == ["reference", "greedy", "uniform_2bit", "baseline_majority", "baseline_heuristic"]
    n = qa_by["reference"]["n"]
    assert 0 < n <= 12 and all(len(v) == n for v in res.qa_answers.values())
    for name, row in qa_by.items():  # accuracy recomputed from the saved answers
        assert row["accuracy"] == sum(a == g for a, g in zip(res.qa_answers[name], res.qa_answers["answer"])) / n
    assert qa_by["reference"]["accuracy_diff_vs_reference"] is None
    assert qa_by["greedy"]["accuracy_diff_vs_majority"] == pytest.approx(
        qa_by["greedy"]["accuracy"] - qa_by["baseline_majority"]["accuracy"])
    again = bp.run_block_search(spec, torch.device("cpu"))
    assert again.rows == res.rows and again.qa_rows == res.qa_rows  # same seed, same numbers
