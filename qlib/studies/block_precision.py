"""Study 06 on a real model: per-block sensitivity and a greedy mixed-precision search, post-training.

The switchable-precision models of notebook 06 train on 2 cores, so they are small; whether a per-block bit
assignment matters is measured here on SmolLM2-135M instead, with no training: every block's linears are
rounded to `low` or `high` bits (grouped symmetric integers, `qlib.quant.ladder`). Sensitivity is each block's
loss increase alone at `low` bits on calibration tokens; the greedy search lowers blocks from least to most
sensitive while the calibration loss stays within the budget. The chosen bitmap is then scored on held-out
tokens against the reference, beside controls with the same number of low blocks (the most sensitive first,
a random order) and the two uniform bitmaps, each with a paired bootstrap interval: the search carries signal
only if it beats the random order by more than the interval.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from qlib import choice, fidelity, metrics, qa, results
from qlib.quant import ladder
from qlib.studies.ptq_ladder import load_real_lm


@dataclass(frozen=True)
class BlockSearchSpec:
    """06's `block_*` parameters."""

    model_id: str = "smollm2-135m"
    dataset_id: str = "stdlib-code"
    low: int = 4
    high: int = 8
    budget: float = 0.05        # largest calibration perplexity increase over the all-`high` bitmap
    context: int = 256
    calib_tokens: int = 1024    # from the training split
    eval_tokens: int = 4096     # held out
    seed: int = 0
    qa_questions: int = 120     # held-out cloze questions scored by multiple choice per bitmap (0: skip)
    qa_max_len: int = 256


@dataclass
class BlockSearchResult:
    sensitivity: list[float]            # per block: calibration NLL increase with only that block at `low`
    chosen: list[int]                   # bits per block
    steps: list[dict[str, Any]]         # the greedy path
    rows: list[dict[str, Any]]          # chosen bitmap and controls, held out, with intervals
    nll: dict[str, np.ndarray]
    info: dict[str, Any]
    qa_rows: list[dict[str, Any]] = field(default_factory=list)   # bitmaps and baselines on the cloze questions
    qa_answers: dict[str, list[str]] = field(default_factory=dict)  # per question


class Rounder:
    """Sets each block's linears to a bit width from its saved full-precision weights."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.original = ladder.snapshot(model)
        self.layers = list(self.original)
        self.n_blocks = 1 + max(ladder.block_index(n) for n in self.layers)
        self.cache: dict[tuple[str, int], torch.Tensor] = {}

    def _rounded(self, name: str, bits: int) -> torch.Tensor:
        if (name, bits) not in self.cache:
            self.cache[name, bits] = (self.original[name] if bits >= 16
                                      else ladder.grouped_int(self.original[name], bits))
        return self.cache[name, bits]

    @torch.no_grad()
    def set(self, bitmap: list[int]) -> None:
        for name, m in ladder.block_linears(self.model):
            m.weight.copy_(self._rounded(name, bitmap[ladder.block_index(name)]))


def run_block_search(spec: BlockSearchSpec, device: torch.device) -> BlockSearchResult:
    """Sensitivity, greedy search on calibration tokens, then the chosen bitmap and its controls held out."""
    lm = load_real_lm(spec.model_id, spec.dataset_id, spec.context, spec.calib_tokens, spec.eval_tokens, device)
    calib, held = lm.train_ids[: spec.calib_tokens], lm.eval_ids
    r = Rounder(lm.model)

    def nll(ids: torch.Tensor, bitmap: list[int]) -> np.ndarray:
        r.set(bitmap)
        return lm.nll(ids, spec.context)

    n = r.n_blocks
    high, low = [spec.high] * n, [spec.low] * n
    base = nll(calib, high).mean()
    sens = [float(nll(calib, high[:b] + [spec.low] + high[b + 1:]).mean() - base)
            for b in tqdm(range(n), desc=f"sensitivity: one block at {spec.low} bits")]
    chosen, steps = list(high), []
    for b in tqdm(sorted(range(n), key=lambda b: sens[b]), desc="greedy search"):
        trial = chosen[:b] + [spec.low] + chosen[b + 1:]
        loss = float(nll(calib, trial).mean())
        ok = loss - base <= math.log1p(spec.budget)
        steps.append({"block": b, "calib_ppl_increase": math.expm1(loss - base), "kept": ok})
        if ok:
            chosen = trial
    k = sum(bits == spec.low for bits in chosen)
    worst = sorted(range(n), key=lambda b: -sens[b])[:k]
    rnd = random.Random(spec.seed).sample(range(n), k)
    bitmaps = {"reference": [32] * n, f"uniform_{spec.high}bit": high, "greedy": chosen,
               "most_sensitive_first": [spec.low if b in worst else spec.high for b in range(n)],
               "random_order": [spec.low if b in rnd else spec.high for b in range(n)],
               f"uniform_{spec.low}bit": low}
    held_nll, held_fid, reference = {}, {}, None
    for name, bm in tqdm(bitmaps.items(), desc="held-out bitmaps"):  # the reference first: KL against it
        r.set(bm)
        scores, top = lm.score(held, spec.context, reference)
        reference = reference or top
        held_nll[name], held_fid[name] = scores.nll, fidelity.summary(scores, spec.context - 1, spec.seed)
    on_qa = ("reference", "greedy", f"uniform_{spec.low}bit")
    qa_rows, answers = qa_accuracy(lm, r, {k: bitmaps[k] for k in on_qa}, spec) if spec.qa_questions else ([], {})
    r.set([32] * n)
    params = {b: sum(r.original[nm].numel() for nm in r.layers if f".layers.{b}." in nm) for b in range(n)}
    rows = [{**_row(name, bm, held_nll, params, spec), **held_fid[name]} for name, bm in bitmaps.items()]
    info = {"model": lm.asset.provenance(), "data": lm.data_asset.provenance(), "blocks": n,
            "calib_tokens": int(calib.numel()), "eval_tokens": int(held.numel()), "low_blocks": k,
            "calib_nll_all_high": float(base)}
    return BlockSearchResult(sens, chosen, steps, rows, held_nll, info, qa_rows, answers)


def qa_accuracy(lm: Any, r: Rounder, bitmaps: dict[str, list[int]],
                spec: BlockSearchSpec) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """The bitmaps on 06's held-out cloze questions (multiple choice, a seeded sample), beside the most frequent
    training answer and the heuristic; each row with paired intervals against the majority and the reference."""
    train, held, _ = qa.load_qa("stdlib-cloze")
    max_len = min(spec.qa_max_len, getattr(lm.model.config, "max_position_embeddings", spec.qa_max_len))
    pairs = [(ex, it) for ex in held if (it := choice.encode_cloze(ex, lm.tok, max_len)) is not None]
    if not pairs:
        return [], {}
    pick = sorted(random.Random(spec.seed).sample(range(len(pairs)), min(spec.qa_questions, len(pairs))))
    exs, prompts = [pairs[i][0] for i in pick], [pairs[i][1][0] for i in pick]
    answers = {"id": [ex.id for ex in exs], "answer": [ex.answer for ex in exs],
               "baseline_majority": qa.majority_choices(train, exs), "baseline_heuristic": qa.heuristic_preds(exs)}
    for name, bm in tqdm(bitmaps.items(), desc=f"cloze questions ({len(exs)}) per bitmap"):
        r.set(bm)
        answers[name] = choice.choose(lm.model, lm.tok, exs, prompts, lm.device)
    rows = []
    for name in [*bitmaps, "baseline_majority", "baseline_heuristic"]:
        row = {"bitmap_name": name, "accuracy": choice.accuracy(exs, answers[name]), "n": len(exs),
               "chance": qa.chance_accuracy(exs)}
        metrics.with_difference(row, "accuracy_diff_vs_majority", None if name == "baseline_majority" else
                                choice.versus(exs, answers["baseline_majority"], answers[name], spec.seed))
        rows.append(metrics.with_difference(row, "accuracy_diff_vs_reference", None if name == "reference" else
                                            choice.versus(exs, answers["reference"], answers[name], spec.seed)))
    return rows, answers


def _row(name: str, bitmap: list[int], held: dict[str, np.ndarray], params: dict[int, int],
         spec: BlockSearchSpec) -> dict[str, Any]:
    """One bitmap held out: perplexity ratio to the reference and to the random-order control (paired)."""
    block = spec.context - 1
    total = sum(params.values())
    vs_ref = None if name == "reference" else metrics.perplexity_ratio(held["reference"], held[name], block, spec.seed)
    vs_rnd = metrics.perplexity_ratio(held["random_order"], held[name], block, spec.seed) \
        if name in ("greedy", "most_sensitive_first") else None
    row = {"bitmap_name": name, "bitmap": ",".join(map(str, bitmap)),
           "avg_bits": sum(min(bits, 32) * params[b] for b, bits in enumerate(bitmap)) / total,
           "perplexity": float(np.exp(held[name].mean()))}
    metrics.with_difference(row, "perplexity_ratio", vs_ref, value="ratio")
    return metrics.with_difference(row, "vs_random_order", vs_rnd, value="ratio")


def findings(res: BlockSearchResult, spec: BlockSearchSpec) -> str:
    """Markdown: what the search chose and whether it beats the controls by more than their intervals."""
    by = {r["bitmap_name"]: r for r in res.rows}
    g, worst = by["greedy"], by["most_sensitive_first"]
    pct = lambda x: f"{100 * (x - 1):+.1f} %"  # noqa: E731
    order = sorted(range(len(res.sensitivity)), key=lambda b: -res.sensitivity[b])
    lines = [f"- {res.info['model']['id']}, {res.info['blocks']} blocks, {spec.low} or {spec.high} bits per block "
             f"(grouped int, no training); most sensitive blocks at {spec.low} bits: {order[:3]}, least: {order[-3:]}.",
             f"- Greedy search (calibration budget {100 * spec.budget:.0f} % over all-{spec.high}-bit) put "
             f"{res.info['low_blocks']} of {res.info['blocks']} blocks at {spec.low} bits: {g['avg_bits']:.2f} bits on "
             f"average in the blocks."]
    for r in res.rows[1:]:
        lines.append(f"- `{r['bitmap_name']}` ({r['avg_bits']:.2f} bits): held-out perplexity {r['perplexity']:.2f}, "
                     f"{pct(r['perplexity_ratio'])} [{pct(r['perplexity_ratio_lo'])}, {pct(r['perplexity_ratio_hi'])}] "
                     f"vs the reference; mean KL {r['kl_mean']:.3g} [{r['kl_mean_lo']:.3g}, {r['kl_mean_hi']:.3g}], "
                     f"same top-1 token {100 * r['top1_agreement']:.1f} %.")
    if res.info["low_blocks"]:
        verdict = "beats" if g["vs_random_order_real"] and g["vs_random_order"] < 1 else "does not beat"
        lines.append(f"- At the same number of {spec.low}-bit blocks, greedy vs random order: "
                     f"{pct(g['vs_random_order'])} [{pct(g['vs_random_order_lo'])}, {pct(g['vs_random_order_hi'])}] "
                     f"— the search {verdict} chance by more than the interval; most-sensitive-first vs random: "
                     f"{pct(worst['vs_random_order'])} [{pct(worst['vs_random_order_lo'])}, "
                     f"{pct(worst['vs_random_order_hi'])}].")
    return "\n".join(lines + qa_lines(res))


def qa_lines(res: BlockSearchResult) -> list[str]:
    """Markdown: the bitmaps on the cloze questions against the constant answer and the reference."""
    if not res.qa_rows:
        return []
    by = {r["bitmap_name"]: r for r in res.qa_rows}
    pt = results.points_interval
    ref, maj, heur = by["reference"], by["baseline_majority"], by["baseline_heuristic"]
    lines = [f"- Cloze questions ({ref['n']} held out, multiple choice over the context's parameters): chance "
             f"{ref['chance']:.3f}, most frequent training answer {maj['accuracy']:.3f}, heuristic "
             f"{heur['accuracy']:.3f}; the reference reads the code: {ref['accuracy']:.3f}, "
             f"{pt(ref, 'accuracy_diff_vs_majority')} over the constant answer."]
    for r in res.qa_rows[1:]:
        if not r["bitmap_name"].startswith("baseline_"):
            lines.append(f"- `{r['bitmap_name']}` on the questions: {r['accuracy']:.3f}, "
                         f"{pt(r, 'accuracy_diff_vs_reference')} vs the reference, "
                         f"{pt(r, 'accuracy_diff_vs_majority')} vs the constant answer.")
    return lines
