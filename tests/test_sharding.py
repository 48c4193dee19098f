"""Per-GPU memory on several GPUs: DDP and FSDP-QLoRA from the one-GPU accounting, held to its arithmetic and to
the published FSDP-QLoRA peaks."""
import pytest
import torch

from qlib import accounting, hub, sharding
from qlib.cli import main
from qlib.core.errors import QlabError

GIB = 2**30


@pytest.fixture(scope="module")
def llama70b():
    config = hub.model_config("meta-llama/Llama-2-70b-hf")
    return config, accounting.meta_model(config)


def _bytes(llama, strategy, gpus, recipe=sharding.Recipe()):
    config, model = llama
    return sharding.per_gpu_bytes(config, recipe.setup(), sharding.Layout(strategy, gpus), batch=recipe.batch,
                                  seq=recipe.seq, checkpointing=recipe.checkpointing, model=model)


def test_ddp_is_one_gpu_plus_a_second_copy_of_the_gradients(llama70b):
    config, model = llama70b
    r = sharding.Recipe()
    one = accounting.training_bytes(config, r.setup(), r.batch, r.seq, True, model)
    assert _bytes(llama70b, "ddp", 1)["total"] == one["total"]
    two = _bytes(llama70b, "ddp", 2)
    assert two["ddp_buckets"] == one["gradients"] > 0 and two["total"] == one["total"] + one["gradients"]
    assert _bytes(llama70b, "ddp", 4)["total"] == two["total"]  # a replica per GPU: more GPUs save nothing


def test_fsdp_shards_the_state_gathers_two_layers_and_the_root_and_keeps_activations_per_gpu(llama70b):
    config, model = llama70b
    two, four = _bytes(llama70b, "fsdp", 2), _bytes(llama70b, "fsdp", 4)
    nf4_bf16 = accounting.weight_bytes(model, "nf4", rest_elem=2)  # one dtype per unit: no fp32 upcast
    assert two["weights_shard"] == -(-nf4_bf16 // 2) and four["weights_shard"] == -(-nf4_bf16 // 4)
    root = 2 * (2 * 32000 * 8192 + 8192)  # embeddings + LM head + final norm, bf16
    assert two["gathered_root"] == four["gathered_root"] == root
    layer = (nf4_bf16 - root + 2 * accounting.lora_params_of(model, 64, sharding.ANSWERAI_TARGETS)[0]) // 80
    assert two["gathered_layers"] == sharding.PREFETCH_UNITS * layer
    assert two["activations"] == four["activations"] > 0
    assert four["total"] < two["total"] < _bytes(llama70b, "ddp", 2)["total"]
    assert "gathered_root" not in _bytes(llama70b, "fsdp", 1)  # one GPU gathers nothing


def test_cpu_offload_moves_exactly_the_shards_off_the_gpu(llama70b):
    fsdp, off = _bytes(llama70b, "fsdp", 2), _bytes(llama70b, "fsdp_offload", 2)
    shards = sum(v for k, v in fsdp.items() if k.endswith("_shard"))
    assert off["cpu_offloaded"] == shards and off["total"] == fsdp["total"] - shards


def test_70b_on_two_24gb_gpus_fits_at_the_recipes_settings_and_says_why_not_without_offload(llama70b):
    """The issue's benchmark: answer.ai's recipe (CPU offload, 2 x 2048) under 24 GB per GPU; without offload the
    17 GiB of NF4 shards plus 2 x 2048 tokens of checkpointed activations do not fit."""
    assert _bytes(llama70b, "fsdp_offload", 2)["total"] < 24e9
    no_offload = _bytes(llama70b, "fsdp", 2)
    assert no_offload["total"] > 24e9 and no_offload["weights_shard"] > 16 * GIB


def test_predictions_stay_near_the_published_fsdp_qlora_peaks():
    """Published peaks are reserved memory (allocated + the allocator's cache): the prediction sits under them,
    within a band a wrong term (a missing shard, a doubled activation) would leave."""
    rows = sharding.reference_rows(sharding.Recipe())
    assert len(rows) == len(sharding.ANSWERAI_REFERENCE)
    for r in rows:
        assert 0.65 <= r["predicted_over_reference"] <= 1.05, r
    large = [r for r in rows if r["peak_gib"] > 10]
    assert all(r["predicted_over_reference"] >= 0.9 for r in large if r["model"] == "llama-2-7b")


def test_pure_bf16_halves_the_adapters_state_against_fp32_adapters(llama70b):
    bf16 = _bytes(llama70b, "ddp", 1)
    fp32 = _bytes(llama70b, "ddp", 1, sharding.Recipe(pure_low_precision=False))
    assert fp32["optimizer"] == 2 * bf16["optimizer"] and fp32["gradients"] == 2 * bf16["gradients"]


def test_bad_layouts_and_models_are_one_line():
    with pytest.raises(QlabError, match="unknown strategy 'zero3'; valid: ddp, fsdp, fsdp_offload"):
        sharding.Layout("zero3", 2)
    with pytest.raises(QlabError, match="gpus must be at least 1, not 0"):
        sharding.Layout("ddp", 0)
    with pytest.raises(QlabError, match="no config for 'foo/bar' \\(plans never reach the hub\\)"):
        sharding.predict("foo/bar", sharding.Layout("ddp", 1), sharding.Recipe())


def test_plan_gpus_prints_every_model_and_count_and_the_published_points(capsys):
    assert main(["plan", "--gpus", "1,2,4"]) == 0
    out = capsys.readouterr().out
    for m in ("llama-2-7b", "llama-2-13b", "llama-2-70b"):
        for g in (1, 2, 4):
            assert f"| {m} | {g} |" in out
    assert "micro-batch 2 x 2048" in out and "14.92" in out
    assert main(["plan", "--gpus", "2", "--model", "llama-2-7b", "--batch", "1", "--seq", "512"]) == 0
    assert "micro-batch 1 x 512" in capsys.readouterr().out
    assert main(["plan", "--gpus", "two"]) != 0
    err = capsys.readouterr().err
    assert err.strip() == "qlab: error: --gpus takes GPU counts such as 2 or 1,2,4, not 'two'"


def test_fsdp_recipe_keeps_other_weights_in_the_compute_dtype():
    """FSDP flattens a unit's parameters into one tensor of one dtype: the NF4 codes stored as bf16 and the norms
    beside them must share it, so the fp32 upcast peft does for one GPU cannot apply."""
    config = accounting.llama_config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4, vocab_size=100)
    model = accounting.meta_model(config)
    setup = accounting.recipe("qlora", torch.bfloat16, 8, 4)
    assert setup.rest_elem == 4
    one_gpu_fsdp = sharding.per_gpu_bytes(config, setup, sharding.Layout("fsdp", 1), batch=1, seq=8, model=model)
    assert one_gpu_fsdp["weights_shard"] == accounting.weight_bytes(model, "nf4", rest_elem=2)
