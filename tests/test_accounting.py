"""Study 07's accounting: exact counts vs numel, bytes per format, activations vs what autograd saves."""
import pytest
import torch

from qlib import accounting
from qlib.config import QlabError
from qlib.studies import llama_scaling

SMALL = [dict(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4),
         dict(vocab_size=500, hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=True)]


@pytest.mark.parametrize("kw", SMALL, ids=["mha", "gqa-tied"])
def test_meta_counts_equal_numel_of_a_real_model(kw):
    from transformers import AutoModelForCausalLM

    cfg = accounting.llama_config(**kw)
    real = AutoModelForCausalLM.from_config(cfg)
    counts = accounting.param_counts(accounting.meta_model(cfg))
    assert counts["total"] == sum(p.numel() for p in real.parameters())
    assert counts["block_linears"] == sum(m.weight.numel() for n, m in real.named_modules()
                                          if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(real, LoraConfig(r=8, target_modules=list(accounting.LORA_TARGETS)))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert accounting.lora_params(cfg, 8) == trainable


def test_llama_7b_exact_counts_and_bytes():
    model = accounting.meta_model(accounting.llama_config())
    c = accounting.param_counts(model)
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
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    measured_ckpt = accounting.saved_activation_bytes(model, ids)
    assert accounting.activation_bytes(cfg, 2, 48, checkpointing=True)["saved"] == pytest.approx(measured_ckpt, rel=0.06)
    assert measured_ckpt < measured / 2


def test_resident_bytes_of_a_measured_rung_match_the_accounting(tmp_path):
    cfg = llama_scaling.scaling_config("smoke", rungs=("llama-5m",), methods=("qlora", "full"))
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
        llama_scaling.scaling_config("smoke", rungs=["llama-3b"])
    with pytest.raises(QlabError, match="needs a CUDA GPU"):
        llama_scaling.finetune_7b(llama_scaling.scaling_config("smoke"), torch.device("cpu"))


def test_fit_recovers_a_known_line():
    rows = [{"method": "qlora", "status": "ok", "rung": f"r{n}", "total_params": n, "peak_mem_bytes": 1e6 + 3 * n,
             "predicted_peak_mem_bytes": 1e6 + 3 * n, "step_time_s": 1e-6 * n} for n in (1e6, 4e6, 1.6e7)]
    f = llama_scaling.fit(rows, "qlora", 1e9)
    assert f["mem_bytes_per_param"] == pytest.approx(3) and f["time_exponent"] == pytest.approx(1)
    assert f["projected_peak_mem_bytes"] == pytest.approx(1e6 + 3e9)
    assert llama_scaling.fit(rows[:1], "qlora", 1e9) is None
