"""The post-training ladder: each format's grid, the Q4_1 control's premise, and the ladder on a tiny LLaMA."""
import pytest
import torch

from qlib.quant import ladder


def _w(seed=0, shape=(96, 256)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_q4_1_is_idempotent_so_a_model_shipped_as_q4_1_comes_back_unchanged():
    once = ladder.q4_1(_w())
    assert (ladder.q4_1(once) - once).abs().max() < 1e-6 < (once - _w()).abs().max()
    assert ladder.q4_1(once).reshape(-1, 32).unique(dim=1).shape[1] <= 32  # 16 levels per block of 32


@pytest.mark.parametrize("bits,levels", [(2, 3), (3, 7), (4, 15)])
def test_grouped_int_has_the_symmetric_levels_per_group(bits, levels):
    q = ladder.grouped_int(_w(), bits)
    for g in q.reshape(-1, ladder.GROUP)[:20]:
        assert len(g.unique()) <= levels
    assert torch.equal(ladder.grouped_int(q, bits), q)  # on its own grid


def test_error_grows_down_the_ladder():
    w = _w()
    err = {n: (ladder.RUNGS[n].fn(w) - w).pow(2).mean().item() for n in ("int8", "nf4", "int4", "int3", "int2")}
    assert err["int8"] < err["nf4"] < err["int3"] < err["int2"]
    assert err["nf4"] < err["int4"]  # NF4's levels follow the weights' bell shape
    t = ladder.ternary(w)
    assert set(torch.unique(t / t.abs().max()).tolist()) <= {-1.0, 0.0, 1.0}


def test_apply_changes_block_linears_only():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    emb, up = model.model.embed_tokens.weight.clone(), model.model.layers[0].mlp.up_proj.weight.clone()
    n = ladder.apply(model, "int2")
    assert n == 2 * (4 * 64 * 64 + 3 * 64 * 128)
    assert torch.equal(model.model.embed_tokens.weight, emb)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, up)


def test_ladder_on_a_tiny_llama_scores_every_rung_on_the_same_tokens():
    from qlib.studies import ptq_ladder

    spec = ptq_ladder.LadderSpec("llama-stdlib-tiny", "stdlib-code", ("q4_1_control", "int8", "int2"), 64, 1024,
                                 20_000)
    res = ptq_ladder.run_ladder(spec, torch.device("cpu"))
    by = {r["method"]: r for r in res.rows}
    assert set(by) == {"reference", "ptq_q4_1_control", "ptq_int8", "ptq_int2", "unigram", "bigram_kn"}
    assert len({v.size for v in res.nll.values()}) == 1  # one token set for every row
    assert by["reference"]["perplexity_ratio"] is None
    assert by["ptq_int8"]["perplexity_ratio"] < by["ptq_int2"]["perplexity_ratio"]
    assert by["ptq_int2"]["perplexity_ratio_real"] and by["ptq_int2"]["perplexity_ratio_lo"] > 1
    again = ptq_ladder.run_ladder(spec, torch.device("cpu"))
    assert [r["perplexity"] for r in again.rows] == [r["perplexity"] for r in res.rows]  # same seed, same numbers



def test_the_reference_has_one_perplexity_in_the_ladder_and_in_formats(tmp_path, monkeypatch):
    """05's ladder (and 06's block search, which loads the same way) and `python -m qlib formats` score the same
    FP16 model on the same shared-set windows: one perplexity, to the last digit."""
    from qlib import formats_report
    from qlib.studies import ptq_ladder

    monkeypatch.setenv("QLAB_ROOT", str(tmp_path))
    lad = ptq_ladder.run_ladder(ptq_ladder.LadderSpec("llama-stdlib-tiny", "stdlib-code", ("int8",), 64, 512, 5000),
                                torch.device("cpu"))
    rep = formats_report.run(formats_report.Config(model="llama-stdlib-tiny", formats=(), context=64, eval_tokens=512,
                                                   gen_tokens=2, repeats=1, baseline_tokens=5000))
    ref = next(r for r in lad.rows if r["method"] == "reference")
    fp16 = next(r for r in rep.rows if r["method"] == "fp16")
    assert ref["perplexity"] == fp16["perplexity"] and ref["perplexity_by_domain"] == fp16["perplexity_by_domain"]
