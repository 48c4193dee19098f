"""Study 08's pipeline on the smoke-size Qwen2: merge equivalence, formats, GGUF round trip, bad input."""
import shutil

import pytest
import torch

from qlib import adapters, merge, models
from qlib.backends import bnb, gguf
from qlib.core.errors import QlabError
from qlib.pretrain import pretrained_lm

CPU = torch.device("cpu")
# qwen2-stdlib-tiny: vocab 512 x hidden 64 (tied), 2 layers, q/k/v with bias, MLP 128
TINY_TOTAL = 512 * 64 + 2 * (3 * (64 * 64 + 64) + 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
TINY_LORA_R4 = 2 * 4 * (4 * (64 + 64) + 3 * (64 + 128))


@pytest.fixture(scope="module")
def tiny_qwen():
    return pretrained_lm("qwen2-stdlib-tiny")


def _adapter(base, out, trained_on: str, seed: int = 0):
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    model = models.load_causal_lm(base, "qlora" if trained_on == "nf4" else None, CPU)
    peft_model = adapters.add_causal_lora(model, 4, kbit=trained_on == "nf4")
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # a trained adapter's B is non-zero; a fresh one would make the merge trivial
            torch.nn.init.normal_(p, std=0.05)
    return merge.save_adapter(peft_model, AutoTokenizer.from_pretrained(base), out, trained_on), peft_model


@pytest.mark.parametrize("trained_on", ["fp32", "nf4"])
def test_merged_logits_equal_base_plus_adapter(tiny_qwen, tmp_path, trained_on):
    adapter_dir, peft_model = _adapter(tiny_qwen, tmp_path / "adapter", trained_on)
    ids = torch.randint(0, 512, (1, 48), generator=torch.Generator().manual_seed(1))
    info = merge.merge_adapter(tiny_qwen, adapter_dir, tmp_path / "merged", trained_on, ids)
    assert info.max_abs_logit_diff_fp32 < 1e-4 and info.max_abs_logit_diff_fp16 < 2e-2
    merged = models.load_causal_lm(info.path, None, CPU).eval()
    with torch.no_grad():
        theirs = peft_model.eval()(input_ids=ids).logits.float()  # the adapter on the base it trained on
        ours = merged(input_ids=ids).logits
    # nf4: the training-time model computes in NF4 with the same dequantized weights -> same logits
    assert (ours - theirs).abs().max() < 2e-2
    assert sum(p.numel() for p in merged.parameters()) == TINY_TOTAL
    assert next(iter(merged.state_dict().values())).dtype == torch.float32  # CPU compute
    assert {"tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= {p.name for p in info.path.iterdir()}
    from safetensors import safe_open

    with safe_open(info.path / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert lora == TINY_LORA_R4


def test_missing_tokenizer_and_foreign_adapter(tiny_qwen, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter_dir, _ = _adapter(tiny_qwen, tmp_path / "adapter", "fp32")
    ids = torch.zeros(1, 8, dtype=torch.long)
    no_tok = tmp_path / "no-tok"
    shutil.copytree(tiny_qwen, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(QlabError, match="tokenizer.json missing"):
        merge.merge_adapter(no_tok, adapter_dir, tmp_path / "m1", "fp32", ids)
    foreign = tmp_path / "foreign-adapter"  # LoRA A made for a base of hidden size 96, not 64
    shutil.copytree(adapter_dir, foreign)
    state = load_file(foreign / "adapter_model.safetensors")
    save_file({k: torch.zeros(v.shape[0], 96) if ".lora_A." in k else v for k, v in state.items()},
              foreign / "adapter_model.safetensors")
    with pytest.raises(QlabError, match="adapter/base mismatch.*input size 96"):
        merge.merge_adapter(tiny_qwen, foreign, tmp_path / "m2", "fp32", ids)
    with pytest.raises(QlabError, match="unknown adapter base precision"):
        merge.merge_adapter(tiny_qwen, adapter_dir, tmp_path / "m3", "int3", ids)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(("m1", "m2", "m3", ".m"))]


def test_qwen2_tokenizer_is_the_same_in_transformers_and_llama_cpp(tiny_qwen, tmp_path):
    """transformers 5 reads any qwen2 folder with Qwen2's splitting rules: the stand-in is trained with them and
    llama.cpp is told so, and the three agree on held-out code (they disagreed on every text before)."""
    from transformers import AutoTokenizer

    from qlib import data, pretrain

    tok = AutoTokenizer.from_pretrained(tiny_qwen)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    f16 = gguf.convert(tiny_qwen, tmp_path / "m.gguf", "f16", pre_tokenizer=pretrain.gguf_pre_tokenizer(tiny_qwen))
    _, held, _ = data.load_code_sft("stdlib-code")
    got = gguf.tokenizer_agreement(f16, tok, held[:100] + ["x = 12345  \t\n\n  y", "Ünïcödé's 'll"])
    assert got == {"texts": 102, "identical": 102, "first_mismatch": None}


def test_gguf_round_trip_names_shapes_types(tiny_qwen, tmp_path):
    files = merge.export_gguf(tiny_qwen, tmp_path, pre_tokenizer="qwen2", types=("q8_0", "q4_0"))
    f16, q4 = gguf.read_tensors(files["gguf_f16"]), gguf.read_tensors(files["gguf_q4_0"])
    assert f16.keys() == q4.keys() == gguf.read_tensors(files["gguf_q8_0"]).keys()
    assert {name: shape for name, (_, shape) in f16.items()} == {name: shape for name, (_, shape) in q4.items()}
    assert f16["blk.0.ffn_up.weight"] == ("F16", (64, 128))  # GGUF lists dims fastest-first: (in, out)
    assert f16["blk.1.attn_q.bias"][0] == "F32"
    blocks = [f"blk.{i}.{n}.weight" for i in range(2)
              for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    assert all(q4[b][0] == "Q4_0" for b in blocks)
    n_weights = sum(torch.Size(shape).numel() for _, shape in f16.values())
    assert n_weights == TINY_TOTAL
    assert files["gguf_q4_0"].stat().st_size < files["gguf_f16"].stat().st_size / 2
    with pytest.raises(QlabError, match="could not quantize"):
        gguf.quantize(tiny_qwen / "config.json", tmp_path / "bad.gguf")
    with pytest.raises(QlabError, match="unknown GGUF quantization"):
        gguf.quantize(files["gguf_f16"], tmp_path / "bad.gguf", "q3_x")
    assert not list(tmp_path.glob("bad*")) and not list(tmp_path.glob(".*.tmp"))


def test_bnb_formats_reload_as_quantized(tiny_qwen, tmp_path):
    int8 = merge.save_bnb(tiny_qwen, tmp_path / "model-int8", "int8", CPU)
    nf4 = merge.save_bnb(tiny_qwen, tmp_path / "model-int4", "nf4", CPU)
    for folder, kind in (("model-int8", "Linear8bitLt"), ("model-int4", "Linear4bit")):
        reloaded = models.load_causal_lm(tmp_path / folder, None, CPU)
        assert type(reloaded.model.layers[0].mlp.up_proj).__name__ == kind
        assert (tmp_path / folder / "tokenizer.json").is_file()
    assert merge.weights_bytes(tmp_path / "model-int4") < merge.weights_bytes(tmp_path / "model-int8")
    # every block linear is 64 wide in: LLM.int8 adds one fp32 scale per output row = 32/64 bit per weight;
    # NF4 blocks of 64 add an int8 absmax (0.125 bit), plus per-layer second-level constants at this tiny size
    assert bnb.quantized_weight_bits(tmp_path / "model-int8") == pytest.approx(8 + 32 / 64, abs=0.06)
    assert 4.125 < bnb.quantized_weight_bits(tmp_path / "model-int4") < 5.0
    assert bnb.quantized_weight_bits(tiny_qwen) is None
    assert merge.stored_params(tiny_qwen) == TINY_TOTAL  # the tied output matrix stored once
    assert int8 is not None and nf4 is not None
