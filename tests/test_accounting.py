"""Study 07's accounting: exact counts vs numel, bytes per format, activations vs what autograd saves."""
import dataclasses

import pytest
import torch

from qlib import accounting
from qlib.core.errors import QlabError
from qlib.studies import llama_finetune, llama_scaling

SMALL = [dict(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4),
         dict(vocab_size=500, hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=True)]


@pytest.mark.parametrize("kw", SMALL, ids=["mha", "gqa-tied"])
def test_meta_counts_equal_numel_of_a_real_model(kw):
    from transformers import AutoModelForCausalLM

    cfg = accounting.llama_config(**kw)
    real = AutoModelForCausalLM.from_config(cfg)
    counts = accounting.params_by_kind(accounting.meta_model(cfg))
    assert counts["total"] == sum(p.numel() for p in real.parameters())
    assert counts["block_linears"] == sum(m.weight.numel() for n, m in real.named_modules()
                                          if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(real, LoraConfig(r=8, target_modules=list(accounting.LORA_TARGETS)))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert accounting.lora_params(cfg, 8) == trainable


def test_llama_7b_exact_counts_and_bytes():
    model = accounting.meta_model(accounting.llama_config())
    c = accounting.params_by_kind(model)
    assert c["total"] == 6_738_415_616
    assert c["embedding"] == c["lm_head"] == 32000 * 4096
    assert c["block_linears"] == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert accounting.weight_bytes(model, "fp16") == 2 * 6_738_415_616
    assert accounting.lora_params(model.config, 16) == 39_976_960
    nf4 = accounting.weight_bytes(model, "nf4")
    assert nf4 == round(c["block_linears"] * (4 + 8 / 64 + 32 / (64 * 256)) / 8) + 2 * (c["total"] - c["block_linears"])
    ordered = [accounting.weight_bytes(model, f) for f in ("fp32", "fp16", "int8", "nf4", "ternary")]
    assert ordered == sorted(ordered, reverse=True)
    with pytest.raises(QlabError, match="unknown weight format"):
        accounting.weight_bytes(model, "fp8")
    with pytest.raises(QlabError, match="unknown LoRA target"):
        accounting.lora_params(model.config, 16, ("q_proj", "qkv"))


@pytest.mark.parametrize("kw", SMALL[:1] + [dict(SMALL[0], hidden_size=128, num_hidden_layers=3)], ids=["a", "b"])
def test_activation_formula_matches_saved_tensors(kw):
    from transformers import AutoModelForCausalLM

    cfg = accounting.llama_config(**kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    ids = torch.randint(0, cfg.vocab_size, (2, 48))
    measured = accounting.saved_activation_bytes(model, ids)
    assert accounting.activation_bytes(cfg, 2, 48)["saved"] == pytest.approx(measured, rel=0.02)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    measured_ckpt = accounting.saved_activation_bytes(model, ids)
    assert (accounting.activation_bytes(cfg, 2, 48, checkpointing=True)["saved"]
            == pytest.approx(measured_ckpt, rel=0.06))
    assert measured_ckpt < measured / 2


def test_resident_bytes_of_a_measured_rung_match_the_accounting(tmp_path):
    cfg = llama_scaling.config("smoke", rungs=("llama-5m",), methods=("qlora", "full"))
    cpu = torch.device("cpu")
    rows = [llama_scaling.measure_rung("llama-5m", m, cfg, cpu, tmp_path) for m in cfg.methods]
    by = {r["method"]: r for r in rows}
    assert all(r["status"] == "ok" for r in rows)
    assert by["full"]["trainable_params"] == by["full"]["total_params"] == 2 * (4 * 128 * 128 + 3 * 128 * 344) \
        + 2 * 2 * 128 + 128 + 2 * 1000 * 128
    assert by["qlora"]["trainable_params"] == accounting.lora_params(llama_scaling.rung_config("llama-5m", 1000), 16)
    assert abs(by["full"]["resident_prediction_error"]) < 0.01  # fp32 weights + AdamW states: exact
    assert abs(by["qlora"]["resident_prediction_error"]) < 0.01  # NF4 codes + absmax + fp32 upcast rest
    assert by["qlora"]["resident_bytes"] < by["full"]["resident_bytes"] / 2


def test_bad_ladder_settings_are_named():
    with pytest.raises(QlabError, match="unknown rung/method"):
        llama_scaling.config("smoke", rungs=["llama-3b"])
    with pytest.raises(QlabError, match="needs a CUDA GPU"):
        llama_finetune.finetune_7b(llama_scaling.config("smoke"), torch.device("cpu"))


def test_fit_recovers_a_known_line():
    rows = [{"method": "qlora", "status": "ok", "rung": f"r{n}", "total_params": n, "peak_mem_bytes": 1e6 + 3 * n,
             "predicted_peak_mem_bytes": 1e6 + 3 * n, "step_time_s": 1e-6 * n} for n in (1e6, 4e6, 1.6e7)]
    f = llama_scaling.fit(rows, "qlora", 1e9)
    assert f["mem_bytes_per_param"] == pytest.approx(3) and f["time_exponent"] == pytest.approx(1)
    assert f["projected_peak_mem_bytes"] == pytest.approx(1e6 + 3e9)
    assert llama_scaling.fit(rows[:1], "qlora", 1e9) is None


FAMILIES = {  # small real models of each family; attention dropout off (CUDA's fused kernels save no mask)
    "gpt2": lambda: __import__("transformers").GPT2Config(n_embd=128, n_inner=384, n_layer=3, n_head=4,
                                                          vocab_size=500, attn_pdrop=0.0, n_positions=128),
    "bert": lambda: __import__("transformers").BertConfig(hidden_size=128, intermediate_size=320, num_hidden_layers=3,
                                                          num_attention_heads=4, vocab_size=500,
                                                          attention_probs_dropout_prob=0.0),
    "qwen2": lambda: __import__("transformers").Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                                            num_attention_heads=4, num_key_value_heads=2,
                                                            vocab_size=500),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_counts_exactly_and_saves_what_the_formula_says(family):
    """The accounting that predicts the t4 notebooks' peaks: exact block-linear and LoRA counts on the meta
    device, and per-layer activations within 3 % of what autograd saves in a real model of each family."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from qlib import adapters

    cfg = FAMILIES[family]()
    torch.manual_seed(0)
    real = (AutoModelForSequenceClassification if family == "bert" else AutoModelForCausalLM).from_config(cfg)
    meta = accounting.meta_model(cfg)
    counts = accounting.params_by_kind(meta)
    assert counts["total"] == sum(p.numel() for p in real.parameters())
    blocks = [m for n, m in real.named_modules() if type(m).__name__ in ("Linear", "Conv1D")
              and not any(t in n for t in ("lm_head", "classifier", "pooler"))]
    assert counts["block_linears"] == sum(sum(p.numel() for p in m.parameters()) for m in blocks)  # with biases
    targets = {"gpt2": tuple(adapters.target_modules("gpt2", "attention+mlp")),
               "bert": ("query", "value", "intermediate.dense"),
               "qwen2": accounting.LORA_TARGETS}[family]
    ids = torch.randint(0, 500, (2, 48))
    labels = torch.tensor([0, 1]) if family == "bert" else ids
    measured = accounting.saved_activation_bytes(real.train(), ids, labels)
    assert accounting.activation_bytes(cfg, 2, 48)["saved"] == pytest.approx(measured, rel=0.03)
    n, _, _ = accounting.lora_params_of(meta, 8, targets)
    peft_model = get_peft_model(real, LoraConfig(r=8, target_modules=list(targets)))
    assert n == sum(p.numel() for nm, p in peft_model.named_parameters() if "lora_" in nm)


def test_full_rung_at_fp16_trains_with_a_grad_scaler(tmp_path, monkeypatch):
    """A T4 (fp16) full fine-tune with a GradScaler: fp32 master weights under fp16 autocast. fp16 weights
    raised "Attempting to unscale FP16 gradients" and killed notebook 07. CPU autocast runs the same code."""
    monkeypatch.setattr(llama_scaling, "compute_dtype", lambda d=None: torch.float16)
    cfg = llama_scaling.config("smoke", rungs=("llama-2m",), methods=("full",), vocab_size=500, seq=16, steps=1)
    row = llama_scaling.measure_rung("llama-2m", "full", cfg, torch.device("cpu"), tmp_path)
    assert row["status"] == "ok", row.get("note")
    setup = llama_scaling.setup_for("full", torch.device("cpu"), 16)
    assert (setup.weight_format, setup.compute_elem, setup.autocast_copy) == ("fp32", 2, True)
    monkeypatch.setattr(llama_scaling, "weights_dtype", lambda m, d: torch.float16)  # the old recipe
    bad = llama_scaling.measure_rung("llama-2m", "full", cfg, torch.device("cpu"), tmp_path)
    assert bad["status"] == "error" and "unscale FP16 gradients" in bad["note"]  # a row, and the ladder goes on


def test_the_7b_finetune_fails_before_the_ladder_without_cuda(monkeypatch):
    monkeypatch.setattr(llama_scaling, "run_ladder", lambda *a: pytest.fail("the ladder ran first"))
    with pytest.raises(QlabError, match="finetune_7b needs a CUDA GPU .* device=cpu rehearses"):
        llama_scaling.run(llama_scaling.config("t4"))


# Peaks measured with plain bitsandbytes 0.50.2 + peft on an H100 (../shared/ASSETS.md, "The GPU machine"; bf16
# compute, torch.cuda.max_memory_allocated, GiB). A reference the predictions must agree with, not our result.
H100_MEASURED = [("meta-llama/Llama-2-7b-hf", "qlora", 1, 512, True, 2, 4.29),
                 ("meta-llama/Llama-2-7b-hf", "lora", 1, 512, True, 2, 13.13),
                 ("gpt2", "full", 8, 512, False, 8, 7.19), ("gpt2", "lora", 8, 512, False, 8, 5.39),
                 ("gpt2", "qlora", 8, 512, False, 8, 5.26)]


@pytest.mark.parametrize("repo, method, batch, seq, ckpt, opt, gib", H100_MEASURED,
                         ids=[f"{r[0].split('/')[-1]}-{r[1]}" for r in H100_MEASURED])
def test_predictions_agree_with_the_h100_measurements(repo, method, batch, seq, ckpt, opt, gib):
    """The 15 % margin the t4 profile keeps is the accounting's error against real GPU peaks."""
    from qlib import adapters, budget, hub

    targets = tuple(adapters.target_modules("gpt2", "attention+mlp")) if repo == "gpt2" else accounting.LORA_TARGETS
    p = budget.predict("h100", hub.model_config(repo), method, batch=batch, seq=seq, steps=1, compute=torch.bfloat16,
                       optimizer_bytes=opt, checkpointing=ckpt, targets=targets, lora_dropout=method != "full")
    assert p.peak_bytes / 2**30 == pytest.approx(gib, rel=0.15)


def test_the_7b_projection_takes_the_h100_gap_additively_and_no_cpu_factor():
    """The T4 projection shifts the fp16 accounting by the bf16 accounting's gap at the measured H100 peak."""
    cfg = llama_scaling.config("default")
    fits = {"qlora": {"projected_peak_mem_bytes": 1e12, "projected_step_time_s": 9.0,
                      "measured_over_predicted_largest_rung": 3.0}}
    by = {p["method"]: p for p in llama_scaling.projection_7b(cfg, fits)}
    for m in ("qlora", "lora"):
        p, measured = by[m], llama_scaling.PLAIN_BNB_PEFT_H100[m]["peak_gib"] * 2**30
        assert p["h100_measured_bytes"] == measured and p["h100_gap_bytes"] == measured - p["h100_accounting_bytes"]
        assert p["corrected_bytes"] == p["accounting_bytes"] + p["h100_gap_bytes"]
        assert abs(p["h100_gap_bytes"]) < 0.15 * measured
    assert by["full"]["corrected_bytes"] is None  # no measured peak for full fine-tuning
    assert by["qlora"]["fits_t4_corrected"] and by["qlora"]["cpu_fit_bytes"] == 1e12  # the CPU fit shown, not applied
    for p in by.values():  # a fit keeps `plan`'s margin: 85 % of the 15 GiB a T4 gives, not all of it
        assert p["fits_t4"] == (p["accounting_bytes"] <= 0.85 * 15 * 2**30)
    other = llama_scaling.projection_7b(dataclasses.replace(cfg, lora_rank=8), {})
    assert all(p["corrected_bytes"] is None for p in other)  # another recipe than the measured one: no correction


def test_8bit_adamw_states_are_counted_as_bitsandbytes_keeps_them():
    """bitsandbytes keeps fp32 states for tensors under 4096 elements (most LoRA matrices of a tiny rung): the
    accounting said 2 bytes for every one, and a 5M rung's resident memory came out 14.5 % over it on an H200."""
    bnb = pytest.importorskip("bitsandbytes")
    sizes = [(16, 200), (300, 16), (16, 256)]  # 3200 < 4096 <= 4800; 4096 exactly is 8-bit
    params = [torch.nn.Parameter(torch.randn(s)) for s in sizes]
    opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    kept = sum(v.numel() * v.element_size() for p in params for k, v in opt.state[p].items()
               if k in ("state1", "state2", "absmax1", "absmax2"))  # qmap1/2: two 1 KiB tables shared by all
    assert accounting.optimizer_state_bytes([p.numel() for p in params], 2) == kept == 8 * 3200 + 2 * (4800 + 4096) \
        + 8 * (19 + 16)
    assert accounting.optimizer_state_bytes([3200, 4800], 8) == 8 * 8000  # fp32 AdamW: 8 bytes each, any size
