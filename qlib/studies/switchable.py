"""Study 06: one GPT-2 switchable between 2/4/8/full-precision bits per block, trained three ways, then
per-block sensitivity and a greedy mixed-precision search under an F1 budget, on extractive QA.

Also the command line of the seed's main.py / eval.py / sensitivity_analysis.py / greedy_search.py:
`python -m qlib train|eval|sensitivity|search ...` (see `main`).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from qlib import assets, budget, hub, metrics, models, qa, report, search, switchable
from qlib.config import QlabError, make_config, outputs_dir, pick_device, results_dir
from qlib.studies import StudyResult
from qlib.train import STYLES, set_seed, train_switchable

STUDY = "06_switchable_precision"


@dataclass(frozen=True)
class SwitchableConfig:
    """Notebook 06's parameters."""

    profile: str = "default"
    seed: int = 0
    model_id: str = "gpt2-stdlib"
    dataset_id: str = "stdlib-cloze"
    styles: tuple[str, ...] = ("spnet", "cyclic", "instantnet")
    widths: tuple[int, ...] = (2, 4, 8, 32)
    single_baselines: bool = True   # one model per width trained at that width alone
    steps: int = 100                # optimizer steps per training run, whatever the style
    batch_size: int = 8
    lr: float = 3e-3
    lora_rank: int = 8
    kd_temperature: float = 1.0
    budget: float = 0.02            # greedy search: largest F1 drop (0..1) vs full precision
    search_style: str = "instantnet"
    n_eval: int | None = 200
    n_calib: int = 32
    max_new_tokens: int = 8
    max_len: int | None = None      # prompt + answer tokens (None: the model's context); contexts are cut to fit
    latency_repeats: int = 3
    block_model_id: str | None = "smollm2-135m"  # post-training block search on a real model (None/"": skip)
    block_low: int = 4
    block_high: int = 8
    block_budget: float = 0.05      # block search: largest calibration perplexity increase over all-`high`
    block_context: int = 256
    block_calib_tokens: int = 1024
    block_eval_tokens: int = 4096
    device: str = "auto"


SWITCHABLE_PROFILES: dict[str, dict[str, Any]] = {
    "smoke": dict(model_id="gpt2-stdlib-tiny", steps=2, batch_size=4, lora_rank=2, n_eval=6, n_calib=4,
                  max_new_tokens=3, latency_repeats=1, block_model_id="llama-stdlib-tiny", block_context=64, block_calib_tokens=256,
                  block_eval_tokens=512),
    "default": {},
    # 7 training runs (3 styles + 4 single widths) of fp32 fake quantization on a T4: 300 steps of 8 x 384
    # tokens keep each run to minutes and the peak near 7 GiB (16 x 1024 would need ~30 GiB)
    "t4": dict(model_id="gpt2", dataset_id="squad", steps=300, batch_size=8, lr=5e-4, lora_rank=16,
               n_eval=500, max_new_tokens=16, max_len=384),
}


def switchable_config(profile: str = "default", **overrides: Any) -> SwitchableConfig:
    cfg = make_config(SwitchableConfig, SWITCHABLE_PROFILES, profile, **overrides)
    bad = [s for s in cfg.styles if s not in STYLES[:3]]
    if bad or cfg.search_style not in cfg.styles:
        raise QlabError(f"styles must be among spnet, cyclic, instantnet and include search_style "
                        f"{cfg.search_style!r}; got {list(cfg.styles)}")
    return cfg


# ---------------------------------------------------------------- QA as a language-model task

def encode(ex: qa.QAExample, tok: Any, max_len: int, answer_room: int) -> tuple[list[int], list[int]] | None:
    """Prompt and answer ids; a context too long for the model is cut around the answer, never the answer."""
    ans = tok(" " + ex.answer)["input_ids"] + [tok.eos_token_id]
    ctx, at = ex.context, ex.context.find(ex.answer)
    while True:
        prompt = tok(qa.QAExample(ex.id, ctx, ex.question, ex.answer).prompt())["input_ids"]
        if len(prompt) + max(len(ans), answer_room) <= max_len:
            return prompt, ans
        if len(ctx) <= len(ex.answer) + 20 or at < 0:
            return None
        lo = max(0, min(at, len(ctx) - len(ex.answer)) - (len(ctx) - len(ex.answer) - 20) // 2)
        ctx = ctx[lo:lo + len(ctx) - 20]
        at = ctx.find(ex.answer)


def qa_loader(items: list[tuple[list[int], list[int]]], batch_size: int, pad: int, seed: int) -> DataLoader:
    """Right-padded batches; the loss is on the answer (and its end token) only."""
    def collate(batch: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        n = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((len(batch), n), pad)
        labels = torch.full((len(batch), n), -100)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, (p, a) in enumerate(batch):
            seq = p + a
            ids[i, :len(seq)] = torch.tensor(seq)
            labels[i, len(p):len(seq)] = torch.tensor(a)
            mask[i, :len(seq)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return DataLoader(items, batch_size=batch_size, shuffle=True, collate_fn=collate,
                      generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def answer(model: Any, tok: Any, prompts: list[list[int]], max_new: int, device: torch.device,
           batch_size: int = 32) -> list[str]:
    """Greedy answers, cut at the first newline or end token; prompts left-padded in batches."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        n = max(map(len, chunk))
        ids = torch.tensor([[tok.eos_token_id] * (n - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in chunk], device=device)
        gen = model.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                   pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        out += [tok.decode(g[n:], skip_special_tokens=True).split("\n")[0].strip() for g in gen]
    return out


@dataclass
class QAData:
    train: list[tuple[list[int], list[int]]]
    eval_examples: list[qa.QAExample]
    eval_items: list[tuple[list[int], list[int]]]
    asset: assets.Resolved
    dropped: int


def load_data(cfg: SwitchableConfig, tok: Any, max_len: int) -> QAData:
    train_ex, eval_ex, asset = qa.load_qa(cfg.dataset_id)
    enc = lambda exs: [(e, encode(e, tok, max_len, cfg.max_new_tokens)) for e in exs]  # noqa: E731
    train = [x for _, x in enc(train_ex) if x is not None]
    ev = [(e, x) for e, x in enc(eval_ex) if x is not None][: cfg.n_eval]
    dropped = len(train_ex) - len(train)
    return QAData(train, [e for e, _ in ev], [x for _, x in ev], asset, dropped)


def load_setup(cfg: SwitchableConfig) -> tuple[assets.Resolved, Any, QAData]:
    """The base GPT-2, its tokenizer, and the QA data encoded to fit its context."""
    from transformers import AutoConfig, AutoTokenizer

    asset = assets.resolve_model("causal-lm", cfg.model_id)
    tok = AutoTokenizer.from_pretrained(asset.path)
    n_positions = AutoConfig.from_pretrained(asset.path).n_positions
    return asset, tok, load_data(cfg, tok, min(n_positions, cfg.max_len or n_positions))


def calibration(data: QAData, tok: Any, cfg: SwitchableConfig, device: torch.device,
                n_batches: int) -> list[dict[str, torch.Tensor]]:
    """Training batches for the sensitivity analysis (their own shuffle: seed + 1)."""
    loader = qa_loader(data.train, cfg.batch_size, tok.eos_token_id, cfg.seed + 1)
    return [{k: v.to(device) for k, v in b.items()} for _, b in zip(range(n_batches), loader)]


def evaluate(model: switchable.SwitchableQuantLoRAModel, tok: Any, data: QAData, bitmap: Any,
             cfg: SwitchableConfig, device: torch.device) -> dict[str, float]:
    model.set_config(bitmap)
    preds = answer(model, tok, [p for p, _ in data.eval_items], cfg.max_new_tokens, device)
    return qa.em_f1(preds, [e.answer for e in data.eval_examples])


def perplexity_on_answers(model: switchable.SwitchableQuantLoRAModel, data: QAData, pad: int) -> float:
    """exp(mean CE) on the answer tokens of the eval set (teacher forcing)."""
    loader = qa_loader(data.eval_items, 16, pad, 0)
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in loader:
            k = int((b["labels"][:, 1:] != -100).sum())
            nll += model(**{k2: v.to(next(model.parameters()).device) for k2, v in b.items()}).loss.item() * k
            n += k
    return float(torch.exp(torch.tensor(nll / n)))


# ---------------------------------------------------------------- the study

@dataclass
class SwitchableResult(StudyResult):
    losses: dict[str, list[float]]
    sensitivity: dict[str, Any]
    search_rows: list[dict[str, Any]]
    best: dict[str, Any]
    heuristic: dict[str, float]
    blocks: Any = None              # block_precision.BlockSearchResult (None: not run)


def _uniform_rows(name: str, model: Any, tok: Any, data: QAData, cfg: SwitchableConfig, device: torch.device,
                  widths: tuple[int, ...], train: Any, ids: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    prompt = torch.tensor([data.eval_items[0][0]], device=device)
    lora = sum(p.numel() for p in model.lora_parameters())  # every width's adapter
    total = sum(p.numel() for n, p in model.model.named_parameters() if "lora_" not in n) + lora
    for w in widths:
        with metrics.PeakMemory(device) as mem:
            scores = evaluate(model, tok, data, w, cfg, device)
        ppl = perplexity_on_answers(model, data, tok.eos_token_id)
        tps = metrics.decode_speed(model.model, prompt, cfg.max_new_tokens, cfg.latency_repeats,
                                   tok.eos_token_id, device)
        rows.append(report.make_row(
            f"switchable_{name}_{w}", model=ids["model"], dataset=ids["data"], em=scores["em"], f1=scores["f1"],
            perplexity=ppl, bits_per_param=float(w), tokens_per_s=tps, inference_peak_mem_bytes=mem.peak_bytes,
            peak_mem_source=mem.source, train_time_s=train.train_time_s, train_steps=train.steps,
            trainable_params=lora, total_params=total, style=name, bitmap=str(w),
            perplexity_note="answer tokens of the eval questions, teacher-forced"))
    return rows


def plan(cfg: SwitchableConfig, model_config: Any, seq: int, device: torch.device) -> list[budget.Prediction]:
    """Every training run (styles, then single widths): LoRA on a frozen fp32 base in fp32 (no autocast), a
    fake-quantized copy of each weight kept for backward, and instantnet's teacher logits; a step of spnet or
    instantnet runs forward and backward once per bitmap it visits, one at a time."""
    from qlib import accounting
    from qlib.train import style_bitmaps

    a = accounting.arch(model_config)
    linears = accounting.param_counts(accounting.meta_model(model_config))["block_linears"]
    runs = [(s, cfg.widths, s) for s in cfg.styles]
    runs += [(f"single_w{w}", (w,), "single") for w in cfg.widths] if cfg.single_baselines else []
    out = []
    for name, widths, style in runs:
        visits = 1 if style in ("cyclic", "single") else len(style_bitmaps(style, widths, a.layers))
        extra = {"fake_quant_copies": 4 * linears}
        if style == "instantnet":
            extra["teacher_logits"] = 4 * cfg.batch_size * seq * a.vocab
        out.append(budget.predict(f"06 {name}, batch {cfg.batch_size} x {seq}, {visits} pass(es) a step",
                                  model_config, "lora", batch=cfg.batch_size, seq=seq, steps=cfg.steps * visits,
                                  compute=torch.float32, rank=cfg.lora_rank,
                                  targets=tuple(models.GPT2_LORA_TARGETS), extra=extra))
    return out


def run(cfg: SwitchableConfig) -> SwitchableResult:
    """Train each style (and the single-width baselines), evaluate every uniform width, then sensitivity and
    greedy search on the `search_style` model; metrics.json, sensitivity.json, search_results.csv."""
    device = pick_device(cfg.device)
    set_seed(cfg.seed)
    asset, tok, data = load_setup(cfg)
    seq = max(len(p) + len(a) for p, a in data.train)
    gpu_plan = budget.announce(plan(cfg, hub.model_config(asset.path), seq, device), device) \
        if budget.wanted(cfg.profile, device) else None
    ids = {"model": asset.id, "data": data.asset.id}
    out = outputs_dir(STUDY, cfg.profile)
    loader = qa_loader(data.train, cfg.batch_size, tok.eos_token_id, cfg.seed)
    rows, losses, trained = [], {}, {}
    plans = [(s, cfg.widths, s) for s in cfg.styles]
    if cfg.single_baselines:
        plans += [(f"single_w{w}", (w,), "single") for w in cfg.widths]
    for name, widths, style in plans:
        set_seed(cfg.seed)
        model = switchable.build(asset.path, widths, cfg.lora_rank, device)
        tr = train_switchable(model, loader, style, cfg.steps, cfg.lr, device, cfg.kd_temperature,
                              desc=f"{name}: {cfg.steps} steps")
        losses[name] = tr.losses
        rows += _uniform_rows(name, model, tok, data, cfg, device, widths, tr, ids)
        if style != "single":
            model.save(out / f"adapters-{name}")
            trained[name] = model
    model = trained[cfg.search_style]
    sens = search.sensitivity(model, calibration(data, tok, cfg, device, max(1, cfg.n_calib // cfg.batch_size)))
    bar = tqdm(desc="greedy search (evaluations)")

    def score(bitmap: list[int]) -> dict[str, float]:
        bar.update(1)
        return evaluate(model, tok, data, bitmap, cfg, device)
    search_rows = search.greedy_search(model, sens, score, cfg.budget, model.block_params())
    bar.close()
    best = search.best_bitmap(search_rows)
    res_dir = results_dir(STUDY, cfg.profile)
    report.atomic_write_text(res_dir / "sensitivity.json", json.dumps(sens, indent=2))
    report.atomic_write_text(res_dir / "search_results.csv", _csv(search_rows))
    heuristic = qa.heuristic_baseline(data.eval_examples)
    blocks = run_blocks(cfg, device)
    doc_assets = {"model": {"role": "causal-lm", **asset.provenance()},
                  "data": {**data.asset.provenance(), "n_train": len(data.train), "n_eval": len(data.eval_items),
                           "n_train_dropped_too_long": data.dropped}}
    path = report.write_metrics(STUDY, cfg.profile, cfg.seed, metrics.runtime_env(device), doc_assets, rows,
                                config={**asdict(cfg), "styles": list(cfg.styles), "widths": list(cfg.widths)},
                                best_bitmap=best, heuristic_baseline=heuristic, gpu_plan=gpu_plan,
                                block_search=blocks and {"spec": asdict(blocks[1]), "sensitivity": blocks[0].sensitivity,
                                                         "chosen": blocks[0].chosen, "steps": blocks[0].steps,
                                                         "rows": blocks[0].rows, **blocks[0].info},
                                fake_quantization_note="weights are fake-quantized (rounded, kept in fp32): "
                                "memory and speed do not fall with the width; the bits are what a packed "
                                "deployment would store")
    return SwitchableResult(rows, report.load_metrics(path), path, losses, sens, search_rows, best, heuristic,
                            blocks[0] if blocks else None)


def run_blocks(cfg: SwitchableConfig, device: torch.device) -> tuple[Any, Any] | None:
    """The post-training block search on a real model (`block_*` parameters), per-token losses saved."""
    from qlib.studies import block_precision

    if not cfg.block_model_id:
        return None
    spec = block_precision.BlockSearchSpec(cfg.block_model_id, "stdlib-code", cfg.block_low, cfg.block_high,
                                           cfg.block_budget, cfg.block_context,
                                           cfg.block_calib_tokens, cfg.block_eval_tokens, cfg.seed)
    res = block_precision.run_block_search(spec, device)
    report.write_per_example(STUDY, cfg.profile, "block_search_per_token_nll", res.nll)
    return res, spec


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def findings(res: SwitchableResult) -> str:
    """Markdown findings from this run's numbers."""
    by = {r["method"]: r for r in res.rows}
    styles = sorted({r["style"] for r in res.rows if not r["style"].startswith("single")})
    widths = sorted({int(r["bitmap"]) for r in res.rows})
    lines = [f"- The obvious heuristic (the first parameter, or capitalised span, of the context that the question "
             f"does not name) scores EM {res.heuristic['em']:.3f} / F1 {res.heuristic['f1']:.3f} on the same "
             "questions: the floor a model that reads the context should beat."]
    for w in widths:
        single = by.get(f"switchable_single_w{w}_{w}")
        parts = [f"{s} {by[f'switchable_{s}_{w}']['f1']:.3f}" for s in styles if f"switchable_{s}_{w}" in by]
        base = f"; trained at {w} bits alone {single['f1']:.3f}" if single else ""
        lines.append(f"- {w} bits, F1: " + ", ".join(parts) + base + ".")
    b = res.best
    lines.append(f"- Greedy search (budget: F1 drop <= {res.doc['config']['budget']}): best bitmap `{b['bitmap']}` "
                 f"= {b['avg_bits']:.1f} average bits at F1 {b['f1']:.3f} (drop {b['f1_drop']:+.3f}).")
    order = search.layer_order(res.sensitivity)
    lines.append(f"- Blocks from least to most sensitive: {order} (MSE of the block output when only its weights are "
                 "rounded to the lowest width).")
    n = res.doc["assets"]["data"]["n_eval"]
    f1s = [r["f1"] for r in res.rows]
    p = sum(f1s) / len(f1s)
    lines.append(f"- Noise: {n} questions, so one answer moves EM by {1 / n:.3f}; at EM ~{p:.2f} the standard error is "
                 f"~{(p * (1 - p) / n) ** 0.5:.3f}. Differences smaller than about twice that are not evidence either "
                 "way; the answer perplexity (teacher-forced, in the table) is the finer signal.")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line (the seed's scripts)

def main(argv: list[str] | None = None) -> int:
    """train | eval | sensitivity | search, on a saved switchable adapter folder."""
    ap = argparse.ArgumentParser(prog="python -m qlib")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("train", "eval", "sensitivity", "search"):
        p = sub.add_parser(name)
        p.add_argument("--profile", default="default")
        p.add_argument("--adapters", help="switchable adapter folder (written by train)")
    sub.choices["train"].add_argument("--style", default="spnet", choices=STYLES[:3])
    sub.choices["train"].add_argument("--steps", type=int)
    sub.choices["train"].add_argument("--widths", default=None, help="e.g. 2,4,8,32")
    sub.choices["eval"].add_argument("--bitmap", required=True, help="8 | 8,4,8,4 | JSON dict")
    sub.choices["search"].add_argument("--budget", type=float)
    a = ap.parse_args(argv)
    cfg = switchable_config(a.profile, steps=getattr(a, "steps", None), widths=getattr(a, "widths", None),
                            budget=getattr(a, "budget", None))
    device = pick_device(cfg.device)
    set_seed(cfg.seed)
    asset, tok, data = load_setup(cfg)
    folder = Path(a.adapters or outputs_dir(STUDY, cfg.profile) / f"adapters-{getattr(a, 'style', 'spnet')}")
    if a.cmd == "train":
        model = switchable.build(asset.path, cfg.widths, cfg.lora_rank, device)
        tr = train_switchable(model, qa_loader(data.train, cfg.batch_size, tok.eos_token_id, cfg.seed), a.style,
                              cfg.steps, cfg.lr, device, cfg.kd_temperature)
        model.save(folder)
        print(json.dumps({"adapters": str(folder), "steps": tr.steps, "final_loss": tr.losses[-1]}))
        return 0
    model = switchable.load(asset.path, folder, device)
    if a.cmd == "eval":
        bitmap = json.loads(a.bitmap) if a.bitmap.strip().startswith("{") else a.bitmap
        print(json.dumps({"bitmap": switchable.bitmap_str(model.set_config(bitmap)),
                          **evaluate(model, tok, data, bitmap, cfg, device)}))
        return 0
    sens = search.sensitivity(model, calibration(data, tok, cfg, device, 2))
    if a.cmd == "sensitivity":
        print(json.dumps(sens, indent=2))
        return 0
    rows = search.greedy_search(model, sens, lambda bm: evaluate(model, tok, data, bm, cfg, device), cfg.budget,
                                model.block_params())
    print(_csv(rows))
    print(json.dumps(search.best_bitmap(rows)))
    return 0
