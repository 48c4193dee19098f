"""QLoRA plumbing on a tiny BERT: NF4 layers, honest counts, adapter save/load and mismatch errors."""
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from qlib import adapters, metrics
from qlib.backends import bnb
from qlib.core.errors import QlabError

TINY = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=128, max_position_embeddings=64, num_labels=2)


def _saved_base(tmp_path, name="base", **over):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**{**TINY, **over}))
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qlora")
    base = adapters.load_nf4_classifier(_saved_base(tmp), 2, torch.device("cpu"))
    peft_model = adapters.add_lora(base, rank=4)
    peft_model.save_pretrained(tmp / "adapter")
    return tmp, peft_model


def test_nf4_base_counts_and_bits(trained_adapter):
    _, model = trained_adapter
    storage = bnb.nf4_storage(model)
    n_lin = 2 * 6  # 6 linears per layer; the pooler and the classifier stay full precision
    assert storage["nf4_layers"] == n_lin
    assert storage["bits_per_param"] == pytest.approx(4.127, abs=0.01)
    counts = metrics.param_counts(model)
    fp = sum(p.numel() for p in BertForSequenceClassification(BertConfig(**TINY)).parameters())
    lora = 2 * 3 * (4 * 64 + 64 * 4)  # r=4 on query, key, value of 2 layers
    head, pooler = 64 * 2 + 2, 64 * 64 + 64  # modules_to_save: trainable copies of both
    assert counts["total_params"] == fp + lora + head + pooler
    assert counts["trainable_params"] == lora + head + pooler


def test_adapter_reloads_with_plain_peft(trained_adapter, tmp_path):
    tmp, model = trained_adapter
    base = adapters.load_nf4_classifier(tmp / "base", 2, torch.device("cpu"))
    back = adapters.load_adapter(base, tmp / "adapter")
    x = {"input_ids": torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        assert torch.allclose(back(**x).logits, model.eval()(**x).logits)


def test_adapter_for_another_base_is_named(trained_adapter, tmp_path):
    tmp, _ = trained_adapter
    wider = BertForSequenceClassification(BertConfig(**{**TINY, "hidden_size": 128}))
    with pytest.raises(QlabError, match="hidden size differs"):
        adapters.check_adapter(wider, tmp / "adapter")
    shallow = BertForSequenceClassification(BertConfig(**{**TINY, "num_hidden_layers": 1}))
    with pytest.raises(QlabError, match="base does not have.*1 layers"):
        adapters.check_adapter(shallow, tmp / "adapter")
    three = BertForSequenceClassification(BertConfig(**{**TINY, "num_labels": 3}))
    with pytest.raises(QlabError, match="number of labels differs.*num_labels=3"):
        adapters.check_adapter(three, tmp / "adapter")


def test_missing_or_corrupt_adapter(tmp_path):
    base = BertForSequenceClassification(BertConfig(**TINY))
    with pytest.raises(QlabError, match="adapter_config.json is missing"):
        adapters.check_adapter(base, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad")
    with pytest.raises(QlabError, match="corrupt adapter"):
        adapters.check_adapter(base, tmp_path)
