"""The CUDA paths: what can be checked on a CPU is checked here (dtype choice, the T4 memory cap's handling,
random-init provenance, the 7B bar); what needs a GPU is marked `cuda` and skipped with the reason."""
import pytest
import torch

from qlib import assets
from qlib.core.device import compute_dtype, t4_conditions
from qlib.core.errors import QlabError
from qlib.studies import llama_scaling

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


def test_t4_conditions_force_fp16_and_are_cuda_only(monkeypatch):
    with pytest.raises(QlabError, match="CUDA-only option .* this run is on cpu"):
        with t4_conditions("cpu"):
            pass
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))  # an H100
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"total_memory": 80 * 2**30}))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    # torch's allocator cap refuses a device without an index ("cuda"): seen on an H200
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    assert compute_dtype("cuda") == torch.bfloat16
    with t4_conditions("cuda", 15.0) as fraction:
        assert fraction == pytest.approx(15 / 80)
        assert compute_dtype("cuda") == torch.float16  # a T4 has no bf16
        assert llama_scaling.setup_for("qlora", torch.device("cuda"), 16).compute_elem == 2
    cuda0 = torch.device("cuda", 0)
    assert calls == [(pytest.approx(15 / 80), cuda0), (1.0, cuda0)]  # capped, then released
    assert compute_dtype("cuda") == torch.bfloat16


def test_setups_follow_the_device(monkeypatch):
    cpu = llama_scaling.setup_for("qlora", torch.device("cpu"), 16)
    assert (cpu.compute_elem, cpu.optimizer_bytes, cpu.rest_elem) == (4, 8, 4)  # fp32, torch AdamW
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))  # a T4
    gpu = llama_scaling.setup_for("lora", torch.device("cuda"), 16)
    assert (gpu.weight_format, gpu.compute_elem, gpu.optimizer_bytes) == ("fp16", 2, 2)  # paged 8-bit AdamW


def test_random_init_provenance_names_the_true_architecture():
    r = assets.resolve_model("llama-arch", "llama-2-7b", random_init=True)
    assert r.source == "random-init" and r.id == "meta-llama/Llama-2-7b-hf" and r.path is None


def test_7b_bar_from_rows():
    gib = 2**30
    rows = [{"rung": "llama-7b", "method": "lora", "status": "ok", "peak_mem_bytes": 13 * gib, "step_time_s": 0.5},
            {"rung": "llama-7b", "method": "qlora", "status": "ok", "peak_mem_bytes": 4.3 * gib, "step_time_s": 0.8}]
    b = llama_scaling.gpu_benchmark(rows)
    assert b["mem_ok"] and b["time_ok"] and b["qlora_peak_ok"]
    assert b["qlora_over_lora_mem"] == pytest.approx(4.3 / 13)
    rows[1]["status"] = "oom"
    assert llama_scaling.gpu_benchmark(rows)["evaluated"] is False


def test_oom_rung_is_a_row_not_a_crash(monkeypatch, tmp_path):
    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(llama_scaling, "prepare", boom)
    cfg = llama_scaling.config("smoke", rungs=("llama-2m",), methods=("qlora",))
    row = llama_scaling.measure_rung("llama-2m", "qlora", cfg, torch.device("cpu"), tmp_path)
    assert row["status"] == "oom" and "out of memory at" in row["note"] and row["predicted_peak_mem_bytes"] > 0


@pytest.mark.cuda
@needs_cuda
def test_qlora_rung_on_cuda_predicts_its_peak(tmp_path):
    cfg = llama_scaling.config("smoke", rungs=("llama-5m",), methods=("qlora",), seq=64)
    row = llama_scaling.measure_rung("llama-5m", "qlora", cfg, torch.device("cuda"), tmp_path)
    assert row["status"] == "ok" and row["peak_mem_source"] == "cuda_max_allocated"
    assert abs(row["resident_prediction_error"]) < 0.05


@pytest.mark.cuda
@needs_cuda
def test_t4_conditions_on_cuda_cap_the_allocator():
    with t4_conditions("cuda", 1.0):
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")


def test_random_init_gpt2_rows_have_null_quality(tmp_path, monkeypatch):
    """The gpu profile's path of study 05 on CPU at smoke size: true architecture, random weights."""
    from qlib.studies import gpt2_bitnet

    monkeypatch.setenv("QLAB_ROOT", str(tmp_path))
    cfg = gpt2_bitnet.config("smoke", random_init=True, regimes=["fp32", "nf4", "qlora", "bitnet"], steps=1,
                                  eval_tokens=256, gguf=True)
    res = gpt2_bitnet.run(cfg)
    assert res.doc["assets"]["model"]["source"] == "random-init"
    assert res.doc["assets"]["data"]["id"] == "random tokens"
    assert [r["method"] for r in res.rows] == ["fp32", "nf4", "qlora", "bitnet"]  # no GGUF rows: no tokenizer
    assert all(r["perplexity"] is None for r in res.rows)
    assert all(r["tokens_per_s"] > 0 and r["size_bytes"] > 0 for r in res.rows)
    # each regime's speed ratio comes from decoding interleaved with the FP32 model in the same repeats
    assert res.rows[0]["speedup_vs_fp32"] == 1.0 and all(r["speedup_vs_fp32"] > 0 for r in res.rows[1:])
    assert all(r["speedup_vs_fp32"] != r["tokens_per_s"] / res.rows[0]["tokens_per_s"] for r in res.rows[1:])
    assert all(r["speedup_vs_fp32_lo"] <= r["speedup_vs_fp32"] <= r["speedup_vs_fp32_hi"] for r in res.rows)
    # gpt2-stdlib-tiny's architecture: vocab 512, 128 positions, hidden 256, 2 blocks (head tied)
    block = 2 * 256 + (256 * 768 + 768) + (256 * 256 + 256) + 2 * 256 + (256 * 1024 + 1024) + (1024 * 256 + 256)
    fp = res.rows[0]
    assert fp["total_params"] == fp["trainable_params"] == 512 * 256 + 128 * 256 + 2 * block + 2 * 256


def test_random_init_bert_rows_compare_fp32_and_qlora(tmp_path, monkeypatch):
    """Study 04's gpu-profile path on CPU with a tiny BERT: same code, random weights and tokens."""
    from qlib.studies import qlora_bert

    monkeypatch.setenv("QLAB_ROOT", str(tmp_path))
    cfg = qlora_bert.config("gpu", random_arch="tiny", bench_steps=2, batch_size=4, seq_len=16, device="cpu")
    res = qlora_bert.run(cfg)
    fp, q = res.rows
    assert (fp["method"], q["method"]) == ("fp32", "qlora") and res.doc["assets"]["model"]["source"] == "random-init"
    assert fp["accuracy"] is None and q["accuracy"] is None
    assert fp["trainable_params"] == fp["total_params"]
    assert 0 < q["trainable_params"] < q["total_params"] and q["trainable_params"] < fp["trainable_params"] / 5
    assert q["nf4_layers"] == 2 * 6 and q["bits_per_quantized_weight"] == pytest.approx(4.127, abs=0.01)
    assert q["bits_per_param"] > 8  # the whole base as stored: the tiny BERT is mostly fp32 embeddings
    assert q["step_time_s"] > 0 and fp["peak_mem_bytes"] >= 0
    assert "Accuracy is not measured" in qlora_bert.findings(res)


def test_findings_speak_of_the_device_the_ladder_ran_on():
    """A GPU run's findings name the GPU and cuda's allocator, not the CPU's RSS; the 7B rows show their predictions."""
    gib = 2**30
    ladder = [{"rung": "llama-270m", "method": "qlora", "status": "ok", "total_params": 268e6,
               "resident_prediction_error": 0.01, "prediction_error": -0.05},
              {"rung": "llama-7b", "method": "qlora", "status": "ok", "total_params": 6.7e9,
               "peak_mem_bytes": 4.4 * gib,
               "predicted_peak_mem_bytes": 4.7 * gib, "prediction_error": 4.7 / 4.4 - 1, "step_time_s": 0.8,
               "tokens_per_s": 640.0, "fit_predicted_step_time_s": 0.9, "resident_prediction_error": 0.0}]
    doc = {"env": {"device": "cuda", "gpu": "NVIDIA H100"}, "config": {"seq": 512, "projection_seq": 512},
           "rows": ladder, "benchmark": {"evaluated": False}}
    res = llama_scaling.ScalingResult(ladder, doc, None, ladder, {}, [], llama_scaling.accounting_table(), None)
    text = llama_scaling.findings(res)
    assert "max_memory_allocated`) at 268 M params, accounting vs measurement: -5 % (qlora)" in text
    assert "RSS" not in text
    assert "7B `qlora`: peak 4.40 GiB measured, 4.70 GiB predicted by the accounting before it ran (+6.8 % off" in text
    assert ("(the small rungs' fit said 0.900), 640 tokens/s; plain bnb + peft on an H100 "
            "(docs/assets.md, reference): 4.29 GiB" in text)
