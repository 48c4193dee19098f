import json

import pytest
import torch

from qlib.config import QuantMethod, build_quantization_plan
from qlib.core.device import compute_dtype, pick_device
from qlib.core.errors import QlabError
from qlib.runmeta import parse_run_name, read_meta, run_name, write_meta
from qlib.studies import baseline


def test_enum_parse_accepts_names_values_and_aliases():
    assert QuantMethod.parse("qlora") is QuantMethod.QLORA
    assert QuantMethod.parse("QLORA_BITNET") is QuantMethod.QLORA_BITNET
    with pytest.raises(QlabError, match="unknown quantization method 'int3'"):
        QuantMethod.parse("int3")


def test_qlora_plan_is_nf4_double_quant_with_device_compute_dtype():
    plan = build_quantization_plan("qlora", device="cpu")
    bnb = plan.bnb_config
    assert bnb.load_in_4bit and not bnb.load_in_8bit
    assert bnb.bnb_4bit_quant_type == "nf4"
    assert bnb.bnb_4bit_use_double_quant is True
    assert bnb.bnb_4bit_compute_dtype == torch.float32
    assert plan.spec.peft == "lora" and plan.spec.base_trainable is False


def test_compute_dtype_follows_compute_capability_not_is_bf16_supported(monkeypatch):
    """A T4 (sm 7.5) says True to `is_bf16_supported()` (emulation counts): it must still train in fp16."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))
    assert compute_dtype("cuda") == torch.float16  # a T4, as Colab reports it
    assert build_quantization_plan("qlora", device="cuda").bnb_config.bnb_4bit_compute_dtype == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 0))
    assert compute_dtype("cuda") == torch.bfloat16  # A100 and newer
    assert compute_dtype("cpu") == torch.float32
    plan = build_quantization_plan(QuantMethod.NF4, device="cuda")
    assert plan.bnb_config.bnb_4bit_compute_dtype == torch.bfloat16
    assert plan.bnb_config.bnb_4bit_use_double_quant is False


def test_int8_and_non_bnb_plans():
    assert build_quantization_plan("int8").bnb_config.load_in_8bit
    for m in ("fp32", "bitnet", "ptq_int8", "qat_int8", "switchable", "qlora_bitnet"):
        assert build_quantization_plan(m).bnb_config is None
    assert build_quantization_plan("bitnet").spec.weights_bits == 1.58


def test_run_name_format():
    name = run_name("gpt2", "codesearchnet", "SFT", "LoRa64", "qlora", 4, "bf16")
    assert name == "gpt2-codesearchnet_SFT_LoRa64_QLORA_w4_headbf16"  # the QLoRA method's own example
    assert run_name("Qwen/Qwen2.5-1.5B", "squad", "QA", None, "bitnet", 1.58, "fp16") == \
        "Qwen2.5-1.5B-squad_QA_full_BITNET_w1p58_headfp16"
    assert parse_run_name(name)["method"] == "qlora" and parse_run_name("baseline-model") is None
    with pytest.raises(QlabError, match="unknown run task 'sft'"):
        run_name("gpt2", "x", "sft", None, "fp32", 32, "fp32")


def test_metadata_round_trip(tmp_path):
    plan = build_quantization_plan("qlora", "cpu")
    write_meta(tmp_path, {"run_name": "x", "base": "gpt2", **plan.metadata()})
    doc = read_meta(tmp_path)
    assert doc["run_name"] == "x"
    assert doc["quantization"] == {"method": "qlora", "weights_bits": 4, "lm_head_dtype": "fp32",
                                   "backend": "bitsandbytes",
                                   "extras": {"base_quant_type": "nf4", "double_quant": True, "compute_dtype": "fp32",
                                              "skip_modules": ["lm_head"]}}
    assert json.loads((tmp_path / "qlab.json").read_text()) == doc


def test_metadata_corrupt_or_missing(tmp_path):
    assert read_meta(tmp_path) is None  # none written: detection falls back to the run name
    (tmp_path / "qlab.json").write_text('{"quantization": {"method": "int3"')
    with pytest.raises(QlabError, match="corrupt metadata"):
        read_meta(tmp_path)


def test_profiles_and_overrides():
    assert baseline.config("default") == baseline.Config()
    smoke = baseline.config("smoke", lr=1e-3, epochs=None)
    assert smoke.lr == 1e-3 and smoke.epochs == 1 and smoke.n_train == 64
    assert baseline.config("t4").model_id == "bert-base-uncased"
    assert baseline.config("gpu").random_init is True
    with pytest.raises(QlabError, match="unknown profile 'fast'"):
        baseline.config("fast")
    with pytest.raises(QlabError, match="unknown parameter.*learning_rate"):
        baseline.config("default", learning_rate=1.0)


def test_cuda_request_on_cpu_machine_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(QlabError, match="no CUDA GPU"):
        pick_device("cuda")
    assert pick_device("auto").type == "cpu"
    with pytest.raises(QlabError, match="gpu profile measures a CUDA GPU .* pass device=cpu"):
        pick_device("auto", "gpu")
    assert pick_device("cpu", "gpu").type == "cpu"  # the CPU rehearsal


def test_tuple_knobs_accept_a_list_or_a_comma_string():
    """papermill/CLI pass tuples as YAML lists or one string (`-p rungs a,b`): make_config makes them tuples."""
    from qlib.studies import llama_scaling, qlora_bert, switchable

    assert llama_scaling.config("smoke", rungs="llama-2m, llama-5m").rungs == ("llama-2m", "llama-5m")
    assert llama_scaling.config("smoke", methods=["qlora"]).methods == ("qlora",)
    assert qlora_bert.config("smoke", ranks="4,8").ranks == (4, 8)
    assert switchable.config("smoke", widths=["2", 8]).widths == (2, 8)
    with pytest.raises(QlabError, match="unknown rung/method"):
        llama_scaling.config("smoke", rungs="llama-2m,llama-99m")
    from qlib.studies import gpt2_bitnet

    assert gpt2_bitnet.config("smoke", ladder_calib_sources="prose,mixed").ladder_calib_sources == ("prose", "mixed")
    with pytest.raises(QlabError, match=r"ladder_calib_sources: unknown or no calibration source \['poetry'\]"):
        gpt2_bitnet.config("smoke", ladder_calib_sources="code,poetry")


@pytest.mark.parametrize("override, needle", [
    (dict(epochs=-1), "epochs must be greater than 0"),
    (dict(epochs=float("nan")), "epochs must be a finite number"),
    (dict(lr="abc"), "lr must be a finite number, got 'abc'"),
    (dict(batch_size=2.5), "batch_size must be an integer"),
    (dict(batch_size=True), "batch_size must be an integer"),
    (dict(n_eval=0), "n_eval must be at least 1"),
    (dict(seed=-1), "seed must be at least 0"),
    (dict(warmup_ratio=1.5), "warmup_ratio must be between 0 and 1"),
    (dict(random_init="yes"), "random_init must be true or false"),
])
def test_config_values_are_checked_by_type_and_range(override, needle):
    from qlib.core.errors import QlabError

    with pytest.raises(QlabError, match=needle):
        baseline.config("smoke", **override)


def test_config_accepts_what_it_should():
    from qlib.studies import qlora_bert, switchable

    assert baseline.config("smoke", epochs=1, n_eval=None).epochs == 1  # an int where a float belongs
    assert qlora_bert.config("smoke", ranks=[4, 8]).ranks == (4, 8)
    assert switchable.config("smoke", budget=0).budget == 0
