"""Datasets: the sentence classification split every BERT study shares, code SFT texts (the stdlib corpus offline,
CodeSearchNet on the hub), and language-model chunks and loaders."""
from __future__ import annotations

import csv
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from qlib.assets import Resolved, dataset_for, resolve_data
from qlib.core.errors import QlabError
from qlib.corpus import SPLIT_SEED, load_code_corpus, sft_text, split_by_module


@dataclass
class TextClassification:
    """Texts and integer labels, split once into train / eval (held out) / calib (from train)."""

    train_texts: list[str]
    train_labels: list[int]
    eval_texts: list[str]
    eval_labels: list[int]
    label_names: list[str]
    asset: Resolved
    extra: dict[str, Any] = field(default_factory=dict)

    def provenance(self) -> dict[str, Any]:
        return {**self.asset.provenance(), "n_train": len(self.train_texts),
                "n_eval": len(self.eval_texts), "split_seed": SPLIT_SEED, **self.extra}


def _stratified_split(rows: list[tuple[str, int]], eval_frac: float) -> tuple[list, list]:
    """Shuffle each class with SPLIT_SEED and hold out the same fraction of each."""
    rng = random.Random(SPLIT_SEED)
    train, held = [], []
    for label in sorted({y for _, y in rows}):
        group = [r for r in rows if r[1] == label]
        rng.shuffle(group)
        k = round(len(group) * eval_frac)
        held += group[:k]
        train += group[k:]
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def read_mr_polarity(path: str | Path) -> list[tuple[str, int]]:
    """Rows `"1"|"-1",sentence` -> (sentence, 1|0); a malformed file is a clear error."""
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for i, rec in enumerate(csv.reader(f), 1):
            if len(rec) != 2 or rec[0] not in ("1", "-1"):
                raise QlabError(f"{path}: line {i} is not `label,sentence` with label 1/-1: {rec[:2]!r}")
            rows.append((rec[1].strip(), 1 if rec[0] == "1" else 0))
    return rows


def _subset(texts: list[str], labels: list[int], n: int | None) -> tuple[list[str], list[int]]:
    return (texts, labels) if n is None else (texts[:n], labels[:n])


def load_classification(dataset_id: str = "mr-polarity", n_train: int | None = None,
                        n_eval: int | None = None, eval_frac: float = 0.2) -> TextClassification:
    """The sentence-sentiment task: MR offline (80/20 stratified split); SST-2 from the hub or any folder of
    train/validation split files (columns `sentence` or `text`, and `label`)."""
    asset = resolve_data("classification", dataset_id)
    if asset.source in ("hub", "folder"):
        return _load_split_classification(asset, n_train, n_eval)
    train, held = _stratified_split(read_mr_polarity(asset.path), eval_frac)
    tt, tl = _subset([t for t, _ in train], [y for _, y in train], n_train)
    et, el = _subset([t for t, _ in held], [y for _, y in held], n_eval)
    return TextClassification(tt, tl, et, el, ["negative", "positive"], asset)


def _text_column(ds: Any, names: tuple[str, ...], source: str) -> str:
    """The first of `names` that the dataset has (hub and local files name the same thing differently)."""
    cols = ds["train"].column_names
    for n in names:
        if n in cols:
            return n
    raise QlabError(f"{source}: no {' or '.join(names)} column (has {', '.join(cols)})")


def _load_split_classification(asset: Resolved, n_train: int | None,
                               n_eval: int | None) -> TextClassification:
    """SST-2's own train / validation (its test labels are hidden), or a local folder's."""
    ds = dataset_for(asset, ("label",))
    col = _text_column(ds, ("sentence", "text"), asset.id)
    feature = ds["train"].features["label"]
    names = list(getattr(feature, "names", None) or ["negative", "positive"])
    tt, tl = _subset(list(ds["train"][col]), [int(y) for y in ds["train"]["label"]], n_train)
    et, el = _subset(list(ds["validation"][col]), [int(y) for y in ds["validation"]["label"]], n_eval)
    bad = sorted({y for y in tl + el if not 0 <= y < len(names)})
    if bad:
        raise QlabError(f"{asset.id}: labels {bad[:5]} outside 0..{len(names) - 1} ({', '.join(names)})")
    return TextClassification(tt, tl, et, el, names, asset)


def classification_loader(tokenizer: Any, texts: list[str], labels: list[int], batch_size: int,
                          max_length: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """Batches padded to the longest sentence in the batch (not to max_length): ~2x faster here."""
    pairs = list(zip(texts, labels))

    def collate(batch: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        enc = tokenizer([t for t, _ in batch], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        enc["labels"] = torch.tensor([y for _, y in batch])
        return dict(enc)

    gen = torch.Generator().manual_seed(seed)
    return DataLoader(pairs, batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
                      generator=gen if shuffle else None)


# ---------------------------------------------------------------- language-model data

def load_code_sft(dataset_id: str = "stdlib-code") -> tuple[list[str], list[str], Resolved]:
    """Train / validation SFT texts: the stdlib split by module offline; CodeSearchNet's own split (by
    repository) on the hub; or a local folder's split files (CodeSearchNet's columns, or `code` + `docstring`)."""
    asset = resolve_data("code", dataset_id)
    if asset.source not in ("hub", "folder"):
        train, held = split_by_module(load_code_corpus())
        return [sft_text(f) for f in train], [sft_text(f) for f in held], asset
    ds = dataset_for(asset)
    code = _text_column(ds, ("func_code_string", "code", "whole_func_string"), asset.id)
    doc = _text_column(ds, ("func_documentation_string", "docstring"), asset.id)

    def texts(split: Any) -> list[str]:
        return [f"# {d.strip().splitlines()[0] if d and d.strip() else ''}\n{c}\n"
                for d, c in zip(split[doc], split[code])]
    return texts(ds["train"]), texts(ds["validation"]), asset


def lm_chunks(tokenizer: Any, texts: list[str], context: int, max_tokens: int | None = None) -> torch.Tensor:
    """Texts joined by end-of-text and cut into [n, context] training windows (packing)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t)["input_ids"] + [eos]
        if max_tokens and len(ids) >= max_tokens:
            break
    n = len(ids) // context
    if n == 0:
        raise QlabError(f"not enough text for one {context}-token window ({len(ids)} tokens)")
    return torch.tensor(ids[: n * context]).view(n, context)


def random_token_batches(vocab_size: int, batch_size: int, seq_len: int, n_batches: int, seed: int,
                         num_labels: int = 2) -> list[dict[str, torch.Tensor]]:
    """Classification batches of random tokens: the gpu profile's data, since memory and speed do not depend
    on the text (and no tokenizer or corpus has to reach the GPU machine)."""
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen),
             "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
             "labels": torch.randint(0, num_labels, (batch_size,), generator=gen)} for _ in range(n_batches)]


def lm_loader(chunks: torch.Tensor, batch_size: int, shuffle: bool = True, seed: int = 0) -> DataLoader:
    """Batches of {"input_ids", "labels"} (labels = inputs; the model shifts them)."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(chunks, batch_size=batch_size, shuffle=shuffle, generator=gen if shuffle else None,
                      collate_fn=lambda rows: {"input_ids": torch.stack(rows), "labels": torch.stack(rows)})
