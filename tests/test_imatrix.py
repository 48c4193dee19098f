"""qlib's importance matrix against the file llama.cpp's own `llama-imatrix` writes for the same model and text, and
the importance-matrix GGUF methods through `formats`: made from calibration text, beside their round-to-nearest
twins, with bad input one line each."""
import subprocess

import numpy as np
import pytest
import torch

from qlib import corpus, formats_report, models
from qlib.backends import gguf
from qlib.core.errors import QlabError
from qlib.pretrain import gguf_pre_tokenizer, pretrained_lm
from qlib.quant import imatrix

pytestmark = pytest.mark.slow  # llama-imatrix and the quantizer: `make test-fast` leaves this file out

CTX = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The smoke-size Qwen2, its F16 GGUF, and calibration text (stdlib code)."""
    src = pretrained_lm("qwen2-stdlib-tiny")
    d = tmp_path_factory.mktemp("imatrix")
    f16 = gguf.convert(src, d / "f16.gguf", "f16", pre_tokenizer=gguf_pre_tokenizer(src))
    text = d / "calib.txt"
    text.write_text("\n\n".join(corpus.sft_text(f) for f in corpus.load_code_corpus()[:40]))
    return src, f16, text, d


@pytest.fixture(autouse=True)
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("QLAB_ROOT", str(tmp_path))
    return tmp_path


def test_qlib_matrix_matches_llama_imatrix(tiny):
    src, f16, text, d = tiny
    out = d / "llama-imatrix.gguf"
    r = subprocess.run([str(gguf.tool("llama-imatrix")), "-m", str(f16), "-f", str(text), "-o", str(out), "-c",
                        str(CTX), "-b", str(CTX), "--no-ppl", "-t", "2", "--chunks", "8"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = gguf.read_imatrix(out)
    # the same tokens, cut into the same chunks (llama.cpp's vocabulary; no BOS for this tokenizer)
    ids = gguf.tokenize(f16, [text.read_text()])[0]
    windows = [torch.tensor(ids[i * CTX:(i + 1) * CTX]) for i in range(8)]
    stats = imatrix.collect(models.load_causal_lm(src, None, torch.device("cpu")).eval(), windows)
    names = gguf.gguf_names(f16, sorted(stats))
    ours = {names[k]: s for k, s in stats.items()}
    assert set(ours) == set(theirs)  # every block linear, no head, as llama-imatrix collects by default
    for name, (sums, count) in theirs.items():
        assert ours[name].count == count == 8 * CTX, name
        mine, ref = ours[name].mean, sums / count
        # FP16 weights in llama.cpp vs FP32 here: the statistics agree to within float16 rounding
        np.testing.assert_allclose(mine, ref, rtol=0.02, atol=1e-3 * ref.max(), err_msg=name)
    # and qlib writes a file llama.cpp's reader takes back whole
    written = gguf.write_imatrix(stats, f16, d / "qlib-imatrix.gguf", ["calib.txt"], CTX)
    back = gguf.read_imatrix(written)
    assert set(back) == set(theirs) and all(np.allclose(back[n][0], ours[n].in_sum2, rtol=1e-6) for n in back)


def test_a_matrix_for_another_model_is_one_line(tiny):
    src, f16, _, d = tiny
    bogus = {"model.layers.99.mlp.down_proj.weight": imatrix.Stat(np.ones(8), 16)}
    with pytest.raises(QlabError, match="importance matrix does not match f16.gguf: no tensor for model.layers.99"):
        gguf.write_imatrix(bogus, f16, d / "bad.gguf", ["x"], CTX)
    wrong = {"model.layers.0.mlp.down_proj.weight": imatrix.Stat(np.ones(8), 16)}
    with pytest.raises(QlabError, match="blk.0.ffn_down.weight takes .* inputs, the matrix has 8"):
        gguf.write_imatrix(wrong, f16, d / "bad.gguf", ["x"], CTX)
    assert not list(d.glob("*bad*"))  # nothing half-written
    with pytest.raises(QlabError, match="iq2_xxs needs an importance matrix"):
        gguf.quantize(f16, d / "x.gguf", "iq2_xxs")
    with pytest.raises(QlabError, match="importance matrix file is missing"):
        gguf.quantize(f16, d / "x.gguf", "q4_0", imatrix=d / "none.gguf")


def _run(model, **kw):
    return formats_report.run(formats_report.Config(model=str(model), **{
        **dict(context=CTX, eval_tokens=512, gen_tokens=4, repeats=1, calib_samples=8, calib_length=CTX), **kw}))


def test_importance_matrix_methods_are_measured_beside_their_controls(tiny):
    src = tiny[0]
    rep = _run(src, formats=("gguf_q4_0_imat", "gguf_iq2_xxs_imat"))
    by = {r["method"]: r for r in rep.rows}
    assert list(by)[:5] == ["fp16", "gguf_f16", "gguf_q4_0", "gguf_q4_0_imat", "gguf_iq2_xxs_imat"]
    assert rep.problems == []
    imat = by["gguf_q4_0_imat"]
    assert imat["control"] == "gguf_q4_0" and imat["tensor_types"].get("Q4_0")
    assert imat["calibration"]["samples"] == 8 and imat["calibration"]["length"] == CTX
    assert imat["calibration"]["source"] == "stdlib-code's training texts: 6 code + 2 prose windows (the evaluation " \
        "set's mix)" and imat["calibration"]["imatrix_seconds"] > 0
    assert imat["kl_vs_control_lo"] <= imat["kl_vs_control"] <= imat["kl_vs_control_hi"]
    assert imat["kl_vs_control"] == pytest.approx(imat["kl_mean"] - by["gguf_q4_0"]["kl_mean"], abs=1e-9)
    # the matrix changed the rounding: same type, other bytes
    out = rep.path.parent.parent.parent.parent / "outputs" / "default" / "formats" / rep.path.parent.name
    q4 = {p.name: p.read_bytes() for p in out.glob("*Q4-0*.gguf")}
    assert len(q4) == 2 and len(set(q4.values())) == 2
    assert (out / "imatrix.gguf").is_file()
    # every row against FP16 on one scale: the runtimes agree at 16 bits far better than 4 bits do
    assert by["gguf_f16"]["kl_mean"] < by["gguf_q4_0"]["kl_mean"] / 100 and by["gguf_f16"]["top1_agreement"] == 1
    # IQ2_XXS needs rows divisible by 256: on these 64-wide ones llama.cpp falls back to IQ4_NL, which the types say
    iq2 = by["gguf_iq2_xxs_imat"]
    assert iq2["control"] is None and iq2["tensor_types"].get("IQ4_NL") and not iq2["tensor_types"].get("IQ2_XXS")
    assert by["fp16"]["kl_mean"] is None  # the reference itself


def test_no_calibration_text_is_one_line_and_the_rest_still_report(tiny, tmp_path):
    src = tiny[0]
    short = tmp_path / "short.txt"
    short.write_text("\n\n".join(corpus.sft_text(f) for f in corpus.load_code_corpus()[:3]))
    rep = _run(src, formats=("gguf_q4_0_imat", "gguf_q4_0"), text=str(short), eval_tokens=CTX * 2,
               calib_length=4096)
    assert [r["method"] for r in rep.rows] == ["fp16", "gguf_f16", "gguf_q4_0"]
    lines = [p for p in rep.problems if not p.startswith("baselines")]
    assert lines[0].startswith("calibration: not enough text for one 4096-token window")
    assert lines[1] == ("gguf_q4_0_imat: not made: needs calibration text for its importance matrix; none was given")
