"""GGUF through llama.cpp's own converter and runtime, on the smoke-size GPT-2 (256 wide)."""
import shutil

import pytest
import torch

from qlib import artifacts, metrics
from qlib.backends import gguf, llama_variants
from qlib.core.errors import QlabError
from qlib.pretrain import pretrained_lm

pytestmark = pytest.mark.slow  # llama.cpp conversions: `make test-fast` leaves this file out


@pytest.fixture(scope="module")
def tiny_gpt2():
    return pretrained_lm("gpt2-stdlib-tiny")


def test_round_trip_names_shapes_types(tiny_gpt2, tmp_path):
    f32 = gguf.convert(tiny_gpt2, tmp_path / "m-f32.gguf", "f32", pre_tokenizer="gpt-2")
    tq2 = gguf.convert(tiny_gpt2, tmp_path / "m-tq2.gguf", "tq2_0", pre_tokenizer="gpt-2")
    t32, t2 = gguf.tensor_types(f32), gguf.tensor_types(tq2)
    assert t32.keys() == t2.keys()
    blocks = [f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")]
    assert all(t2[b] == "TQ2_0" and t32[b] == "F32" for b in blocks)
    assert t2["token_embd.weight"] == "F16"  # the converter keeps embeddings 16-bit for ternary types
    assert tq2.stat().st_size < f32.stat().st_size / 4


def test_llama_cpp_perplexity_matches_torch(tiny_gpt2, tmp_path):
    from transformers import AutoModelForCausalLM

    f32 = gguf.convert(tiny_gpt2, tmp_path / "m.gguf", "f32", pre_tokenizer="gpt-2")
    ids = torch.randint(0, 512, (256,), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    ours = metrics.perplexity(model, ids, context=64, stride=64)["perplexity"]
    theirs = gguf.perplexity(f32, ids.tolist(), context=64)["perplexity"]
    assert theirs == pytest.approx(ours, rel=1e-3)
    per_token_ours = metrics.token_nll(model, ids, 64, 64).double().numpy()
    per_token_theirs = gguf.token_nll(f32, ids.tolist(), 64)
    assert per_token_theirs.shape == per_token_ours.shape == (256 - 4,)  # same tokens, same order: they pair
    assert abs(per_token_theirs - per_token_ours).max() < 1e-2
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
        gguf.convert(broken, tmp_path / "y.gguf", pre_tokenizer="gpt-2")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(QlabError, match="llama.cpp cannot load"):
        gguf.perplexity(tmp_path / "missing.gguf", [1, 2, 3], context=8)


def test_bits_per_weight_read_from_the_tensors(tiny_gpt2, tmp_path):
    f32 = gguf.convert(tiny_gpt2, tmp_path / "m.gguf", "f32", pre_tokenizer="gpt-2")
    q8 = gguf.quantize(f32, tmp_path / "m-q8_0.gguf", "q8_0")
    assert gguf.bits_per_weight(f32) == {"all_tensors": 32.0, "weight_matrices": 32.0}
    # each type's own width (Q8_0: 32 int8 codes + one fp16 scale = 8.5 bits), weighted by the matrices' sizes
    width = {"Q8_0": 8.5, "F16": 16.0, "F32": 32.0}
    mats = [(kind, torch.Size(shape).numel()) for kind, shape in gguf.read_tensors(q8).values() if len(shape) == 2]
    assert {k for k, _ in mats} >= {"Q8_0"}
    expected = sum(width[k] * n for k, n in mats) / sum(n for _, n in mats)
    assert gguf.bits_per_weight(q8)["weight_matrices"] == pytest.approx(expected)
    assert gguf.bits_per_weight(q8)["all_tensors"] > gguf.bits_per_weight(q8)["weight_matrices"]  # norms stay F32


def test_tensor_table_from_the_header_matches_gguf_py(tiny_gpt2, tmp_path):
    q4 = gguf.quantize(gguf.convert(tiny_gpt2, tmp_path / "m.gguf", "f16", pre_tokenizer="gpt-2"),
                       tmp_path / "m-q4_k_m.gguf", "q4_k_m")
    ref = {t.name: t for t in gguf._reader(q4).tensors}  # gguf-py, which parses the vocabulary too
    table = gguf._table(q4)
    assert list(table) == list(ref) and len({t.type for t in table.values()}) >= 3  # mixed types: F32, Q4_K, ...
    for name, t in table.items():
        r = ref[name]
        assert (t.type, t.shape, t.n_elements, t.n_bytes) == (r.tensor_type.name, tuple(int(d) for d in r.shape),
                                                              int(r.n_elements), int(r.n_bytes)), name
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(q4.read_bytes()[:5000])  # the header ends inside the vocabulary
    with pytest.raises(QlabError, match="cut.gguf is truncated: its header ends past the end of the file"):
        gguf.read_tensors(cut)
    cut.write_bytes(q4.read_bytes()[:-1000])  # the header whole, the last tensor's bytes cut short
    with pytest.raises(QlabError, match=r"cut.gguf is truncated: tensor \S+ ends at byte [\d,]+, the file has"):
        gguf.read_tensors(cut)
    with pytest.raises(QlabError, match="cut.gguf is truncated: tensor"):  # inspect's reader names it the same way
        artifacts.verify(cut)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(QlabError, match="not a readable GGUF file"):
        gguf.bits_per_weight(tmp_path / "empty.gguf")


def test_decode_in_a_worker_process_matches_the_in_process_shape(tiny_gpt2, tmp_path):
    """The worker path (how a CPU variant is timed) returns what the in-process path does, per file."""
    f32 = gguf.convert(tiny_gpt2, tmp_path / "m.gguf", "f32", pre_tokenizer="gpt-2")
    prompt = list(range(8))
    here = gguf.decode_speeds({"m": f32}, prompt, n_new=4, repeats=2)
    there = llama_variants._decode_in_worker({"m": f32}, prompt, 4, 1, 2, "wheel")  # the wheel, in a worker
    assert llama_variants.decode_speeds({"m": f32}, prompt, 4, 1, 1).keys() == {"m"}  # the wheel, in this one
    assert here.keys() == there.keys() == {"m"}
    assert there["m"]["tokens_per_s"] > 0 and len(there["m"]["repeat_s"]) == 2
