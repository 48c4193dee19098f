"""Study 06 on a real model: per-block sensitivity and a greedy mixed-precision search, post-training.

The switchable-precision models of notebook 06 train on 2 cores, so they are small; whether a per-block bit
assignment matters is measured here on SmolLM2-135M instead, with no training: every block's linears are
rounded to `low` or `high` bits (grouped symmetric integers, `qlib.quant.ladder`). Sensitivity is each block's
loss increase alone at `low` bits on calibration tokens; the greedy search lowers blocks from least to most
sensitive until the next would take the calibration loss over the budget. Sensitivity and search see only the
dev tokens (training texts of the shared set's two domains); the held-out windows of the shared evaluation set
(`evalset`) only report. There the chosen bitmap stands beside controls with the same number of low blocks (the
most sensitive first, and `random_orders` random choices: the search's percentile among them is its test against
chance) and the two uniform bitmaps, each with a paired bootstrap interval over whole modules and articles and a
Bonferroni-corrected one over the table's comparisons.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from qlib import choice, evalset, fidelity, formats, metrics, qa, replay, results
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
    calib_tokens: int = 4096    # the search's dev tokens: training texts, 3 code : 1 prose as the evaluation set
    eval_tokens: int = 4096     # the shared evaluation set's first eval_tokens / context windows: reporting only
    seed: int = 0
    qa_questions: int = 120     # held-out cloze questions scored by multiple choice per bitmap (0: skip)
    qa_max_len: int = 256
    random_orders: int = 20     # the control distribution: as many low blocks as the search's, chosen at random


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
        self.current: list[int] | None = None  # the bitmap the weights hold now


    def _rounded(self, name: str, bits: int) -> torch.Tensor:
        if (name, bits) not in self.cache:
            self.cache[name, bits] = (self.original[name] if bits >= 16
                                      else ladder.grouped_int(self.original[name], bits))
        return self.cache[name, bits]

    @torch.no_grad()
    def set(self, bitmap: list[int]) -> None:
        """Only the blocks whose width changed since the last call are rewritten."""
        was = self.current or [None] * self.n_blocks
        for name, m in ladder.block_linears(self.model):
            b = ladder.block_index(name)
            if bitmap[b] != was[b]:
                m.weight.copy_(self._rounded(name, bitmap[b]))
        self.current = list(bitmap)


class DevLoss:
    """The dev tokens' mean NLL under a bitmap, the layers before its first block that differs from the last kept
    bitmap replayed (`replay`): the search changes one block at a time."""

    def __init__(self, r: Rounder, ids: torch.Tensor, context: int):
        self.r, self.prefix, self.kept = r, replay.PrefixNLL(r.model, ids, context), None

    def __call__(self, bitmap: list[int], keep: bool = False) -> float:
        """`keep`: this bitmap is where the next call starts from."""
        self.r.set(bitmap)
        start = 0 if self.kept is None else next((b for b, (x, y) in enumerate(zip(self.kept, bitmap)) if x != y),
                                                 len(bitmap))
        nll = self.prefix.nll(start, record=keep)
        if keep:
            self.kept = list(bitmap)
        return float(nll.mean())


def run_block_search(spec: BlockSearchSpec, device: torch.device) -> BlockSearchResult:
    """Sensitivity and greedy search on the dev tokens, then the chosen bitmap and its controls held out."""
    sections = metrics.Sections()
    with sections("load"):
        lm = load_real_lm(spec.model_id, spec.dataset_id, spec.context, spec.calib_tokens, spec.eval_tokens, device)
    calib, held = lm.train_ids[: spec.calib_tokens], lm.eval_ids
    r = Rounder(lm.model)
    with sections("sensitivity and greedy search (dev)"):
        sens, chosen, steps, base = search_blocks(r, DevLoss(r, calib, spec.context), spec)
    n, k = r.n_blocks, sum(bits == spec.low for bits in chosen)
    params = {b: sum(r.original[nm].numel() for nm in r.layers if f".layers.{b}." in nm) for b in range(n)}
    with sections("random orders (held out)"):
        randoms = random_orders(r, held, n, k, spec)
    worst = sorted(range(n), key=lambda b: -sens[b])[:k]
    median = sorted(randoms, key=lambda x: x["perplexity"])[len(randoms) // 2]["bitmap"] if randoms else chosen
    bitmaps = {"reference": [32] * n, f"uniform_{spec.high}bit": [spec.high] * n, "greedy": chosen,
               "most_sensitive_first": [spec.low if b in worst else spec.high for b in range(n)],
               "random_order": median, f"uniform_{spec.low}bit": [spec.low] * n}
    groups = lm.eval_set.token_groups()
    held_nll, held_fid, reference = {}, {}, None
    with sections("held-out bitmaps"):
        for name, bm in tqdm(bitmaps.items(), desc="held-out bitmaps"):  # the reference first: KL against it
            r.set(bm)
            scores, top = lm.score(held, spec.context, reference)
            reference = reference or top
            held_nll[name], held_fid[name] = scores.nll, fidelity.summary(scores, spec.context - 1, spec.seed, groups)
    on_qa = ("reference", "greedy", f"uniform_{spec.low}bit")
    with sections("cloze questions"):
        qa_rows, answers = qa_accuracy(lm, r, {k: bitmaps[k] for k in on_qa}, spec) if spec.qa_questions else ([], {})
    r.set([32] * n)
    other = metrics.param_counts(lm.model)["total_params"] - sum(params.values())
    rows = [{**_row(name, bm, held_nll, params, other, spec, groups), **held_fid[name]}
            for name, bm in bitmaps.items()]
    bonferroni(rows, held_nll, spec, groups)
    info = {"model": lm.asset.provenance(), "data": lm.data_asset.provenance(), "eval_set": lm.eval_set.describe(),
            "blocks": n, "calib_tokens": int(calib.numel()), "low_blocks": k, "calib_nll_all_high": float(base),
            "random_orders": randoms, "greedy_vs_random": versus_random(held_nll["greedy"], randoms),
            "section_seconds": sections.seconds}
    return BlockSearchResult(sens, chosen, steps, rows, {"group": groups, **held_nll}, info, qa_rows, answers)


def search_blocks(r: Rounder, loss: Any, spec: BlockSearchSpec
                  ) -> tuple[list[float], list[int], list[dict[str, Any]], float]:
    """Each block's dev-loss increase alone at `low` bits, then blocks lowered from the least sensitive on until the
    next would take the dev perplexity more than `budget` over the all-`high` bitmap's (the first refusal ends the
    search: the blocks after it are more sensitive). `loss(bitmap, keep)`: `keep` marks the bitmap the next trials
    differ from by one block."""
    n = r.n_blocks
    high = [spec.high] * n
    base = float(loss(high, keep=True))
    sens = [float(loss(high[:b] + [spec.low] + high[b + 1:])) - base
            for b in tqdm(range(n), desc=f"sensitivity: one block at {spec.low} bits")]
    chosen, steps = list(high), []
    for b in tqdm(sorted(range(n), key=lambda b: sens[b]), desc="greedy search"):
        trial = chosen[:b] + [spec.low] + chosen[b + 1:]
        increase = math.expm1(float(loss(trial, keep=True)) - base)
        steps.append({"block": b, "calib_ppl_increase": increase, "kept": increase <= spec.budget})
        if increase > spec.budget:
            break
        chosen = trial
    return sens, chosen, steps, base


def random_orders(r: Rounder, held: torch.Tensor, n: int, k: int, spec: BlockSearchSpec
                  ) -> list[dict[str, Any]]:
    """`random_orders` bitmaps with `k` low blocks chosen at random (seeded), each held out: the distribution the
    search is tested against."""
    rng, windows = random.Random(spec.seed), replay.PrefixNLL(r.model, held, spec.context)
    out = []
    for _ in tqdm(range(spec.random_orders if 0 < k < n else 0), desc="random orders (held out)"):
        low = set(rng.sample(range(n), k))
        bm = [spec.low if b in low else spec.high for b in range(n)]
        r.set(bm)
        out.append({"bitmap": bm, "perplexity": float(np.exp(windows.nll().mean()))})
    return out


def versus_random(greedy_nll: np.ndarray, randoms: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The search's held-out perplexity against the random orders': how many are at least as good, and the
    permutation p-value (1 + that count) / (1 + draws): below 0.05 only with 19 or more draws."""
    if not randoms:
        return None
    ppl = float(np.exp(greedy_nll.mean()))
    as_good = sum(x["perplexity"] <= ppl for x in randoms)
    return {"greedy_perplexity": ppl, "draws": len(randoms), "random_as_good_or_better": as_good,
            "p_value": (1 + as_good) / (1 + len(randoms)),
            "random_perplexity_median": float(np.median([x["perplexity"] for x in randoms]))}


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


def _row(name: str, bitmap: list[int], held: dict[str, np.ndarray], params: dict[int, int], other: int,
         spec: BlockSearchSpec, groups: np.ndarray) -> dict[str, Any]:
    """One bitmap held out: its bits three ways, perplexity ratio to the reference and to the median random order
    (paired, whole modules and articles resampled)."""
    block = spec.context - 1
    total = sum(params.values())
    # + an fp16 scale per group; a block left at full precision holds the FP16 weights every study starts from
    stored = {b: 16 if bits >= 32 else bits + 16 / ladder.GROUP for b, bits in enumerate(bitmap)}
    vs_ref = None if name == "reference" else metrics.perplexity_ratio(held["reference"], held[name], block, spec.seed,
                                                                       groups)
    vs_rnd = metrics.perplexity_ratio(held["random_order"], held[name], block, spec.seed, groups) \
        if name in ("greedy", "most_sensitive_first") else None
    block_bits = sum(stored[b] * params[b] for b in params)
    row = {"bitmap_name": name, "bitmap": ",".join(map(str, bitmap)),
           "avg_bits": sum(min(bits, 32) * params[b] for b, bits in enumerate(bitmap)) / total,
           "bits_per_weight_blocks": block_bits / total,
           "bits_per_param": (block_bits + other * 16) / (total + other),
           "perplexity": float(np.exp(held[name].mean())),
           "perplexity_by_domain": formats.by_domain(held[name], groups)}
    metrics.with_difference(row, "perplexity_ratio", vs_ref, value="ratio")
    return metrics.with_difference(row, "vs_random_order", vs_rnd, value="ratio")


def bonferroni(rows: list[dict[str, Any]], held: dict[str, np.ndarray], spec: BlockSearchSpec,
               groups: np.ndarray) -> None:
    """Each row's comparisons again at the family-wise level: a (1 - 0.05 / m) interval, m the table's comparisons
    (every row against the reference, the search and the most-sensitive control against the median random order);
    `_survives_bonferroni` where it excludes 1."""
    pairs = [(r, "perplexity_ratio", "reference") for r in rows if r["perplexity_ratio"] is not None]
    pairs += [(r, "vs_random_order", "random_order") for r in rows if r.get("vs_random_order") is not None]
    alpha = 0.05 / max(1, len(pairs))
    for row, key, ref in pairs:
        d = metrics.perplexity_ratio(held[ref], held[row["bitmap_name"]], spec.context - 1, spec.seed, groups,
                                     alpha=alpha)
        row.update({f"{key}_bonferroni_lo": d["lo"], f"{key}_bonferroni_hi": d["hi"],
                    f"{key}_survives_bonferroni": d["real"], "bonferroni_comparisons": len(pairs)})


def findings(res: BlockSearchResult, spec: BlockSearchSpec) -> str:
    """Markdown: what the search chose, where it stands among the random orders, and which comparisons survive the
    multiplicity correction."""
    by = {r["bitmap_name"]: r for r in res.rows}
    g, worst = by["greedy"], by["most_sensitive_first"]
    pct = lambda x: f"{100 * (x - 1):+.1f} %"  # noqa: E731
    order = sorted(range(len(res.sensitivity)), key=lambda b: -res.sensitivity[b])
    refused = next((s for s in res.steps if not s["kept"]), None)
    lines = [f"- {res.info['model']['id']}, {res.info['blocks']} blocks, {spec.low} or {spec.high} bits per block "
             f"(grouped int, no training); most sensitive blocks at {spec.low} bits: {order[:3]}, least: {order[-3:]}. "
             f"Sensitivity and search on {res.info['calib_tokens']:,} dev tokens (training texts); everything below "
             f"on {evalset.caption(res.info['eval_set'])}.",
             f"- Greedy search (dev budget {100 * spec.budget:.0f} % over all-{spec.high}-bit) put "
             f"{res.info['low_blocks']} of {res.info['blocks']} blocks at {spec.low} bits"
             + (f" (the next, block {refused['block']}, would have cost {100 * refused['calib_ppl_increase']:.1f} %)"
                if refused else "")
             + f": {g['avg_bits']:.2f} nominal bits in the blocks, {g['bits_per_weight_blocks']:.2f} with their "
             f"scales, {g['bits_per_param']:.2f} bits per parameter for the whole model (embeddings and norms at 16)."]
    for r in res.rows[1:]:
        surv = "" if r.get("perplexity_ratio_survives_bonferroni") is None else (
            ", survives Bonferroni" if r["perplexity_ratio_survives_bonferroni"] else ", not after Bonferroni")
        lines.append(f"- `{r['bitmap_name']}` ({r['bits_per_param']:.2f} bits/param): held-out perplexity "
                     f"{r['perplexity']:.2f}, {pct(r['perplexity_ratio'])} [{pct(r['perplexity_ratio_lo'])}, "
                     f"{pct(r['perplexity_ratio_hi'])}] vs the reference{surv}; mean KL {r['kl_mean']:.3g} "
                     f"[{r['kl_mean_lo']:.3g}, {r['kl_mean_hi']:.3g}], same top-1 token "
                     f"{100 * r['top1_agreement']:.1f} %.")
    if g["perplexity_ratio"] is not None and g["perplexity_ratio_lo"] > 1 + spec.budget:
        lines.append(f"- Held out, the search's bitmap costs more than its {100 * spec.budget:.0f} % dev budget "
                     "(the whole interval is above it): the dev tokens flatter the choice.")
    vr = res.info.get("greedy_vs_random")
    if vr:
        verdict = "beats" if vr["p_value"] <= 0.05 else "does not beat"
        lines.append(f"- Against {vr['draws']} random orders with as many {spec.low}-bit blocks: "
                     f"{vr['random_as_good_or_better']} are at least as good held out (median perplexity "
                     f"{vr['random_perplexity_median']:.2f} vs the search's {vr['greedy_perplexity']:.2f}; "
                     f"permutation p = {vr['p_value']:.3f}): the search {verdict} chance. "
                     "Paired with "
                     f"the median random order: {pct(g['vs_random_order'])} [{pct(g['vs_random_order_lo'])}, "
                     f"{pct(g['vs_random_order_hi'])}]; most-sensitive-first {pct(worst['vs_random_order'])} "
                     f"[{pct(worst['vs_random_order_lo'])}, {pct(worst['vs_random_order_hi'])}].")
    m = next((r["bonferroni_comparisons"] for r in res.rows if r.get("bonferroni_comparisons")), 0)
    if m:
        keep = [f"{r['bitmap_name']} {k}" for r in res.rows for k in ("perplexity_ratio", "vs_random_order")
                if r.get(f"{k}_survives_bonferroni")]
        lines.append(f"- Multiplicity: {m} comparisons in this table; at a family-wise 5 % (Bonferroni, each interval "
                     f"at {100 * (1 - 0.05 / m):.2f} %) these survive: {', '.join(keep) or 'none'}.")
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
