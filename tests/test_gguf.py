"""GGUF through llama.cpp's own converter and runtime, on the smoke-size GPT-2 (256 wide)."""
import shutil

import pytest
import torch

from qlib import gguf, metrics
from qlib.config import QlabError
from qlib.pretrain import pretrained_lm


@pytest.fixture(scope="module")
def tiny_gpt2():
    return pretrained_lm("gpt2-stdlib-tiny")


def test_round_trip_names_shapes_types(tiny_gpt2, tmp_path):
    f32 = gguf.convert(tiny_gpt2, tmp_path / "m-f32.gguf", "f32", gpt2_pretokenizer=True)
    tq2 = gguf.convert(tiny_gpt2, tmp_path / "m-tq2.gguf", "tq2_0", gpt2_pretokenizer=True)
    t32, t2 = gguf.tensor_types(f32), gguf.tensor_types(tq2)
    assert t32.keys() == t2.keys()
    blocks = [f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")]
    assert all(t2[b] == "TQ2_0" and t32[b] == "F32" for b in blocks)
    assert t2["token_embd.weight"] == "F16"  # the converter keeps embeddings 16-bit for ternary types
    assert tq2.stat().st_size < f32.stat().st_size / 4


def test_llama_cpp_perplexity_matches_torch(tiny_gpt2, tmp_path):
    from transformers import AutoModelForCausalLM

    f32 = gguf.convert(tiny_gpt2, tmp_path / "m.gguf", "f32", gpt2_pretokenizer=True)
    ids = torch.randint(0, 512, (256,), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    ours = metrics.perplexity(model, ids, context=64, stride=64)["perplexity"]
    theirs = gguf.perplexity(f32, ids.tolist(), context=64)["perplexity"]
    assert theirs == pytest.approx(ours, rel=1e-3)
    assert gguf.decode_speed(f32, ids[:8].tolist(), n_new=4, repeats=1) > 0


def test_conversion_failures_are_clear_and_leave_nothing(tiny_gpt2, tmp_path):
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_gpt2, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(QlabError, match="tokenizer.json is missing"):
        gguf.convert(no_tok, tmp_path / "x.gguf")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_gpt2, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(QlabError, match="GGUF conversion .* failed"):
        gguf.convert(broken, tmp_path / "y.gguf", gpt2_pretokenizer=True)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(QlabError, match="llama.cpp cannot load"):
        gguf.perplexity(tmp_path / "missing.gguf", [1, 2, 3], context=8)
