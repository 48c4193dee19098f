"""Study 05's post-training methods on the tiny LLaMA: the registry's methods beside their controls, and the
calibration ablation re-making only the calibrated methods (reference and controls reused): the evaluation set's own
mix of code and prose, fewer windows of it, and each domain alone."""
import pytest
import torch

from qlib.core.errors import QlabError
from qlib.studies import ptq_methods

pytestmark = pytest.mark.slow  # calibration methods: `make test-fast` leaves this file out


@pytest.fixture(autouse=True)
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("QLAB_ROOT", str(tmp_path))
    return tmp_path


def test_methods_and_the_calibration_ablation(tmp_path):
    spec = ptq_methods.MethodsSpec("llama-stdlib-tiny", "stdlib-code", ("rtn_w4", "gptq_w4", "gguf_q4_0_imat"),
                                   ("gptq_w4",), samples=(16, 4), calib_length=64, context=64, eval_tokens=512)
    res = ptq_methods.run_methods(spec, torch.device("cpu"), tmp_path / "out", "05_gpt2_bitnet", "smoke")
    by = {r["method"]: r for r in res.rows}
    assert list(by) == ["fp16", "rtn_w4", "gptq_w4", "gguf_f16", "gguf_q4_0", "gguf_q4_0_imat",
                        "gptq_w4@mixed4", "gptq_w4@code16", "gptq_w4@prose16"]  # reference and controls made once
    assert res.problems == []
    assert set(res.settings) == {"mixed16", "mixed4", "code16", "prose16"}
    assert res.settings["prose16"]["source"] == "prose: BBC News articles (not the evaluation set's)"
    assert res.settings["mixed16"]["source"].startswith("mixed: 12 code + 4 prose windows")
    assert res.settings["mixed16"]["samples"] == 16 and res.settings["mixed4"]["samples"] == 4
    main, prose = by["gptq_w4"], by["gptq_w4@prose16"]
    assert main["section"] == "post-training methods" and main["calibration_setting"] == "mixed16"
    assert prose["section"] == "calibration ablation" and prose["control"] == "rtn_w4"
    assert prose["calibration"]["source"].startswith("prose") and prose["kl_mean"] != main["kl_mean"]
    assert prose["kl_vs_main_calibration"] == pytest.approx(prose["kl_mean"] - main["kl_mean"], abs=1e-9)
    assert main["kl_vs_main_calibration"] is None and by["gguf_q4_0_imat"]["kl_vs_control"] is not None
    # per domain against its control: the domain's tokens only, its interval around its ratio
    dom = main["perplexity_vs_control_by_domain"]
    assert set(dom) == {"code", "prose"} and all(d["lo"] <= d["ratio"] <= d["hi"] for d in dom.values())
    assert sum(d["tokens"] for d in dom.values()) == 512 - 512 // 64
    assert by["rtn_w4"]["perplexity_vs_control_by_domain"] is None  # a control has no control
    assert set(res.nll) == set(by) and all(len(v) == 512 - 512 // 64 for v in res.nll.values())
    text = ptq_methods.findings(res.rows)
    assert "`gptq_w4@mixed4`: mean KL" in text and "`gptq_w4@prose16`: mean KL" in text
    assert "vs its control `rtn_w4`" in text and "perplexity vs its control code ×" in text and "calibration" in text


def test_calibration_sources_and_too_little_text():
    from transformers import AutoTokenizer

    from qlib.pretrain import pretrained_lm

    tok = AutoTokenizer.from_pretrained(pretrained_lm("llama-stdlib-tiny"))
    a = ptq_methods.calibration("prose", tok, "stdlib-code", 8, 32, seed=0)
    b = ptq_methods.calibration("prose", tok, "stdlib-code", 8, 32, seed=0)
    assert len(a.windows) == 8 and all(torch.equal(x, y) for x, y in zip(a.windows, b.windows))  # seeded
    m = ptq_methods.calibration("mixed", tok, "stdlib-code", 8, 32, seed=0)
    code = ptq_methods.calibration("code", tok, "stdlib-code", 6, 32, seed=0)
    prose = ptq_methods.calibration("prose", tok, "stdlib-code", 2, 32, seed=0)
    assert m.source.startswith("mixed: 6 code + 2 prose windows") and len(m.windows) == 8
    got = sorted(tuple(w.tolist()) for w in m.windows)
    assert got == sorted(tuple(w.tolist()) for w in code.windows + prose.windows)  # the evaluation set's 3 : 1
    assert [tuple(w.tolist()) for w in m.windows] != [tuple(w.tolist()) for w in code.windows + prose.windows]
    with pytest.raises(QlabError, match="unknown calibration source 'poetry'"):
        ptq_methods.calibration("poetry", tok, "stdlib-code", 8, 32, seed=0)
    with pytest.raises(QlabError, match="windows of 32 tokens, 10000000 asked for"):
        ptq_methods.calibration("code", tok, "stdlib-code", 10_000_000, 32, seed=0)
