"""06's post-training block search on a tiny LLaMA: rounding is exact and reversible, the search obeys its budget."""
import math

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


def test_greedy_search_keeps_its_budget_and_controls_match_in_size():
    spec = bp.BlockSearchSpec(model_id="llama-stdlib-tiny", low=2, high=8, budget=0.02, context=64,
                              calib_tokens=512, eval_tokens=1024, qa_questions=12)
    res = bp.run_block_search(spec, torch.device("cpu"))
    assert len(res.sensitivity) == len(res.chosen) == 2
    kept = [s for s in res.steps if s["kept"]]
    assert all(s["calib_ppl_increase"] <= spec.budget + 1e-9 for s in kept)
    assert [s["block"] for s in res.steps] == sorted(range(2), key=lambda b: res.sensitivity[b])
    by = {r["bitmap_name"]: r for r in res.rows}
    k = res.info["low_blocks"]
    for name in ("greedy", "most_sensitive_first", "random_order"):
        assert by[name]["bitmap"].split(",").count("2") == k
    assert by["uniform_2bit"]["perplexity"] > by["uniform_8bit"]["perplexity"]
    assert by["reference"]["perplexity_ratio"] is None and math.isclose(by["reference"]["avg_bits"], 32)
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
