"""Study 05's post-training ladder: weight formats applied to a real pretrained causal LM without training.

Beside 05's six training regimes (which need a model small enough to train on 2 cores, and so show only a
method's mechanics), the ladder measures where each format breaks on a real model: SmolLM2-135M offline.
Every rung is scored on the shared evaluation set (`evalset`: held-out stdlib modules and BBC articles) as the
reference, per token, and compared with it by a paired bootstrap over whole modules and articles; a unigram and a
Kneser-Ney bigram give the floor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from qlib import assets, evalset, fidelity, formats, metrics, models, ngram, results
from qlib.core.errors import QlabError
from qlib.quant import ladder


@dataclass(frozen=True)
class LadderSpec:
    """What the ladder runs on (05's `ladder_*` parameters)."""

    model_id: str
    dataset_id: str
    rungs: tuple[str, ...]
    context: int
    eval_tokens: int
    train_tokens: int
    seed: int = 0


@dataclass
class LadderResult:
    rows: list[dict[str, Any]]
    nll: dict[str, np.ndarray]
    model: dict[str, Any]


@dataclass
class RealLM:
    """A real pretrained causal LM in fp32 with its tokenizer, training-text tokens (calibration, count baselines)
    and the shared evaluation set's windows: what the post-training studies (this ladder, 06's block search) round
    and score."""

    asset: assets.Resolved
    data_asset: assets.Resolved
    tok: Any
    model: torch.nn.Module
    train_ids: torch.Tensor
    eval_set: evalset.EvalSet
    device: torch.device

    @property
    def eval_ids(self) -> torch.Tensor:
        return self.eval_set.ids.reshape(-1)

    def nll(self, ids: torch.Tensor, context: int) -> np.ndarray:
        """Per-token NLL over non-overlapping windows of `context` (the tokens every row is scored on)."""
        with torch.no_grad():
            return metrics.token_nll(self.model, ids, context, context, self.device).double().numpy()

    def score(self, ids: torch.Tensor, context: int, reference: fidelity.Reference | None = None
              ) -> tuple[fidelity.TokenScores, fidelity.Reference | None]:
        """The same windows scored through `fidelity`: NLL, and KL / top-1 / Δp against `reference`; without one,
        this model's top-k view is returned to serve as the reference."""
        windows = metrics.window_logits(self.model, ids, context, self.device)
        return fidelity.score(windows, reference, keep_top=0 if reference else fidelity.TOP_K)


def load_real_lm(model_id: str, dataset_id: str, context: int, train_tokens: int, eval_tokens: int,
                 device: torch.device) -> RealLM:
    """The LLaMA-architecture model (SmolLM2 offline) with its weights rounded to FP16, `train_tokens` of the shared
    set's domains' training texts (3 code : 1 prose) and the shared set's first eval_tokens / context windows."""
    from transformers import AutoTokenizer

    asset = assets.resolve_model("llama-arch", model_id)
    tok = AutoTokenizer.from_pretrained(asset.path)
    data_asset = assets.resolve_data("code", dataset_id)
    shared = evalset.scored(tok, context, eval_tokens)
    train_ids = evalset.training_tokens(tok, context, train_tokens)
    # the FP16 model computed in FP32: the reference `formats`, 05's methods and 08 load (`formats.fp16_model`),
    # so the model's perplexity on the shared set is one number in every study
    model = models.load_causal_lm(asset.path, None, device, dtype=torch.float16).float().eval()
    return RealLM(asset, data_asset, tok, model, train_ids, shared, device)


def run_ladder(spec: LadderSpec, device: torch.device) -> LadderResult:
    """Reference, every rung, and the count baselines, each a row with its perplexity ratio and interval."""
    unknown = [r for r in spec.rungs if r not in ladder.RUNGS]
    if unknown:
        raise QlabError(f"unknown ladder rung(s) {unknown}; valid: {', '.join(ladder.RUNGS)}")
    lm = load_real_lm(spec.model_id, spec.dataset_id, spec.context, spec.train_tokens, spec.eval_tokens, device)
    original = ladder.snapshot(lm.model)
    n_params = metrics.param_counts(lm.model)["total_params"]
    groups = lm.eval_set.token_groups()
    first, reference = lm.score(lm.eval_ids, spec.context)
    nll, fid = {"reference": first.nll}, {}
    for name in tqdm(spec.rungs, desc="post-training ladder"):
        ladder.apply(lm.model, name)
        s, _ = lm.score(lm.eval_ids, spec.context, reference)
        nll[name], fid[name] = s.nll, fidelity.summary(s, block=spec.context - 1, seed=spec.seed, groups=groups)
        ladder.restore(lm.model, original)
    ev, tr = lm.eval_ids.numpy(), lm.train_ids.numpy()
    nll["unigram"] = ngram.Unigram(tr, len(lm.tok)).token_nll(ev, spec.context)
    nll["bigram_kn"] = ngram.KneserNeyBigram(tr, len(lm.tok)).token_nll(ev, spec.context)
    block_weights = sum(w.numel() for w in original.values())
    rows = [{**_row(name, v, nll["reference"], spec, lm.asset.id, n_params, block_weights, groups),
             **fid.get(name, fidelity.summary(None, 0))} for name, v in nll.items()]
    return LadderResult(rows, {"group": groups, **nll}, {
        "asset": lm.asset.provenance(), "data": lm.data_asset.provenance(), "eval_set": lm.eval_set.describe(),
        "block_linear_weights": block_weights, "total_params": n_params})


def _row(name: str, nll: np.ndarray, ref: np.ndarray, spec: LadderSpec, model_id: str, n_params: int,
         block_weights: int, groups: np.ndarray) -> dict[str, Any]:
    rung = ladder.RUNGS.get(name)
    ratio = None if name == "reference" else metrics.perplexity_ratio(ref, nll, block=spec.context - 1,
                                                                       seed=spec.seed, groups=groups)
    kind = "count baseline" if name in ("unigram", "bigram_kn") else "post-training (no training)"
    row = results.make_row(
        f"ptq_{name}" if rung else name, model=model_id, dataset=evalset.DATASET_ID,
        perplexity=float(np.exp(nll.mean())), perplexity_by_domain=formats.by_domain(nll, groups),
        total_params=n_params if kind != "count baseline" else None, trainable_params=0 if rung else None,
        bits_per_quantized_weight=rung.bits_per_weight if rung else (None if kind == "count baseline" else 16.0),
        quantized_share_of_params=block_weights / n_params if rung else None, section="post-training ladder",
        regime_kind=(kind if name != "reference"
                     else "reference: the FP16 model (SmolLM2: its dequantized Q4_1 weights rounded to FP16), "
                          "computed in FP32, as every study scores it"),
        format=rung.what if rung else None, reference="reference" if ratio else None)
    return metrics.with_difference(row, "perplexity_ratio", ratio, value="ratio")


def findings(rows: list[dict[str, Any]]) -> str:
    """Markdown: each rung's perplexity against the reference with its interval, and where the ladder breaks
    (the first rung worse than the bigram baseline)."""
    lad = [r for r in rows if r.get("section") == "post-training ladder"]
    if not lad:
        return "- The post-training ladder did not run (`ladder_model_id=None`)."
    by = {r["method"]: r for r in lad}
    ref, bigram = by["reference"], by.get("bigram_kn")
    lines = [f"- Reference ({ref['model']}, no training): perplexity {ref['perplexity']:.2f}; count baselines on the "
             "same tokens: " + ", ".join(f"{k} {by[k]['perplexity']:.1f}" for k in ("unigram", "bigram_kn") if k in by)
             + "."]
    for r in lad:
        if r["perplexity_ratio"] is None or r["regime_kind"] == "count baseline":
            continue
        pct = lambda x: f"{100 * (x - 1):+.1f} %" if x < 2 else f"x{x:.3g}"  # noqa: E731
        verdict = "within noise" if not r["perplexity_ratio_real"] else (
            "worse than the bigram" if bigram and r["perplexity"] > bigram["perplexity"] else "real")
        lines.append(f"- `{r['method']}` ({r['bits_per_quantized_weight']:.2f} bits/weight in the blocks' linears: "
                     f"{r['format']}): perplexity {r['perplexity']:.2f}, {pct(r['perplexity_ratio'])} "
                     f"[{pct(r['perplexity_ratio_lo'])}, {pct(r['perplexity_ratio_hi'])}], {verdict}"
                     + (f"; mean KL vs the reference {r['kl_mean']:.3g} "
                        f"[{r['kl_mean_lo']:.3g}, {r['kl_mean_hi']:.3g}], "
                        f"same top-1 token {100 * r['top1_agreement']:.1f} %."
                        if r.get("kl_mean") is not None else "."))
    share = next((r["quantized_share_of_params"] for r in lad if r.get("quantized_share_of_params")), None)
    if share:
        lines.append("- Only the blocks' linear layers are quantized "
                     f"({100 * share:.0f} % of the parameters); the tied "
                     "embedding/output matrix stays as loaded, so these are the formats' costs on the blocks alone.")
    return "\n".join(lines)
