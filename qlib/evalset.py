"""The one evaluation set of the real LM (05's ladder and methods, 06's block search, 08 and `formats` score it):
windows of `context` tokens fixed once, from many stdlib modules of the code corpus's held-out split and from BBC
News articles held out of every calibration. Each window knows its domain and its group (the module or the
article it came from), so an interval resamples whole modules and articles (within each domain: the set's 3 : 1
share is fixed by construction) rather than windows of one text, and the reference model has one perplexity per
domain wherever it is scored."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from qlib import assets, corpus, data, qa
from qlib.core.errors import QlabError

DATASET_ID = "stdlib-code+bbc-news"  # the rows' `dataset` wherever the shared set is scored
PROSE_SPLIT_SEED = "bbc-eval-v1"
PROSE_EVAL_FRAC = 0.1
CODE_SHARE = 0.75  # the set holds three windows of code to one of prose (`build`'s 96 : 32)


def held_out_article(path: str) -> bool:
    """A stable tenth of BBC News articles is evaluation only; calibration never sees them."""
    h = hashlib.sha256(f"{PROSE_SPLIT_SEED}:{path}".encode()).digest()
    return int.from_bytes(h[:4], "big") / 2**32 < PROSE_EVAL_FRAC


def prose_split() -> tuple[list[str], list[tuple[str, str]]]:
    """BBC News: calibration texts (train) and (article, text) pairs held out for evaluation."""
    train: list[str] = []
    held: list[tuple[str, str]] = []
    for path, text in qa.bbc_articles(str(assets.bbc_news_wheel())):
        if held_out_article(path):
            held.append((path, text))
        else:
            train.append(text)
    return train, held


def training_tokens(tok: Any, context: int, n: int) -> torch.Tensor:
    """`n` tokens of the set's two domains' training texts, three parts code to one of prose as the set holds: what a
    count baseline (unigram, bigram) fits on to score the set."""
    train, _ = corpus.split_by_module(corpus.load_code_corpus())
    n_code = int(n * CODE_SHARE)
    code = data.lm_chunks(tok, [corpus.sft_text(f) for f in train], context, n_code).reshape(-1)[:n_code]
    return torch.cat([code, data.lm_chunks(tok, prose_split()[0], context, n - n_code).reshape(-1)[: n - n_code]])


def code_documents() -> list[tuple[str, str]]:
    """(module, text) of every held-out stdlib module: its functions as SFT examples, in corpus order."""
    _, held = corpus.split_by_module(corpus.load_code_corpus())
    by_module: dict[str, list[str]] = {}
    for f in held:
        by_module.setdefault(f.module, []).append(corpus.sft_text(f))
    return [(m, "\n".join(texts)) for m, texts in by_module.items()]


@dataclass(frozen=True)
class EvalSet:
    """Windows [n, context] of token ids with each window's domain and group."""

    ids: torch.Tensor
    domains: tuple[str, ...]
    groups: tuple[str, ...]

    @property
    def context(self) -> int:
        return int(self.ids.shape[1])

    def head(self, n: int | None) -> EvalSet:
        """The first `n` windows (None: all): the set is interleaved, so any head keeps its domains' proportions and
        draws on as many modules and articles as it can."""
        if n is None or n == len(self.groups):
            return self
        if not 1 <= n <= len(self.groups):
            raise QlabError(f"the evaluation set has {len(self.groups)} windows; {n} asked for")
        return replace(self, ids=self.ids[:n], domains=self.domains[:n], groups=self.groups[:n])

    def fingerprint(self) -> str:
        """A short hash of the token ids: two runs scored the same windows exactly when theirs agree."""
        return hashlib.sha256(self.ids.to(torch.int64).numpy().tobytes()).hexdigest()[:12]

    def select(self, domain: str) -> EvalSet:
        """The windows of one domain."""
        keep = [i for i, d in enumerate(self.domains) if d == domain]
        if not keep:
            raise QlabError(f"the evaluation set has no {domain!r} windows; domains: {sorted(set(self.domains))}")
        return replace(self, ids=self.ids[keep], domains=tuple(self.domains[i] for i in keep),
                       groups=tuple(self.groups[i] for i in keep))

    def token_groups(self) -> np.ndarray:
        """The group of every scored token (each window scores all but its first token), for interval resampling."""
        return np.repeat([f"{d}:{g}" for d, g in zip(self.domains, self.groups)], self.context - 1)

    def describe(self) -> dict[str, Any]:
        """What the set is, for metrics.json."""
        return {"context": self.context, "windows": len(self.groups), "fingerprint": self.fingerprint(),
                "resampling": "whole modules and articles, within each domain",
                "scored_tokens": len(self.groups) *
                (self.context - 1), **{d: {"windows": self.domains.count(d), "groups": len({
                    g for dd, g in zip(self.domains, self.groups) if dd == d})} for d in sorted(set(self.domains))}}


def caption(about: dict[str, Any]) -> str:
    """One line for a table's caption from `EvalSet.describe()`: which windows were scored, and what an interval
    resamples."""
    parts = [f"{about[d]['windows']} {d} windows from {about[d]['groups']} {GROUP_NAMES.get(d, 'sources')}"
             for d in ("code", "prose") if d in about]
    return (f"the shared evaluation set's first {about['windows']} windows of {about['context']} tokens "
            f"({'; '.join(parts)}; {about['scored_tokens']:,} scored tokens, fingerprint {about['fingerprint']}); "
            f"95 % intervals resample {about.get('resampling', 'whole modules and articles')}")


GROUP_NAMES = {"code": "held-out stdlib modules", "prose": "held-out BBC News articles"}


def windows(tok: Any, docs: list[tuple[str, str]], context: int, n: int,
            what: str = "the evaluation text") -> list[tuple[str, list[int]]]:
    """`n` windows of whole documents' tokens, taken in turn from each document (one from every document, then a
    second from those long enough, ...) so that as many documents as possible contribute."""
    eos = tok.eos_token_id
    cut = []
    for name, text in docs:
        ids = tok(text)["input_ids"] + [eos]
        cut.append([(name, ids[i:i + context]) for i in range(0, len(ids) - context + 1, context)])
    out: list[tuple[str, list[int]]] = []
    for rank in range(max((len(c) for c in cut), default=0)):
        out += [c[rank] for c in cut if rank < len(c)][: n - len(out)]
        if len(out) == n:
            return out
    raise QlabError(f"{what} gives {len(out)} windows of {context} tokens, {n} asked for: ask for fewer tokens "
                    "or a shorter context")


def interleave(parts: dict[str, list[Any]]) -> list[tuple[str, Any]]:
    """(domain, item) of every domain's items merged in proportion (3 code : 1 prose stays 3:1 in every head), each
    domain's own order kept."""
    keyed = [((i + 0.5) / len(items), d, item) for d, items in parts.items() for i, item in enumerate(items)]
    return [(d, item) for _, d, item in sorted(keyed, key=lambda k: k[0])]


def build(tok: Any, context: int = 256, code_windows: int = 96, prose_windows: int = 32) -> EvalSet:
    """The shared set: windows of the held-out modules and of held-out articles, interleaved in proportion."""
    by_domain = {}
    if code_windows:
        by_domain["code"] = windows(tok, code_documents(), context, code_windows, "the held-out stdlib modules")
    if prose_windows:
        by_domain["prose"] = windows(tok, prose_split()[1], context, prose_windows, "the held-out BBC articles")
    if not by_domain:
        raise QlabError("the evaluation set needs code or prose windows")
    parts = interleave(by_domain)
    return EvalSet(torch.tensor([ids for _, (_, ids) in parts]), tuple(d for d, _ in parts),
                   tuple(g for _, (g, _) in parts))


def scored(tok: Any, context: int, tokens: int) -> EvalSet:
    """The windows a study scores: the shared set's first `tokens` / `context` windows, so every study asking for as
    many tokens scores the same ones."""
    if tokens < context:
        raise QlabError(f"{tokens} evaluation tokens are fewer than one window of {context}: ask for at least "
                        f"{context} (or a shorter context)")
    return build(tok, context).head(tokens // context)
