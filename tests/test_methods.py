"""The registry of post-training methods: `formats` takes its list from it, orders what each method needs and its
control before it, and measures a method registered from outside qlib with no other file touched."""
import pytest
import torch

from qlib import formats, formats_report, methods, models, runmeta
from qlib.core.errors import QlabError
from qlib.core.io import atomic_dir
from qlib.pretrain import pretrained_lm


@pytest.fixture(autouse=True)
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("QLAB_ROOT", str(tmp_path))
    return tmp_path


def test_resolve_orders_needs_and_controls_and_refuses_unknown_names():
    assert methods.resolve(["gguf_q4_k_m_imat", "bnb_nf4"]) == ("fp16", "bnb_nf4", "gguf_f16", "gguf_q4_k_m",
                                                                "gguf_q4_k_m_imat")
    assert methods.get("gguf_q4_0_imat").calibration and not methods.get("gguf_q4_0").calibration
    assert methods.get("gguf_iq2_xxs_imat").control is None
    assert set(formats.VALID_FORMATS) == set(methods.REGISTRY)
    with pytest.raises(QlabError, match="unknown format.*gguf_q5; valid: fp16, bnb_int8"):
        methods.resolve(["gguf_q5"])
    with pytest.raises(QlabError, match="already registered"):
        methods.register(methods.Method("fp16", "transformers", lambda job: job.src))
    with pytest.raises(QlabError, match="runtime must be one of"):
        methods.register(methods.Method("toy", "onnx", lambda job: job.src))


def _toy_rtn(job: methods.Job):
    """A toy method: every block linear rounded to ternary per row (absmean scale), stored as FP16."""
    model = models.load_causal_lm(job.src, None, torch.device("cpu"), dtype=torch.float16)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and "layers" in name:
                scale = m.weight.abs().mean(1, keepdim=True)
                m.weight.copy_((m.weight / scale).round().clamp(-1, 1) * scale)
    name = job.info.name("PTQ", job.peft, "fp16", 1.58, "fp16", variant="toy")
    with atomic_dir(job.out / name) as tmp:
        model.save_pretrained(tmp)
        runmeta.write_meta(tmp, job.info.meta(name, "fp16", "model", "fp16", **job.meta))
    return job.out / name


def test_a_method_registered_from_outside_is_measured_by_formats(monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, "toy_ternary", methods.Method("toy_ternary", "transformers", _toy_rtn,
                                                                     control="bnb_nf4"))
    rep = formats_report.run(formats_report.Config(model=str(pretrained_lm("qwen2-stdlib-tiny")),
                                                   formats=("toy_ternary",), context=64, eval_tokens=512, gen_tokens=4,
                                                   repeats=1))
    by = {r["method"]: r for r in rep.rows}
    assert list(by)[:3] == ["fp16", "bnb_nf4", "toy_ternary"] and rep.problems == []
    toy = by["toy_ternary"]
    assert toy["perplexity"] > by["fp16"]["perplexity"] and toy["tensor_types"] == {"F16": 26}
    assert toy["kl_mean"] > by["bnb_nf4"]["kl_mean"] > 0 and toy["top1_agreement"] < 1
    assert toy["control"] == "bnb_nf4" and toy["kl_vs_control"] > 0 and toy["kl_vs_control_real"]
    assert toy["tokens_per_s"] > 0 and "toy_ternary" in rep.table
