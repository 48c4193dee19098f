"""PTQ INT8 (torch.ao + ONNX Runtime) on a tiny BERT: what gets quantized, error bounds, safe reload."""
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from qlib.backends import onnx
from qlib.core.errors import QlabError
from qlib.quant import ptq

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64, num_labels=2)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**TINY)).eval()


def _batch(n=4, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 100, (n, seq), generator=g),
            "attention_mask": torch.ones(n, seq, dtype=torch.long),
            "token_type_ids": torch.zeros(n, seq, dtype=torch.long)}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_dynamic_quantizes_every_linear_and_embedding(tiny):
    q = ptq.dynamic_int8(tiny)
    n_lin = sum(type(m) is nn.Linear for m in tiny.modules())
    assert ptq.count_quantized(q) == {"linear_dynamic": n_lin, "linear_static": 0, "embedding": 3,
                                      "linear_fp32": 0}
    assert sum(type(m) is nn.Linear for m in tiny.modules()) == n_lin  # the original is untouched
    b = _batch()
    err = (_logits(q, b) - _logits(tiny, b)).abs().max()
    assert 0 < err < 0.05 * _logits(tiny, b).abs().max() + 1e-3


def test_static_quantizes_linears_with_calibrated_activations(tiny):
    q = ptq.static_int8(tiny, [_batch(seed=s) for s in range(3)])
    counts = ptq.count_quantized(q)
    assert counts["linear_static"] == sum(type(m) is nn.Linear for m in tiny.modules())
    assert counts["linear_fp32"] == 0
    b = _batch(seed=9)
    assert torch.allclose(_logits(q, b), _logits(tiny, b), atol=0.1)
    with pytest.raises(QlabError, match="at least one calibration batch"):
        ptq.static_int8(tiny, [])


def test_per_channel_beats_per_tensor_on_a_skewed_matrix():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(64, 64))
    with torch.no_grad():
        lin[0].weight.mul_(torch.logspace(-3, 0, 64).unsqueeze(1))  # rows of very different scale
    x = torch.randn(32, 64)
    ref = lin(x)
    w_err, out_err = {}, {}
    for pc in (True, False):
        q = ptq.dynamic_int8(lin, per_channel=pc, embeddings=False)
        w_err[pc] = (q[0].weight().dequantize() - lin[0].weight).pow(2).mean().item()
        out_err[pc] = (q(x) - ref).pow(2).mean().item()
    assert w_err[True] < w_err[False] / 10  # small rows keep their precision with their own scale
    assert out_err[True] < out_err[False]


def test_save_load_weights_only_round_trip(tiny, tmp_path):
    q = ptq.dynamic_int8(tiny)
    path = ptq.save_quantized(q, tmp_path / "ptq_int8_model.pt")
    state = torch.load(path, weights_only=True)  # the safe loader accepts it
    assert any("_packed_params" in k for k in state)
    skeleton = ptq.dynamic_int8(BertForSequenceClassification(BertConfig(**TINY)))
    back = ptq.load_quantized(path, skeleton)
    b = _batch()
    assert torch.equal(_logits(back, b), _logits(q, b))


def test_corrupt_or_mismatched_checkpoint_is_a_clear_error(tiny, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(QlabError, match="cannot load"):
        ptq.load_quantized(bad, ptq.dynamic_int8(tiny))
    with pytest.raises(QlabError, match="not found"):
        ptq.load_quantized(tmp_path / "missing.pt", ptq.dynamic_int8(tiny))
    other = BertForSequenceClassification(BertConfig(**{**TINY, "hidden_size": 64}))
    path = ptq.save_quantized(ptq.dynamic_int8(other), tmp_path / "other.pt")
    with pytest.raises(QlabError, match="size mismatch"):
        ptq.load_quantized(path, ptq.dynamic_int8(tiny))


def test_onnx_runtime_int8_matches_torch(tiny, tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # ORT's static quantizer writes scratch files to the cwd unless confined
    b = _batch()
    f32 = onnx.export_onnx(tiny, b, tmp_path / "m.onnx")
    ref = _logits(tiny, b)
    assert torch.allclose(onnx.OrtClassifier(f32)(**b).logits, ref, atol=1e-4)
    dyn = onnx.ort_quantize_dynamic(f32, tmp_path / "dyn.onnx")
    sta = onnx.ort_quantize_static(f32, tmp_path / "sta.onnx",
                                     [{k: v.numpy() for k, v in _batch(seed=s).items()} for s in range(3)])
    for path in (dyn, sta):
        out = onnx.OrtClassifier(path)(**b).logits
        assert torch.allclose(out, ref, atol=0.1) and not torch.equal(out, ref)
        assert path.stat().st_size < f32.stat().st_size
    with pytest.raises(QlabError, match="cannot load"):
        onnx.OrtClassifier(tmp_path / "missing.onnx")
    assert list(work.iterdir()) == []
