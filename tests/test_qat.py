"""QAT: fake-quant inserted everywhere it should be, STE gradients, conversion to real INT8, reload."""
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from qlib.quant import ptq, qat
from qlib.quant.qat import load_qat
from qlib.studies.qat import save_qat

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64, num_labels=2)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 100, (4, 12), generator=g),
            "attention_mask": torch.ones(4, 12, dtype=torch.long),
            "token_type_ids": torch.zeros(4, 12, dtype=torch.long),  # as tokenizers pass them
            "labels": torch.tensor([0, 1, 0, 1])}


def test_ste_passes_gradient_inside_range_and_blocks_outside():
    g = qat.ste_check(scale=0.1)  # representable range [-12.8, 12.7]
    x = torch.linspace(-20, 20, 41)
    assert torch.equal(g, ((x >= -12.8) & (x <= 12.7)).float())


def test_prepare_train_convert_reload(tmp_path):
    torch.manual_seed(0)
    fp32 = BertForSequenceClassification(BertConfig(**TINY))
    n_lin = sum(type(m) is nn.Linear for m in fp32.modules())
    prepared = qat.prepare_qat_int8(fp32)
    # per linear: input, weight and output fake-quant (embeddings are quantized at convert)
    assert qat.fake_quant_modules(prepared) == 3 * n_lin
    opt = torch.optim.SGD(prepared.parameters(), lr=0.1)
    before = prepared.bert.encoder.layer[0].attention.self.query.module.weight.detach().clone()
    loss = prepared(**_batch()).loss
    loss.backward()
    opt.step()
    assert not torch.equal(before, prepared.bert.encoder.layer[0].attention.self.query.module.weight)
    int8 = qat.convert_qat(prepared)
    assert ptq.count_quantized(int8)["linear_static"] == n_lin
    assert ptq.count_quantized(int8)["linear_fp32"] == 0
    assert ptq.count_quantized(int8)["embedding"] == 3

    from transformers import AutoTokenizer  # any tokenizer: save_qat stores it beside the weights

    from qlib.assets import minilm_dir

    path = save_qat(int8, fp32.config, AutoTokenizer.from_pretrained(minilm_dir()), tmp_path / "qat_bert_int8", {})
    back = load_qat(path)
    b = {k: v for k, v in _batch(1).items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(back(**b).logits, int8(**b).logits)


def test_weight_fake_quant_is_rtn_ptq_untrained_and_trains_through_the_grid():
    torch.manual_seed(0)
    fp32 = BertForSequenceClassification(BertConfig(**TINY)).eval()
    original = fp32.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    q = qat.fake_quant_weights(fp32, 4)
    layers = [m for n, m in q.named_modules()
              if isinstance(m, nn.Linear) and "classifier" not in n and "pooler" not in n]
    # every encoder linear: 4 attention + 2 MLP per layer, 2 layers; pooler and classifier untouched
    assert len(layers) == 12
    assert qat.fake_quant_weight_count(q) == 2 * (4 * 32 * 32 + 2 * 32 * 64)
    w = layers[0].weight  # read through the grid: at most 15 levels per row, each a multiple of the row's scale
    scale = layers[0].parametrizations.weight.original.abs().amax(1, keepdim=True) / 7
    assert all(len(torch.unique(row)) <= 15 for row in w)
    assert torch.allclose(w / scale, torch.round(w / scale), atol=1e-4)
    assert torch.equal(q.classifier.weight, fp32.classifier.weight)
    assert not torch.equal(w, fp32.bert.encoder.layer[0].attention.self.query.weight)  # rounded: PTQ as is
    before = layers[0].parametrizations.weight.original.detach().clone()
    q.train()
    q(**_batch()).loss.backward()  # the straight-through estimator reaches the stored weights
    torch.optim.SGD(q.parameters(), lr=0.5).step()
    assert not torch.equal(before, layers[0].parametrizations.weight.original)
    assert torch.equal(fp32.bert.encoder.layer[0].attention.self.query.weight, original)  # a copy was trained
