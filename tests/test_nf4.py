"""The plain-torch NF4 oracle against bitsandbytes, value for value."""
import pytest
import torch

from qlib.quant import nf4

F = pytest.importorskip("bitsandbytes.functional")


def test_code_values_are_the_papers_sixteen_levels():
    c = nf4.NF4_CODE
    assert c.numel() == 16 and c[0] == -1 and c[-1] == 1 and (c == 0).sum() == 1
    assert torch.all(c[1:] > c[:-1])


@pytest.mark.parametrize("shape", [(384, 384), (64, 1536)])
def test_oracle_matches_bitsandbytes_bit_for_bit(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ours = nf4.quantize_nf4(w)
    assert torch.equal(state.code.float(), nf4.NF4_CODE)
    assert torch.equal(packed.reshape(-1), ours.packed)
    assert torch.equal(state.absmax, ours.absmax)
    assert torch.equal(F.dequantize_4bit(packed, state), nf4.dequantize_nf4(ours))


def test_round_trip_error_bounded_by_half_the_widest_level_gap():
    torch.manual_seed(1)
    w = torch.randn(128, 64)
    t = nf4.quantize_nf4(w)
    err = (nf4.dequantize_nf4(t) - w).abs().view(-1, 64)
    absmax = w.view(-1, 64).abs().amax(1, keepdim=True)
    gap = (nf4.NF4_CODE[1:] - nf4.NF4_CODE[:-1]).max() / 2
    assert torch.all(err <= gap * absmax + 1e-6)


def test_double_quant_bits_per_param_and_error():
    torch.manual_seed(2)
    w = torch.randn(384, 384) * 0.05
    single, dq = nf4.quantize_nf4(w), nf4.quantize_nf4(w, double_quant=True)
    assert single.bits_per_param() == pytest.approx(4.5)
    assert dq.bits_per_param() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=2e-3)
    e1 = (nf4.dequantize_nf4(single) - w).abs().mean().item()
    e2 = (nf4.dequantize_nf4(dq) - w).abs().mean().item()
    assert e2 < 1.05 * e1  # 8-bit absmax costs almost nothing
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    bnb_err = (F.dequantize_4bit(packed, state) - w).abs().mean().item()
    assert e2 == pytest.approx(bnb_err, rel=0.05)
