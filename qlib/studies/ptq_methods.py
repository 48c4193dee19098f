"""Study 05's post-training methods on a real model: which method, at a given width, comes closest to the
full-precision model, and how much its calibration text matters.

The ladder (`ptq_ladder`) rounds the model's linears in memory to show where each format breaks. This section asks
what a quantization paper asks: each registered method in `MethodsSpec.methods` (GPTQ, HQQ, llama.cpp's importance
matrix, ...) is written as its artifact, reloaded in its runtime and scored by `formats.measure` on held-out tokens
against the model as stored (KL divergence, top-1 agreement, Δp, perplexity) and against its round-to-nearest
control on the same grid (the paired KL difference: the method's own contribution). The ablation re-makes the
calibrated methods with other calibration text, stdlib code (the evaluation's domain, disjoint from it) or BBC News
prose, few or many windows, each scored against the same reference and controls and paired with the main setting.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlib import assets, data, evalset, formats, merge, methods, metrics, pretrain, runmeta
from qlib.core.errors import QlabError

# the dataset's train split (stdlib code) | BBC News articles | both, in the evaluation set's 3 : 1 mix
SOURCES = ("code", "prose", "mixed")


@dataclass(frozen=True)
class MethodsSpec:
    """What the methods section runs (05's `ladder_methods*` parameters)."""

    model_id: str
    dataset_id: str
    methods: tuple[str, ...]          # registry names; their controls and references are added
    ablation: tuple[str, ...]         # the calibrated ones re-made per calibration setting
    samples: tuple[int, ...]          # calibration windows: the first is the main setting's
    calib_length: int
    context: int
    eval_tokens: int
    seed: int = 0
    sources: tuple[str, ...] = ("mixed", "code", "prose")  # calibration text: the first is the main setting's

    def settings(self) -> list[tuple[str, int]]:
        """(source, windows) of the main setting, then the ablation's: the main source at each other count, and each
        other source at the main count."""
        main_source, main_n = self.sources[0], self.samples[0]
        return [(main_source, main_n), *((main_source, n) for n in self.samples[1:] if n != main_n),
                *((s, main_n) for s in self.sources[1:] if s != main_source)]


@dataclass
class MethodsResult:
    rows: list[dict[str, Any]]
    nll: dict[str, np.ndarray]
    problems: list[str]
    settings: dict[str, dict[str, Any]]   # calibration setting -> what it was (source, samples, length, tokens)
    eval_set: dict[str, Any] | None = None  # the shared set's windows scored (evalset.EvalSet.describe)
    groups: np.ndarray | None = None        # each scored token's module or article


def calibration(source: str, tok: Any, dataset_id: str, samples: int, length: int, seed: int) -> methods.Calibration:
    """`samples` windows of `length` tokens from `source`'s texts, shuffled with `seed` (every module or topic can
    contribute); code comes from the train split only, never the evaluated one; `mixed` takes code and prose in the
    evaluation set's proportions. Too little text is one line."""
    if source == "mixed":
        n_code = round(samples * evalset.CODE_SHARE)
        parts = [calibration(s, tok, dataset_id, n, length, seed) for s, n in (("code", n_code),
                                                                               ("prose", samples - n_code)) if n]
        windows = [w for c in parts for w in c.windows]
        random.Random(seed).shuffle(windows)
        return methods.Calibration(f"mixed: {n_code} code + {samples - n_code} prose windows ("
                                   + "; ".join(c.source for c in parts) + ")", windows)
    if source == "code":
        texts, what = data.load_code_sft(dataset_id)[0], f"{dataset_id} train split"
    elif source == "prose":
        texts, what = evalset.prose_split()[0], "BBC News articles (not the evaluation set's)"
    else:
        raise QlabError(f"unknown calibration source {source!r}; valid: {', '.join(SOURCES)}")
    texts = list(texts)
    random.Random(seed).shuffle(texts)
    ids = data.lm_chunks(tok, texts, length, samples * length)
    if ids.shape[0] < samples:
        raise QlabError(f"calibration: {what} gives {ids.shape[0]} windows of {length} tokens, {samples} asked for")
    return methods.Calibration(f"{source}: {what}", list(ids[:samples]))


def run_methods(spec: MethodsSpec, device: torch.device, out: Path, study: str, profile: str) -> MethodsResult:
    """The methods in their main setting, then the ablation's other settings, as rows with fidelity and controls;
    artifacts under `out`, named for this model."""
    from transformers import AutoTokenizer

    asset = assets.resolve_model("llama-arch", spec.model_id)
    stored, tok = asset.path, AutoTokenizer.from_pretrained(asset.path)
    data_asset = assets.resolve_data("code", spec.dataset_id)
    info = runmeta.RunInfo(study, profile, spec.seed, asset.id, asset.path, data_asset.id)
    src = formats.fp16_model(stored, out, info, tok)  # every method starts from, and is scored against, FP16
    shared = evalset.scored(tok, spec.context, spec.eval_tokens)
    text = formats.Text.of(shared, tok.eos_token_id, spec.seed)
    cal = lambda source, n: calibration(source, tok, spec.dataset_id, n, spec.calib_length, spec.seed)  # noqa: E731
    (main_source, main_n), *others = spec.settings()
    main_cal = cal(main_source, main_n)
    kw = {"pre_tokenizer": pretrain.gguf_pre_tokenizer(stored)}
    main = formats.measure(src, spec.methods, out / "methods", text, device, info, calibration=main_cal,
                           desc="post-training methods", **kw)
    settings, ablated = {f"{main_source}{main_n}": main_cal.record()}, []
    for source, n in others:
        key = f"{source}{n}"
        c = cal(source, n)
        settings[key] = c.record()
        stage = formats.measure(src, spec.ablation, out / f"calibration-{key}", text, device, info, calibration=c,
                                before=main, desc=f"calibration {key}", **kw)
        for m in stage.measured:
            m.method = f"{m.method}@{key}"
        main.problems += stage.problems
        ablated += stage.measured
    rows = _rows(main.measured, ablated, spec, asset.id, evalset.DATASET_ID, src, text.groups)
    return MethodsResult(rows, _nll(main.measured + ablated), main.problems, settings, text.about, text.groups)


def _rows(main: list[formats.Measured], ablated: list[formats.Measured], spec: MethodsSpec, model_id: str,
          data_id: str, src: Path, groups: np.ndarray | None) -> list[dict[str, Any]]:
    """formats' rows for every artifact; an ablated method also paired with its main setting's KL (intervals over
    whole `groups`)."""
    rows = formats.rows(main + ablated, {}, merge.stored_params(src), model_id, data_id, spec.context, spec.seed,
                        groups=groups)
    by = {m.method: m for m in main + ablated}
    for r in rows:
        base, _, setting = r["method"].partition("@")
        r.update(section="post-training methods" if not setting else "calibration ablation",
                 calibration_setting=setting or (f"{spec.sources[0]}{spec.samples[0]}" if r.get("calibration")
                                                 else None))
        main_m, this = by.get(base), by[r["method"]]
        d = None
        if setting and main_m is not None and main_m.scores is not None and this.scores is not None:
            d = metrics.paired_bootstrap(main_m.scores.kl, this.scores.kl, block=spec.context - 1, seed=spec.seed,
                                         groups=groups)
            d = {**d, "real": d["excludes_zero"]}
        metrics.with_difference(r, "kl_vs_main_calibration", d)
    return rows


def _nll(measured: list[formats.Measured]) -> dict[str, np.ndarray]:
    return {m.method: m.nll for m in measured if m.nll is not None}


def findings(rows: list[dict[str, Any]]) -> str:
    """Markdown: each method's KL against FP with its interval and against its control, the calibration cost,
    and what the calibration text changed."""
    main = [r for r in rows if r.get("section") == "post-training methods" and r.get("kl_mean") is not None]
    if not main:
        return "- The post-training methods did not run (`ladder_model_id=\"\"` skips them with the ladder)."
    lines = []
    for r in sorted(main, key=lambda r: (-(r.get("bits_per_quantized_weight") or 99), r["kl_mean"])):
        bits = r.get("bits_per_quantized_weight")
        ctl = (f"; vs its control `{r['control']}` {r['kl_vs_control']:+.4f} [{r['kl_vs_control_lo']:+.4f}, "
               f"{r['kl_vs_control_hi']:+.4f}]" + ("" if r["kl_vs_control_real"] else ", within noise")
               if r.get("kl_vs_control") is not None else "")
        cost = _cost(r)
        lines.append(f"- `{r['method']}` ({'%.2f' % bits if bits else '16'} bits/weight): mean KL {r['kl_mean']:.4f} "
                     f"[{r['kl_mean_lo']:.4f}, {r['kl_mean_hi']:.4f}], same top-1 {100 * r['top1_agreement']:.1f} %"
                     f"{ctl}{_domains(r)}{cost}.")
    for r in (r for r in rows if r.get("section") == "calibration ablation" and r.get("kl_mean") is not None):
        d = r.get("kl_vs_main_calibration")
        lines.append(f"- `{r['method']}`: mean KL {r['kl_mean']:.4f}" + (
            f", {d:+.4f} [{r['kl_vs_main_calibration_lo']:+.4f}, {r['kl_vs_main_calibration_hi']:+.4f}] vs its main "
            f"setting" + ("" if r["kl_vs_main_calibration_real"] else " (within noise)") if d is not None else "")
            + f"{_domains(r)}{_cost(r)}.")
    return "\n".join(lines)


def _domains(r: dict[str, Any]) -> str:
    """Perplexity over the control's on each domain with its interval: where a method's calibration text helps."""
    d = r.get("perplexity_vs_control_by_domain") or {}
    return ("; perplexity vs its control " + ", ".join(
        f"{k} ×{v['ratio']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]" for k, v in d.items())) if d else ""


def _cost(r: dict[str, Any]) -> str:
    """What a calibrated method's statistic cost (seconds, tokens), from its metadata."""
    cal = r.get("calibration") or {}
    secs = cal.get("seconds", cal.get("imatrix_seconds"))
    return f"; calibration {secs:.0f} s on {cal['tokens']:,} tokens" if secs is not None else ""
