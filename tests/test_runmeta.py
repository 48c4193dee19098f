"""Run names and the metadata beside each artifact: they round-trip, they agree or the disagreement is one line,
the loader detects each kind of artifact and rebuilds its quantization, and the QLoRA knobs reach the model."""
import json
import time
from pathlib import Path

import pytest
import torch

from qlib import adapters, artifacts, models, runmeta
from qlib.config import QuantMethod, build_quantization_plan
from qlib.core.errors import QlabError
from qlib.pretrain import pretrained_lm

pytestmark = pytest.mark.slow  # artifacts written and reloaded: `make test-fast` leaves this file out

CPU = torch.device("cpu")
INFO = runmeta.RunInfo("99_test", "smoke", 3, "org/Tiny-LM_v2", None, "stdlib-code")
KNOBS = runmeta.LoraKnobs(r=8)


def _write(folder, method, head="fp32", knobs=None, **kw):
    plan = build_quantization_plan(method, "cpu")
    bits = kw.pop("bits", plan.spec.weights_bits)
    name = INFO.name("SFT", knobs.token() if knobs else "full", method, bits, head)
    d = folder / name
    d.mkdir(parents=True)
    runmeta.write_meta(d, INFO.meta(name, plan, "model", head, knobs=knobs, weights_bits=bits, **kw))
    return d


@pytest.mark.parametrize("method", sorted({m.value for m in QuantMethod}))
def test_every_method_round_trips_through_name_and_metadata(tmp_path, method):
    d = _write(tmp_path, method, knobs=KNOBS if build_quantization_plan(method).spec.peft else None)
    name = runmeta.parse_run_name(d.name)
    assert name["method"] == method and name["task"] == "SFT" and name["stem"] == "Tiny-LM-v2-stdlib-code"
    assert name["bits"] == pytest.approx(build_quantization_plan(method).spec.weights_bits)
    det = runmeta.detect(d)
    assert (det.method, det.source) == (method, "metadata")
    meta = json.loads((d / "qlab.json").read_text())
    assert meta["quantization"]["method"] == method and meta["run_name"] == d.name
    assert (meta["seed"], meta["profile"], meta["study"]) == (3, "smoke", "99_test")
    assert meta["qlab_version"] == __import__("qlib").__version__
    (d / "qlab.json").unlink()  # no metadata: the run name alone says the method
    assert (runmeta.detect(d).method, runmeta.detect(d).source) == (method, "run name")


def test_each_knob_shows_in_the_name_and_the_metadata():
    base = runmeta.LoraKnobs(r=16)
    changed = [runmeta.LoraKnobs(r=8), runmeta.LoraKnobs(r=16, alpha=16),
               runmeta.LoraKnobs(r=16, targets="attention"), runmeta.LoraKnobs(r=16, gradient_checkpointing=True),
               runmeta.LoraKnobs(r=16, optimizer="paged_adamw_8bit"),
               runmeta.LoraKnobs(r=16, optimizer="paged_adamw_32bit"),
               runmeta.LoraKnobs(r=16, keep_lm_head_fp16=False)]
    tokens = [k.token() for k in [base, *changed]]
    assert len(set(tokens)) == len(tokens) and tokens[0] == "LoRa16a32-attnmlp"
    assert all(k.extras() != base.extras() for k in changed)
    merged = runmeta.LoraKnobs(r=16, merge_after_train=True)  # the merged copy is its own `_merged` artifact
    assert merged.extras()["merge_after_train"] and not base.extras()["merge_after_train"]
    plan = build_quantization_plan("qlora", "cpu")
    extras = INFO.meta("x", plan, "adapter", "fp32", knobs=KNOBS)["quantization"]["extras"]
    assert {"double_quant": True, "base_quant_type": "nf4", "compute_dtype": "fp32", "lora_r": 8,
            "merge_after_train": False}.items() <= extras.items()


def test_a_name_that_contradicts_its_metadata_is_one_line(tmp_path):
    d = _write(tmp_path, "qlora", knobs=KNOBS)
    meta = json.loads((d / "qlab.json").read_text())
    for key, value, needle in (("method", "nf4", "method 'qlora'"), ("weights_bits", 8, "weights_bits '4'"),
                               ("lm_head_dtype", "fp16", "head 'fp32'")):
        bad = {**meta, "quantization": {**meta["quantization"], key: value}}
        (d / "qlab.json").write_text(json.dumps(bad))
        with pytest.raises(QlabError, match=needle):
            runmeta.detect(d)
    bad = {**meta, "quantization": {**meta["quantization"], "extras": {**meta["quantization"]["extras"], "lora_r": 64}}}
    (d / "qlab.json").write_text(json.dumps(bad))
    with pytest.raises(QlabError, match="lora_r 8"):
        runmeta.detect(d)


def test_corrupt_or_unknown_metadata_is_one_line(tmp_path):
    d = _write(tmp_path, "nf4")
    (d / "qlab.json").write_text('{"quantization": {"method": "nf4"')
    with pytest.raises(QlabError, match="corrupt metadata .*qlab.json"):
        runmeta.detect(d)
    (d / "qlab.json").write_text(json.dumps({"quantization": {"method": "int3", "weights_bits": 3}}))
    with pytest.raises(QlabError, match="unknown quantization method 'int3'"):
        runmeta.detect(d)
    (d / "qlab.json").write_text(json.dumps({"quantization": {"method": "nf4"}}))
    with pytest.raises(QlabError, match="weights_bits must be a number"):
        runmeta.detect(d)
    (d / "qlab.json").write_text("[1, 2]")
    with pytest.raises(QlabError, match="a JSON object is expected"):
        runmeta.detect(d)


def test_an_artifact_failing_mid_write_leaves_nothing(tmp_path):
    from qlib.core.io import atomic_dir

    name = INFO.name("SFT", "full", "int8", 8, "fp32")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / name) as tmp:
        runmeta.write_meta(tmp, INFO.meta(name, build_quantization_plan("int8"), "model", "fp32"))
        raise RuntimeError("killed while saving the weights")
    assert list(tmp_path.iterdir()) == []


def _lm_head(model):
    return type(model.get_output_embeddings()).__name__


def test_keep_lm_head_fp16_reaches_the_model_counted(untied, tmp_path):
    n_blocks = 7 * models.load_causal_lm(untied, None, CPU).config.num_hidden_layers
    kept = models.load_causal_lm(untied, "qlora", CPU)
    quant = models.load_causal_lm(untied, "qlora", CPU, keep_lm_head=False)
    assert models.layer_kinds(kept)["Linear4bit"] == n_blocks and _lm_head(kept) == "Linear"
    assert models.layer_kinds(quant)["Linear4bit"] == n_blocks + 1 and _lm_head(quant) == "Linear4bit"
    assert runmeta.head_dtype(kept) == "fp32" and runmeta.head_dtype(quant) == "nf4"
    with pytest.raises(QlabError, match="ties its LM head to the input embeddings"):
        models.load_causal_lm(pretrained_lm("llama-stdlib-tiny"), "qlora", CPU, keep_lm_head=False)


def test_lora_knobs_reach_the_model(untied):
    from qlib.train import make_optimizer

    model = adapters.add_causal_lora(models.load_causal_lm(untied, "qlora", CPU), 4, True, "attention", True, alpha=12)
    cfg = model.peft_config["default"]
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"} and cfg.lora_alpha == 12
    assert model.base_model.model.is_gradient_checkpointing
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    h, layers = model.config.hidden_size, model.config.num_hidden_layers
    kv = model.config.num_key_value_heads * (h // model.config.num_attention_heads)
    r = 4
    assert lora == layers * r * ((h + h) + (h + kv) + (h + kv) + (h + h))  # r x (in + out) per projection
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], "paged_adamw_8bit", 1e-3, 0.0)
    assert type(opt).__name__ == "PagedAdamW8bit"
    assert make_optimizer([torch.nn.Parameter(torch.zeros(2))], "adamw_torch_fused", 1e-3, 0.0).defaults["fused"]
    with pytest.raises(QlabError, match="unknown optimizer 'sgd'"):
        make_optimizer([], "sgd", 1e-3, 0.0)
    with pytest.raises(QlabError, match="unknown LoRA target preset 'mlp'"):
        adapters.target_modules("llama", "mlp")


def _qlora_adapter(untied, tmp_path, keep=True):
    """A QLoRA adapter on the untied LLaMA saved as the studies save one: under its run name, metadata inside."""
    from qlib.core.io import atomic_dir

    k = runmeta.LoraKnobs(r=4, keep_lm_head_fp16=keep)
    plan = build_quantization_plan("qlora", CPU, keep_lm_head=keep)
    model = adapters.add_causal_lora(models.load_causal_lm(untied, "qlora", CPU, keep_lm_head=keep), 4, True)
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)  # a trained adapter: B is no longer zero
    info = runmeta.RunInfo("99_test", "smoke", 0, "llama-untied", str(untied), "stdlib-code")
    head = runmeta.head_dtype(model)
    name = info.name("SFT", k.token(), "qlora", 4, head)
    with atomic_dir(tmp_path / name) as tmp:
        model.save_pretrained(tmp)
        runmeta.write_meta(tmp, info.meta(name, plan, "adapter", head, knobs=k))
    return tmp_path / name, model.eval()


@pytest.mark.parametrize("keep", [True, False])
def test_a_qlora_adapter_loads_with_no_flags(untied, tmp_path, keep):
    d, trained = _qlora_adapter(untied, tmp_path, keep)
    assert ("headq" in d.name) is not keep and d.name.endswith("_QLORA_w4_head" + ("fp32" if keep else "nf4"))
    loaded, det = artifacts.load(d)
    assert (det.method, det.source) == ("qlora", "metadata")
    assert _lm_head(loaded.get_base_model()) == ("Linear" if keep else "Linear4bit")
    ids = torch.arange(1, 17).reshape(1, -1)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-5)
    lines = artifacts.verify(d)
    assert any("quantization: qlora, 4 bits" in x and "double_quant=True" in x for x in lines)
    assert any("seed 0" in x and "profile smoke" in x for x in lines)


def test_each_folder_kind_is_detected_and_loaded_as_made(untied, tmp_path):
    from qlib import merge

    info = runmeta.RunInfo("99_test", "smoke", 0, "llama-untied", str(untied), "stdlib-code")
    saved = {}
    for method in ("int8", "nf4"):  # saved quantized by bitsandbytes
        name = info.name("PTQ", "none", method, build_quantization_plan(method).spec.weights_bits, "fp32")
        merge.save_bnb(untied, tmp_path / name, method, CPU, info.meta(name, method, "model", "fp32"))
        saved[method] = tmp_path / name
    kinds = {"int8": "Linear8bitLt", "nf4": "Linear4bit"}
    for method, d in saved.items():
        model, det = artifacts.load(d)
        assert (det.method, det.source) == (method, "metadata") and kinds[method] in models.layer_kinds(model)
        (d / "qlab.json").unlink()  # a bitsandbytes folder from elsewhere: its config.json says it
        assert runmeta.detect(d.rename(tmp_path / f"plain-{method}")).source == "config.json"
    # a full-precision folder whose run says nf4: quantized on load with that plan
    import shutil

    name = info.name("PTQ", "none", "nf4", 4, "fp32")
    shutil.copytree(untied, tmp_path / name)
    runmeta.write_meta(tmp_path / name, info.meta(name, "nf4", "model", "fp32"))
    assert "Linear4bit" in models.layer_kinds(artifacts.load(tmp_path / name)[0])
    # a merged copy of a QLoRA run loads as stored, never re-quantized
    merged = tmp_path / (info.name("SFT", "LoRa4a8-attnmlp", "qlora", 4, "fp32") + "_merged")
    shutil.copytree(untied, merged)
    runmeta.write_meta(merged, info.meta(merged.name, "qlora", "merged", "fp32"))
    model, det = artifacts.load(merged)
    assert det.part == "merged" and "Linear4bit" not in models.layer_kinds(model)
    # saved INT8 but the metadata says nf4: one line
    bad = tmp_path / "int8-said-nf4"
    shutil.copytree(tmp_path / "plain-int8", bad)
    runmeta.write_meta(bad, info.meta("int8-said-nf4", "nf4", "model", "fp32"))
    with pytest.raises(QlabError, match="holds a bitsandbytes int8 model but its metadata says nf4"):
        artifacts.load(bad)
    # no metadata, no run name: a plain model
    assert runmeta.detect(untied).source == "nothing (plain model)"


def test_a_packed_ternary_model_and_a_gguf_are_detected(tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from qlib.backends import gguf
    from qlib.quant import bitnet

    src = pretrained_lm("gpt2-stdlib-tiny")
    model = AutoModelForCausalLM.from_pretrained(src)
    bitnet.to_bitnet(model)
    info = runmeta.RunInfo("99_test", "smoke", 0, "gpt2-stdlib-tiny", str(src), "stdlib-code")
    name = info.name("SFT", "full", "bitnet", 1.58, "fp32")
    d = tmp_path / name
    d.mkdir()
    model.config.save_pretrained(d)
    frozen = __import__("copy").deepcopy(model)
    bitnet.freeze_ternary(frozen)
    save_file(bitnet.ternary_state(frozen), d / artifacts.TERNARY_FILE)
    runmeta.write_meta(d, info.meta(name, "bitnet", "ternary", "fp32"))
    loaded, det = artifacts.load(d)
    ids = torch.arange(1, 9).reshape(1, -1)
    with torch.no_grad():
        assert det.method == "bitnet" and torch.equal(loaded(input_ids=ids).logits, frozen(input_ids=ids).logits)
    (d / "config.json").write_text("{not json")  # a damaged copy: one line, the weights untouched
    with pytest.raises(QlabError, match=r"corrupt .*config.json: "):
        artifacts.verify(d)
    meta = json.loads(runmeta.meta_path(d).read_text())
    meta["quantization"]["extras"] = ["keep_lm_head_fp16"]
    runmeta.meta_path(d).write_text(json.dumps(meta))
    with pytest.raises(QlabError, match="quantization.extras must be a JSON object, got list"):
        artifacts.verify(d)
    f = gguf.ship(gguf.convert(src, tmp_path / "x.gguf", "f32", pre_tokenizer="gpt-2"), info, "PTQ", "none", "f32")
    assert (f.name.startswith("gpt2-stdlib-tiny-stdlib-code_PTQ_none_GGUF-F32_w32_head")
            and not (tmp_path / "x.gguf").exists())
    det = runmeta.detect(f)
    assert (det.method, det.source, det.extras["type"]) == ("gguf", "metadata", "f32")
    assert any("quantization: gguf, 32" in x for x in artifacts.verify(f))
    with pytest.raises(QlabError, match="loads with llama.cpp"):
        artifacts.load(f)


def test_peak_memory_report_on_cpu_is_labelled_rss():
    from qlib.metrics import PeakMemory

    with PeakMemory("cpu") as mem:
        x = torch.ones(64, 2**20 // 4)  # 64 MiB
        time.sleep(0.05)  # held for ten of the sampler's periods: the process's lifetime peak may be higher already
        del x
    r = mem.report()
    assert r["memory"] == "cpu_rss" and "not GPU memory" in r["note"]
    assert r["rss_peak_gb"] >= r["rss_growth_peak_gb"] >= 0.05
    assert "overall_max_reserved_gb" not in r and "per_gpu" not in r


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_peak_memory_report_on_cuda_has_the_seed_shape():
    from qlib.metrics import PeakMemory

    with PeakMemory("cuda") as mem:
        x = torch.ones(64, 2**20 // 4, device="cuda")
        del x
    r = mem.report()
    assert r["memory"] == "cuda" and r["overall_max_reserved_gb"] >= r["overall_max_allocated_gb"] >= 0.06
    assert (len(r["per_gpu"]) == torch.cuda.device_count()
            and {"max_reserved_gb", "max_allocated_gb"} <= set(r["per_gpu"][0]))


def test_07_fine_tune_saves_its_adapter_under_its_run_name(untied, tmp_path, monkeypatch):
    """The 7B fine-tune's code path rehearsed on the CPU: its knobs reach the run name, the metadata and the model."""
    from qlib import assets
    from qlib.studies import llama_finetune, llama_scaling

    monkeypatch.setenv("QLAB_ROOT", str(tmp_path))
    cfg = llama_scaling.config("smoke", finetune_7b=True, model_id=str(untied), dataset_id="stdlib-code",
                                       finetune_steps=2, seq=32, device="cpu", lora_targets="attention",
                                       lora_alpha=4, keep_lm_head_fp16=False)
    res = llama_finetune.qlora_finetune(assets.resolve_model("llama-arch", str(untied)), cfg, CPU)
    d = tmp_path / "outputs" / "smoke" / "07_llama_scaling" / res["adapter"]
    assert d.name.endswith("_SFT_LoRa16a4-attn-gc-paged8-headq_QLORA_w4_headnf4")
    model, det = artifacts.load(d)
    assert det.extras["optimizer"] == "paged_adamw_8bit" and det.extras["gradient_checkpointing"] is True
    assert set(model.peft_config["default"].target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert _lm_head(model.get_base_model()) == "Linear4bit"
    assert res["peak_memory"]["memory"] == "cpu_rss" and runmeta.read_meta(d)["peak_memory"] == res["peak_memory"]


def test_04_writes_its_adapter_and_merged_model_under_run_names(tmp_path, monkeypatch):
    """Study 04 with merge_after_train: the adapter and `<name>_merged` each carry metadata; the merged model (fp32,
    dequantize-then-merge) scores as the adapter on its NF4 base, and a fresh process reloads the adapter flag-free."""
    from qlib.studies import qlora_bert

    monkeypatch.setenv("QLAB_ROOT", str(tmp_path))
    cfg = qlora_bert.config("smoke", n_seeds=1, merge_after_train=True, lora_targets="attention",
                                  optimizer="paged_adamw_32bit")
    res = qlora_bert.run(cfg)
    q = next(r for r in res.rows if r["method"] == "qlora")
    names = res.doc["artifacts"]
    assert res.adapter_dir.name == names["adapter"] and names["merged"] == names["adapter"] + "_merged"
    assert "_CLS_LoRa8a16-attn-paged32_QLORA_w4_headfp32" in names["adapter"]
    merged = res.adapter_dir.with_name(names["merged"])
    assert runmeta.detect(merged).part == "merged" and runmeta.read_meta(merged)["merged_from"] == names["adapter"]
    assert (runmeta.read_meta(res.adapter_dir)["quantization"]["extras"]["skip_modules"]
            == list(adapters.CLASSIFIER_SKIP))
    assert res.fresh["accuracy"] == q["accuracy"]
    assert abs(res.doc["merged_accuracy"] - q["accuracy"]) <= 2 / 400  # fp32 rounding of a merge: a sentence or two
    assert res.doc["peak_memory"]["qlora"]["memory"] == "cpu_rss"
    ckpts = sorted((res.adapter_dir.parent / "checkpoints" / names["adapter"]).glob("checkpoint-*"))
    assert ckpts and all(runmeta.detect(c).method == "qlora" for c in ckpts)
    assert runmeta.read_meta(ckpts[-1])["checkpoint_step"] == q["train_steps"]


def test_a_file_or_folder_in_the_way_of_a_write_is_one_line_and_is_kept(tmp_path):
    from qlib.core.errors import QlabError
    from qlib.core.io import atomic_dir, atomic_write_text

    (tmp_path / "notes").write_text("mine")
    with pytest.raises(QlabError, match="notes is a file; move it away"):
        atomic_write_text(tmp_path / "notes" / "metrics.json", "{}")
    with pytest.raises(QlabError, match="a file of that name is in the way"):
        with atomic_dir(tmp_path / "notes"):
            pass
    (tmp_path / "summary.md").mkdir()
    with pytest.raises(QlabError, match="a folder of that name is in the way"):
        atomic_write_text(tmp_path / "summary.md", "x")
    assert (tmp_path / "notes").read_text() == "mine" and (tmp_path / "summary.md").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "summary.md"]  # no temp left behind


def _staged(study, tag, files=("metrics.json",)):
    from qlib.core.paths import staged_run

    with staged_run(study, "default") as dirs:
        for stage, _ in dirs.values():
            for f in files:
                (stage / f).write_text(tag)


def test_results_and_outputs_of_a_run_replace_the_previous_together_or_not_at_all(tmp_path, monkeypatch):
    import os

    from qlib.core import paths
    from qlib.core.errors import QlabError

    monkeypatch.setenv("QLAB_ROOT", str(tmp_path))
    _staged("02_ptq", "run 1")
    res, out = tmp_path / "results" / "02_ptq", tmp_path / "outputs" / "default" / "02_ptq"
    real = os.replace

    def outputs_cannot_move(src, dst):
        if Path(src) == out:
            raise PermissionError(13, "Permission denied", str(src))
        real(src, dst)

    monkeypatch.setattr(paths.os, "replace", outputs_cannot_move)
    with pytest.raises(QlabError, match="02_ptq: the new run could not replace the previous one.*previous results and "
                                        "outputs are kept"):
        _staged("02_ptq", "run 2")
    assert (res / "metrics.json").read_text() == "run 1" and (out / "metrics.json").read_text() == "run 1"
    assert not (tmp_path / "results" / ".02_ptq.old").exists()  # nothing hidden for the next run to delete
    monkeypatch.setattr(paths.os, "replace", real)
    _staged("02_ptq", "run 3")
    assert (res / "metrics.json").read_text() == "run 3" and (out / "metrics.json").read_text() == "run 3"
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["02_ptq"]
