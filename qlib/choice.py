"""Multiple-choice scoring of a causal LM on cloze questions: the candidate whose filled-in sentence the model
finds most likely after the context, the standard zero-shot cloze score (e.g. Radford et al. 2019 on LAMBADA-
style and Winograd tasks; Trinh & Le 2018).

Every candidate is read after the same prompt (the context, cut from its end, then "Q:"), so the prompt cannot
leak the answer; for a large model the prompt runs once per question and its KV cache is shared by the
candidates, for a small one whole sequences go through in batches (the same scores). Accuracy differences are
paired (same questions) with a bootstrap interval.
"""
from __future__ import annotations

from typing import Any

import torch

from qlib import metrics
from qlib.qa import QAExample

Item = tuple[list[int], list[int]]   # prompt ids, target ids (a training loss is on the target)


def cloze_targets(ex: QAExample, tok: Any) -> list[list[int]]:
    """Each candidate's filled-in sentence and end token, in `ex.choices` order."""
    return [tok(" " + ex.filled(c))["input_ids"] + [tok.eos_token_id] for c in ex.choices]


def encode_cloze(ex: QAExample, tok: Any, max_len: int) -> Item | None:
    """Prompt (context cut from its end, then "Q:") and the gold target; None if no room for 8 context tokens."""
    tail, targets = tok("\nQ:")["input_ids"], cloze_targets(ex, tok)
    room = max_len - len(tail) - max(map(len, targets))
    if room < 8:
        return None
    return tok(ex.context)["input_ids"][:room] + tail, targets[ex.choices.index(ex.answer)]


def choose(model: Any, tok: Any, examples: list[QAExample], prompts: list[list[int]], device: torch.device,
           share_prompt: bool = True) -> list[str]:
    """Per question, the candidate with the highest summed log-probability of its target (end token included).
    `share_prompt`: run each prompt once and read the candidates from its KV cache (large models, long prompts);
    otherwise score whole sequences in padded batches (small models, where per-call overhead dominates)."""
    score = _cached_scores if share_prompt else _batched_scores
    out = []
    for ex, scores in zip(examples, score(model, tok, examples, prompts, device)):
        out.append(ex.choices[max(range(len(scores)), key=scores.__getitem__)])
    return out


@torch.no_grad()
def _cached_scores(model: Any, tok: Any, examples: list[QAExample], prompts: list[list[int]],
                   device: torch.device) -> list[list[float]]:
    result = []
    for ex, prompt in zip(examples, prompts):
        targets = cloze_targets(ex, tok)
        out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].float(), -1)
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(targets))
        n = max(map(len, targets))
        ids = torch.tensor([t + [tok.eos_token_id] * (n - len(t)) for t in targets], device=device)
        mask = torch.tensor([[1] * (len(prompt) + len(t)) + [0] * (n - len(t)) for t in targets], device=device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits.float(), -1)
        result.append([float(first[t[0]]) + float(logp[i, torch.arange(len(t) - 1), torch.tensor(t[1:])].sum())
                       for i, t in enumerate(targets)])
    return result


@torch.no_grad()
def _batched_scores(model: Any, tok: Any, examples: list[QAExample], prompts: list[list[int]],
                    device: torch.device, batch_size: int = 16) -> list[list[float]]:
    seqs = [(q, p + t, len(p)) for q, (ex, p) in enumerate(zip(examples, prompts)) for t in cloze_targets(ex, tok)]
    scores: list[float | None] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][1]))  # similar lengths together: little padding
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        n = max(len(seqs[j][1]) for j in chunk)
        ids = torch.tensor([seqs[j][1] + [tok.eos_token_id] * (n - len(seqs[j][1])) for j in chunk], device=device)
        mask = torch.tensor([[1] * len(seqs[j][1]) + [0] * (n - len(seqs[j][1])) for j in chunk], device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        for row, j in zip(logits, chunk):  # normalise only the positions that predict the target
            _, s, start = seqs[j]
            logp = torch.log_softmax(row[start - 1:len(s) - 1].float(), -1)
            scores[j] = float(logp.gather(-1, torch.tensor(s[start:], device=device)[:, None]).sum())
    result: list[list[float]] = [[] for _ in examples]
    for (q, _, _), sc in zip(seqs, scores):
        result[q].append(sc)
    return result


def accuracy(examples: list[QAExample], preds: list[str]) -> float:
    return sum(p == ex.answer for ex, p in zip(examples, preds)) / len(examples)


def versus(examples: list[QAExample], ref: list[str], preds: list[str], seed: int = 0) -> dict[str, Any]:
    """Accuracy of `preds` minus `ref`'s on the same questions, with the paired bootstrap 95 % interval."""
    idx = [[ex.choices.index(p) if p in ex.choices else -1 for ex, p in zip(examples, ps)] for ps in (ref, preds)]
    labels = [ex.choices.index(ex.answer) for ex in examples]
    return metrics.accuracy_difference(idx[0], idx[1], labels, seed=seed)
