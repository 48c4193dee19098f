"""Build, save and load the studies' models: safetensors only, atomic folders, clear errors."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qlib.assets import Resolved
from qlib.config import QlabError
from qlib.report import atomic_dir

# The true bert-base architecture, for the `gpu` profile's random-init rows (no weights travel).
BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)


def load_tokenizer(asset: Resolved) -> Any:
    """The asset's tokenizer (random-init rows use the packaged MiniLM one: the BERT uncased vocab)."""
    from transformers import AutoTokenizer

    if asset.path is None:
        from qlib.assets import minilm_dir

        return AutoTokenizer.from_pretrained(minilm_dir())
    return AutoTokenizer.from_pretrained(asset.path)


def load_classifier(asset: Resolved, num_labels: int, seed: int = 0) -> torch.nn.Module:
    """A sequence classifier on the asset's encoder (fresh head), or the true bert-base random-init."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification
    from transformers.utils import logging

    torch.manual_seed(seed)  # the new head's init is part of the run's seed
    if asset.source == "random-init":
        return BertForSequenceClassification(BertConfig(**BERT_BASE, num_labels=num_labels))
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the "classifier.* newly initialised" report is expected here
    try:
        return AutoModelForSequenceClassification.from_pretrained(asset.path, num_labels=num_labels,
                                                                  dtype=torch.float32)
    finally:
        logging.set_verbosity(verbosity)


def save_model(model: torch.nn.Module, tokenizer: Any, path: str | Path,
               metadata: dict[str, Any] | None = None) -> Path:
    """save_pretrained (model.safetensors + config.json) and tokenizer files, all-or-nothing."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if metadata is not None:
            (tmp / "qlab.json").write_text(json.dumps(metadata, indent=2, sort_keys=True))
    return Path(path)


def check_checkpoint(path: str | Path) -> Path:
    """A saved model folder must hold config.json and a readable model.safetensors."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_dir():
        raise QlabError(f"checkpoint folder not found: {p} (run notebook 01 first to create it)")
    for name in ("config.json", "model.safetensors"):
        if not (p / name).is_file():
            raise QlabError(f"checkpoint {p} is incomplete: {name} is missing")
    try:
        json.loads((p / "config.json").read_text())
        with safe_open(p / "model.safetensors", framework="pt") as f:
            for key in f.keys():
                f.get_slice(key)
    except Exception as e:
        raise QlabError(f"corrupt checkpoint {p}: {type(e).__name__}: {e}") from None
    return p


def load_saved_classifier(path: str | Path) -> tuple[torch.nn.Module, Any]:
    """Load a checkpoint written by `save_model` (verified first), with its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    p = check_checkpoint(path)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(p, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(p)
    except Exception as e:
        raise QlabError(f"cannot load checkpoint {p}: {type(e).__name__}: {e}") from None
    return model.eval(), tok
