"""`python -m qlib inspect`: each kind of artifact is verified whole, and a broken one is named, never "loads"."""
import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from qlib import adapters, artifacts
from qlib.backends import gguf
from qlib.core.errors import QlabError
from qlib.pretrain import pretrained_lm

TINY = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=128, max_position_embeddings=64, num_labels=2)


def test_an_adapter_is_checked_against_its_local_base(tmp_path):
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(**TINY)).save_pretrained(tmp_path / "base")
    BertForSequenceClassification(BertConfig(**{**TINY, "hidden_size": 128})).save_pretrained(tmp_path / "wide")
    model = adapters.add_lora(adapters.load_nf4_classifier(tmp_path / "base", 2, torch.device("cpu")), rank=4)
    model.save_pretrained(tmp_path / "adapter")
    lines = artifacts.verify(tmp_path / "adapter")
    assert "LoRA adapter r=4" in lines[0] and "matches its base" in lines[1]
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "base_model_name_or_path": str(tmp_path / "wide")}))
    with pytest.raises(QlabError, match="hidden size differs"):
        artifacts.verify(tmp_path / "adapter")
    for bad, needle in (([1, 2], "a JSON object is expected, got list"),
                        ({**cfg, "target_modules": 5}, "target_modules must be a list of module names"),
                        ({**cfg, "r": "four"}, "r must be a positive number")):
        cfg_path.write_text(json.dumps(bad))
        with pytest.raises(QlabError, match=f"corrupt .*adapter_config.json: {needle}"):
            artifacts.verify(tmp_path / "adapter")
    (tmp_path / "wide" / "config.json").write_text("{broken")  # the base's config, not the adapter's
    cfg_path.write_text(json.dumps({**cfg, "base_model_name_or_path": str(tmp_path / "wide")}))
    with pytest.raises(QlabError, match=r"corrupt .*wide/config.json"):
        artifacts.verify(tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00garbage")
    with pytest.raises(QlabError, match="corrupt adapter"):
        artifacts.verify(tmp_path / "adapter")


def test_a_truncated_gguf_is_named(tmp_path):
    f32 = gguf.convert(pretrained_lm("gpt2-stdlib-tiny"), tmp_path / "m.gguf", "f32", pre_tokenizer="gpt-2")
    line = artifacts.verify(f32)[0]
    n = len(gguf.read_tensors(f32))
    assert f"GGUF, {n} tensors (F32 {n})" in line and "whole" in line
    data = f32.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(QlabError, match=r"cut.gguf is truncated: tensor \S+ ends at byte"):
        artifacts.verify(cut)


def test_a_causal_lm_folder_loads_whole_or_is_named(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = pretrained_lm("gpt2-stdlib-tiny")
    assert "loads whole" in artifacts.verify(src)[0]
    broken = shutil.copytree(src, tmp_path / "lm")
    state = load_file(broken / "model.safetensors")
    key = next(k for k in state if k.endswith("attn.c_attn.weight"))
    state.pop(key)
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QlabError, match="does not match its config.json: missing weights"):
        artifacts.verify(broken)
    with pytest.raises(QlabError, match="not an artifact qlab knows"):
        artifacts.verify(broken / "config.json")
    state[key] = torch.full((256, 768), float("nan"))  # the right shape, every value NaN: loads, not whole
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QlabError, match="1 weight tensor.s. hold NaN or Inf .first: .*c_attn.weight"):
        artifacts.verify(broken)
    state[key] = torch.zeros(3, 3)  # a weight of another shape than config.json says
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QlabError, match="a weight's shape differs from what config.json declares"):
        artifacts.verify(broken)


def test_truncated_decoy_or_pickle_only_weights_are_one_line_and_never_unpickled(tmp_path):
    import shutil

    from qlib import formats_report, models

    src = pretrained_lm("qwen2-stdlib-tiny")
    cut = shutil.copytree(src, tmp_path / "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(QlabError, match="corrupt weights .*model.safetensors: .*truncated or not safetensors"):
        formats_report.resolve(str(cut))
    decoy = shutil.copytree(src, tmp_path / "decoy")
    (decoy / "model.safetensors").unlink()
    (decoy / "pytorch_model.bin").write_bytes(b"a pickle qlab must never load")
    (decoy / "decoy.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(QlabError, match="model.safetensors is missing .*not the pickle pytorch_model.bin"):
        formats_report.resolve(str(decoy))
    with pytest.raises(QlabError, match="cannot load a causal LM"):  # the loader itself never falls back to .bin
        models.load_causal_lm(decoy, None, torch.device("cpu"))


def test_a_classifier_adapter_on_a_plain_encoder_base_matches(tmp_path):
    """MiniLM ships as a plain BertModel: the adapter's task type, not the base's architecture, picks the head."""
    from transformers import BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(**TINY)).save_pretrained(tmp_path / "encoder")
    base = adapters.load_nf4_classifier(tmp_path / "encoder", 3, torch.device("cpu"))
    adapters.add_lora(base, rank=2).save_pretrained(tmp_path / "adapter")
    assert "matches its base" in artifacts.verify(tmp_path / "adapter")[1]


def test_a_foreign_tokenizer_of_the_same_size_is_named(tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlib import models, runmeta

    src, other = pretrained_lm("gpt2-stdlib-tiny"), pretrained_lm("qwen2-stdlib-tiny")  # both 512 tokens
    d = models.save_model(AutoModelForCausalLM.from_pretrained(src), AutoTokenizer.from_pretrained(src),
                          tmp_path / "lm", {"note": "a fine-tune"})
    assert runmeta.read_meta(d)["tokenizer_sha256"] and "loads whole" in artifacts.verify(d)[0]
    shutil.copy(other / "tokenizer.json", d / "tokenizer.json")
    with pytest.raises(QlabError, match="its tokenizer files are not the ones saved with the model"):
        artifacts.verify(d)
    bare = tmp_path / "no-tokenizer"  # a study folder saved without tokenizer files: its base's is the one
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(bare)
    info = runmeta.RunInfo("99_test", "smoke", 0, "gpt2-stdlib-tiny", str(src), "stdlib-code")
    runmeta.write_meta(bare, info.meta(bare.name, "fp32", "model", "fp32"))
    assert runmeta.read_meta(bare)["tokenizer_sha256"] == runmeta.read_meta(d)["tokenizer_sha256"]
    for f in other.glob("tokenizer*"):
        shutil.copy(f, bare / f.name)
    with pytest.raises(QlabError, match="a foreign tokenizer"):
        artifacts.verify(bare)
