"""Which vocabulary a folder's tokenizer files hold: a fingerprint written into the metadata beside the model, so
`inspect` can tell a foreign tokenizer of the same size (its files load, its ids mean other words) from the one
the model was saved with.

The fingerprint hashes what decides the token ids (the vocabulary, merges, added tokens, normalizer and
pre-tokenizer), canonicalised, not the file's bytes: the same tokenizer re-saved by another `tokenizers` version
(merges as "a b" strings or as pairs, keys reordered) keeps its fingerprint."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

PLAIN_FILES = ("vocab.txt", "vocab.json", "merges.txt", "tokenizer.model")  # tokenizers without tokenizer.json


def fingerprint(folder: str | Path) -> str | None:
    """sha256 of the folder's tokenizer as its ids go, or None when it holds no tokenizer files."""
    p = Path(folder)
    if (p / "tokenizer.json").is_file():
        try:
            doc = json.loads((p / "tokenizer.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # unreadable: the tokenizer check names it when it loads
        payload = _canonical(doc) if isinstance(doc, dict) else doc
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    files = [p / f for f in PLAIN_FILES if (p / f).is_file()]
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes().strip() + b"\0")
    return h.hexdigest()


def _canonical(doc: dict[str, Any]) -> dict[str, Any]:
    model = dict(doc.get("model") or {})
    if isinstance(model.get("merges"), list):
        model["merges"] = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    added = sorted((t.get("id"), t.get("content")) for t in doc.get("added_tokens") or [] if isinstance(t, dict))
    return {"model": model, "added_tokens": added, "normalizer": doc.get("normalizer"),
            "pre_tokenizer": doc.get("pre_tokenizer")}
