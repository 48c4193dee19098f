"""BitNet b1.58: ternary weights, absmean scale, 8-bit activations, STE, packing round trips."""
import pytest
import torch

from qlib.quant import bitnet


def test_weights_are_ternary_with_absmean_scale():
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    codes, scale = bitnet.quantize_weights(w)
    assert set(codes.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert scale == pytest.approx(w.abs().mean().item())
    assert torch.equal(codes, (w / scale).round().clamp(-1, 1))
    # about a third of N(0,1) weights fall within half a scale of zero
    assert 0.2 < (codes == 0).float().mean() < 0.5


def test_activation_quantization_range_and_levels():
    x = torch.tensor([[0.5, -2.0, 1.0, 0.01], [100.0, 1.0, -50.0, 0.0]])
    q = bitnet.quantize_activations(x)
    step = x.abs().amax(-1, keepdim=True) / 127
    levels = q / step
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # on the 8-bit grid of each token
    assert levels.abs().max() <= 127 + 1e-4
    assert torch.allclose(q[:, :3], x[:, :3], atol=step.max().item() / 2 + 1e-6)


def test_ste_gradient_is_identity():
    torch.manual_seed(0)
    lin = bitnet.BitLinear(8, 4, bias=False)
    x = torch.randn(3, 8, requires_grad=True)
    lin(x).sum().backward()
    codes, scale = bitnet.quantize_weights(lin.weight.detach())
    xq = bitnet.quantize_activations(x.detach())
    # d/dW of sum(xq @ Wq^T) with STE = sum over batch of xq (broadcast to every output row)
    assert torch.allclose(lin.weight.grad, xq.sum(0).expand(4, 8), atol=1e-5)
    assert torch.allclose(x.grad, (codes * scale).sum(0).expand(3, 8), atol=1e-5)


def test_bitlinear_from_gpt2_conv1d_matches_layout():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(12, 8)  # nf=12 outputs, nx=8 inputs; weight is 8 x 12
    bl = bitnet.BitLinear.from_linear(conv)
    assert bl.weight.shape == (12, 8)
    x = torch.randn(2, 8)
    codes, scale = bitnet.quantize_weights(conv.weight.t())
    ref = bitnet.quantize_activations(x) @ (codes * scale).t() + conv.bias
    assert torch.allclose(bl(x), ref, atol=1e-5)


def test_to_bitnet_replaces_block_linears_but_not_the_head():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    assert bitnet.to_bitnet(model) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj per block
    assert not isinstance(model.lm_head, bitnet.BitLinear)
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 50)


@pytest.mark.parametrize("n", [1, 4, 5, 97, 1000])
def test_packing_round_trips_exactly(n):
    codes = torch.randint(-1, 2, (n,), generator=torch.Generator().manual_seed(n)).to(torch.int8)
    assert torch.equal(bitnet.unpack_2bit(bitnet.pack_2bit(codes), n), codes)
    assert torch.equal(bitnet.unpack_base3(bitnet.pack_base3(codes), n), codes)


def test_packing_stays_on_the_codes_device():
    """A model trained on CUDA packs its codes there: no CPU-only constant may sneak in ('meta' stands in)."""
    codes = torch.zeros(1000, dtype=torch.int8, device="meta")
    assert bitnet.pack_base3(codes).device.type == "meta" and bitnet.pack_2bit(codes).device.type == "meta"
    assert bitnet.unpack_base3(torch.zeros(200, dtype=torch.uint8, device="meta"), 1000).shape == (1000,)


def test_packed_sizes():
    codes = torch.zeros(64 * 1000, dtype=torch.int8)
    p2, p3 = bitnet.pack_2bit(codes), bitnet.pack_base3(codes)
    assert p2.numel() == 16000 and p3.numel() == 12800
    assert bitnet.packed_bits_per_weight(p3, codes.numel()) == pytest.approx(1.6, abs=1e-3)
    assert bitnet.packed_bits_per_weight(p2, codes.numel()) == pytest.approx(2.0, abs=1e-3)


def test_packed_model_gives_identical_logits(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2)  # tied lm_head
    model = GPT2LMHeadModel(cfg).eval()
    bitnet.to_bitnet(model)
    x = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        trained_form = model(input_ids=x).logits
        assert bitnet.freeze_ternary(model) == 8
        frozen = model(input_ids=x).logits
    assert torch.equal(trained_form, frozen)
    save_file(bitnet.ternary_state(model), tmp_path / "ternary.safetensors")
    fresh = GPT2LMHeadModel(cfg).eval()
    bitnet.to_bitnet(fresh)
    bitnet.freeze_ternary(fresh)  # skeleton: its own (different) codes, overwritten by the load
    bitnet.load_ternary_state(fresh, load_file(tmp_path / "ternary.safetensors"))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=x).logits, frozen)
    assert "lm_head.weight" not in load_file(tmp_path / "ternary.safetensors")  # tied: stored once
    other = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    bitnet.to_bitnet(other)
    bitnet.freeze_ternary(other)
    with pytest.raises(ValueError, match="does not fit"):
        bitnet.load_ternary_state(other, load_file(tmp_path / "ternary.safetensors"))


def test_study_05_counts_what_each_regime_quantized():
    from transformers import GPT2Config, GPT2LMHeadModel

    from qlib.models import layer_kinds

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    assert layer_kinds(model) == {"Conv1D": 8, "Linear": 1}  # the head is a Linear
    bitnet.to_bitnet(model)
    assert layer_kinds(model) == {"Linear": 1, "BitLinear": 8}


def test_05_regimes_are_paired_with_fp32_and_their_controls():
    """Every regime's perplexity ratio to FP32 and to its control comes from the same tokens' losses."""
    import numpy as np

    from qlib.studies import gpt2_bitnet

    rng = np.random.default_rng(0)
    base = rng.exponential(2.0, 640)
    nll = {"fp32": base, "lora": base + 0.01, "qlora": base + 0.11, "bitnet_ptq": base + 3.0, "bitnet": base + 0.5}
    rows = [{"method": m} for m in nll]
    cfg = gpt2_bitnet.config("smoke")
    gpt2_bitnet.paired_differences(rows, nll, cfg)
    by = {r["method"]: r for r in rows}
    assert by["fp32"]["perplexity_ratio_vs_fp32"] is None and by["fp32"]["control"] is None
    assert by["qlora"]["control"] == "lora" and by["bitnet"]["control"] == "bitnet_ptq"
    assert by["qlora"]["perplexity_ratio_vs_control"] == pytest.approx(np.exp(0.10))
    assert by["bitnet"]["perplexity_ratio_vs_control"] == pytest.approx(np.exp(-2.5))
    assert by["bitnet"]["perplexity_ratio_vs_control_real"] and by["qlora"]["perplexity_ratio_vs_fp32_real"]
    assert by["lora"]["perplexity_ratio_vs_control"] is None  # lora is a control, not a regime with one


def test_05_regimes_train_on_the_same_batches_in_the_same_order(monkeypatch):
    """Adding a regime must not change another's data: each training restarts the loader's shuffle."""
    from qlib import data
    from qlib.studies import gpt2_bitnet
    from qlib.train import TrainResult

    seen = []

    def fake_finetune(model, loader, epochs, lr, device, **kw):
        seen.append(torch.cat([b["input_ids"] for b in loader]))
        return TrainResult()
    monkeypatch.setattr(gpt2_bitnet, "finetune", fake_finetune)
    loader = data.lm_loader(torch.arange(40).reshape(10, 4), 2, seed=0)
    cfg = gpt2_bitnet.config("smoke")
    for name in ("lora", "qlora"):
        gpt2_bitnet._train(name, torch.nn.Linear(1, 1), loader, cfg, 1e-3, torch.device("cpu"))
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], torch.arange(40).reshape(10, 4))


def test_05_seed_spread_pairs_each_seed_with_its_own_reference():
    import numpy as np

    from qlib.studies import gpt2_bitnet

    base = np.full(64, 2.0)
    nll = {0: {"fp32": base, "lora": base + 0.01, "qlora": base + 0.03, "int8": base},
           1: {"fp32": base + 0.2, "lora": base + 0.23, "qlora": base + 0.24}}
    rows = [{"method": m} for m in ("fp32", "int8", "lora", "qlora")]
    gpt2_bitnet.seed_spread(rows, nll)
    by = {r["method"]: r for r in rows}
    assert "n_seeds" not in by["int8"]  # not retrained per seed: no spread claimed
    assert by["fp32"]["perplexity_seed_values"] == pytest.approx([np.exp(2.0), np.exp(2.2)])
    assert by["qlora"]["perplexity_change_vs_fp32_seed_values"] == pytest.approx([np.expm1(0.03), np.expm1(0.04)])
    assert by["qlora"]["perplexity_change_vs_control_seed_values"] == pytest.approx([np.expm1(0.02), np.expm1(0.01)])
    assert "perplexity_change_vs_control_seed_mean" not in by["lora"]


def test_bitlinear_keeps_the_layer_dtype_and_device():
    """A model converted where it lives stays there: BitLinears were made on the CPU in fp32 whatever the layer
    was, and 05's gpu profile failed on an H200 with weights on the CPU and activations on the GPU."""
    lin = torch.nn.Linear(8, 4).to(torch.bfloat16)
    b = bitnet.BitLinear.from_linear(lin)
    assert (b.weight.dtype, b.weight.device, b.bias.dtype) == (torch.bfloat16, lin.weight.device, torch.bfloat16)
    assert torch.equal(b.weight, lin.weight)
    with torch.device("meta"):
        meta = torch.nn.Linear(8, 4)
    assert bitnet.BitLinear.from_linear(meta).weight.device.type == "meta"
