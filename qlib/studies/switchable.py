"""Study 06: one GPT-2 switchable between 2/4/8/full-precision bits per block, trained three ways, then
per-block sensitivity and a greedy mixed-precision search under an F1 budget, on extractive QA.

Also the command line of the seed's main.py / eval.py / sensitivity_analysis.py / greedy_search.py:
`python -m qlib train|eval|sensitivity|search ...` (see `main`).
"""
from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from qlib import accounting, adapters, assets, budget, choice, hub, metrics, qa, results, search, switchable
from qlib.choice import Item
from qlib.config import make_config
from qlib.core.device import pick_device, set_seed
from qlib.core.errors import ArgumentParser, QlabError
from qlib.core.io import atomic_write_text, check_replaceable
from qlib.core.paths import outputs_dir, results_dir
from qlib.quant.uniform import check_width
from qlib.studies import StudyResult, block_precision, staged
from qlib.switchable import STYLES, style_bitmaps, train_switchable

STUDY = "06_switchable_precision"


# the asset role of each id parameter (`python -m qlib run` resolves a -p id before papermill starts)
ASSET_ROLES = {"model_id": "causal-lm", "block_model_id": "llama-arch", "dataset_id": "qa"}


@dataclass(frozen=True)
class Config:
    """Notebook 06's parameters."""

    profile: str = "default"
    seed: int = 0
    model_id: str = "gpt2-stdlib"
    dataset_id: str = "stdlib-cloze"
    styles: tuple[str, ...] = ("spnet", "cyclic", "instantnet")
    widths: tuple[int, ...] = (2, 4, 8, 32)
    single_baselines: bool = True   # one model per width trained at that width alone
    gen_data: bool = True           # also train search_style on the FP model's own completions (LLM-QAT)
    steps: int = 40                 # optimizer steps per training run, whatever the style (t4: 300)
    batch_size: int = 8
    lr: float = 3e-3
    lora_rank: int = 8
    kd_temperature: float = 1.0
    budget: float = 0.02            # greedy search: largest drop (0..1) of the metric (accuracy or F1)
                                    # vs full precision
    search_style: str = "instantnet"
    n_eval: int | None = None       # eval questions (None: all): reported, never searched on
    n_dev: int = 200                # training questions held out of training: the greedy search's dev set
    n_calib: int = 32
    max_new_tokens: int = 8
    max_len: int | None = None      # prompt + answer tokens (None: the model's context); contexts are cut to fit
    latency_repeats: int = 3
    block_model_id: str | None = "smollm2-135m"  # post-training block search on a real model (None/"": skip)
    block_low: int = 4
    block_high: int = 8
    block_budget: float = 0.05      # block search: largest calibration perplexity increase over all-`high`
    block_context: int = 256
    block_calib_tokens: int = 4096  # block search: its dev tokens (training texts), never the reported ones
    block_eval_tokens: int = 4096   # the shared evaluation set's first block_eval_tokens / block_context windows
    block_qa_questions: int = 120   # held-out cloze questions per bitmap on the real model (0: skip)
    block_random_orders: int = 20   # the search's control distribution (its percentile among them)
    device: str = "auto"


PROFILES: dict[str, dict[str, Any]] = {
    "smoke": dict(model_id="gpt2-stdlib-tiny", steps=2, batch_size=4, lora_rank=2, n_eval=6, n_dev=6, n_calib=4,
                  max_new_tokens=3, latency_repeats=1, block_model_id="llama-stdlib-tiny", block_context=64,
                  block_calib_tokens=256, block_eval_tokens=512, block_qa_questions=6,
                  block_random_orders=3),
    "default": {},
    # 7 training runs (3 styles + 4 single widths) of fp32 fake quantization on a T4: 300 steps of 8 x 384
    # tokens keep each run to minutes and the peak near 7 GiB (16 x 1024 would need ~30 GiB)
    "t4": dict(model_id="gpt2", dataset_id="squad", steps=300, batch_size=8, lr=5e-4, lora_rank=16,
               n_eval=500, max_new_tokens=16, max_len=384),
    "full": dict(block_eval_tokens=32_768),  # the whole shared set (config.FULL_STUDIES)
}


def config(profile: str = "default", **overrides: Any) -> Config:
    cfg = make_config(Config, PROFILES, profile, **overrides)
    for w in cfg.widths:
        check_width(w)
    bad = [s for s in cfg.styles if s not in STYLES[:3]]
    if bad or cfg.search_style not in cfg.styles:
        raise QlabError(f"styles must be among spnet, cyclic, instantnet and include search_style "
                        f"{cfg.search_style!r}; got {list(cfg.styles)}")
    return cfg


# ---------------------------------------------------------------- QA as a language-model task

def encode(ex: qa.QAExample, tok: Any, max_len: int, answer_room: int) -> Item | None:
    """Prompt and target ids. Multiple-choice examples: `choice.encode_cloze` (the filled-in sentence is the
    target). Others: context + question + "A:", target the answer, a context too long for the model cut around
    the answer, never the answer."""
    if ex.choices:
        return choice.encode_cloze(ex, tok, max_len)
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


def qa_loader(items: list[Item], batch_size: int, pad: int, seed: int) -> DataLoader:
    """Right-padded batches; the loss is on the target (and its end token) only."""
    def collate(batch: list[Item]) -> dict[str, torch.Tensor]:
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
def generate(model: Any, tok: Any, prompts: list[list[int]], max_new: int, device: torch.device,
             batch_size: int = 32) -> list[list[int]]:
    """Greedy continuations (ids, cut at the first newline or end token), leaving room in the context for an end token;
    prompts of similar length left-padded together."""
    out: dict[int, list[int]] = {}
    newline, limit = set(tok("\n")["input_ids"]), model.config.n_positions
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        n = max(len(prompts[j]) for j in chunk)
        ids = torch.tensor([[tok.eos_token_id] * (n - len(prompts[j])) + prompts[j] for j in chunk], device=device)
        mask = torch.tensor([[0] * (n - len(prompts[j])) + [1] * len(prompts[j]) for j in chunk], device=device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(1, min(max_new, limit - n - 1)),
                             do_sample=False, pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        for j, g in zip(chunk, gen[:, n:].tolist()):
            cut = next((k for k, t in enumerate(g) if t == tok.eos_token_id or t in newline), len(g))
            out[j] = g[:cut]
    return [out[j] for j in range(len(prompts))]


def answer(model: Any, tok: Any, prompts: list[list[int]], max_new: int, device: torch.device) -> list[str]:
    """Greedy answers as text (generation scoring, for datasets without candidates)."""
    return [tok.decode(g, skip_special_tokens=True).strip() for g in generate(model.model, tok, prompts, max_new,
                                                                               device)]


@dataclass
class QAData:
    train: list[Item]
    train_examples: list[qa.QAExample]
    eval_examples: list[qa.QAExample]
    eval_items: list[Item]
    asset: assets.Resolved
    dropped: int
    dev_examples: list[qa.QAExample] = field(default_factory=list)  # held out of training: what the search sees
    dev_items: list[Item] = field(default_factory=list)

    def dev(self) -> QAData:
        """The same data with the dev questions in the evaluation's place (the search scores these, never the
        reported ones)."""
        return replace(self, eval_examples=self.dev_examples, eval_items=self.dev_items)

    @property
    def multiple_choice(self) -> bool:
        return all(ex.choices for ex in self.eval_examples)

    @property
    def metric(self) -> str:
        """What the study reports and the search budgets: accuracy over candidates, else SQuAD's F1."""
        return "accuracy" if self.multiple_choice else "f1"


def load_data(cfg: Config, tok: Any, max_len: int) -> QAData:
    """Train, dev (`n_dev` training questions drawn with the seed and held out of training) and eval questions,
    encoded to fit `max_len`."""
    train_ex, eval_ex, asset = qa.load_qa(cfg.dataset_id)
    enc = lambda exs: [(e, encode(e, tok, max_len, cfg.max_new_tokens)) for e in exs]  # noqa: E731
    train = [(e, x) for e, x in enc(train_ex) if x is not None]
    dev_at = set(random.Random(cfg.seed).sample(range(len(train)), min(cfg.n_dev, len(train) // 5)))
    dev = [p for i, p in enumerate(train) if i in dev_at]
    train = [p for i, p in enumerate(train) if i not in dev_at]
    ev = [(e, x) for e, x in enc(eval_ex) if x is not None][: cfg.n_eval]
    return QAData([x for _, x in train], [e for e, _ in train], [e for e, _ in ev], [x for _, x in ev], asset,
                  len(train_ex) - len(train) - len(dev), [e for e, _ in dev], [x for _, x in dev])


def load_setup(cfg: Config) -> tuple[assets.Resolved, Any, QAData]:
    """The base GPT-2, its tokenizer, and the QA data encoded to fit its context."""
    from transformers import AutoConfig, AutoTokenizer

    asset = assets.resolve_model("causal-lm", cfg.model_id)
    tok = AutoTokenizer.from_pretrained(asset.path)
    n_positions = AutoConfig.from_pretrained(asset.path).n_positions
    return asset, tok, load_data(cfg, tok, min(n_positions, cfg.max_len or n_positions))


def calibration(data: QAData, tok: Any, cfg: Config, device: torch.device,
                n_batches: int) -> list[dict[str, torch.Tensor]]:
    """Training batches for the sensitivity analysis (their own shuffle: seed + 1)."""
    loader = qa_loader(data.train, cfg.batch_size, tok.eos_token_id, cfg.seed + 1)
    return [{k: v.to(device) for k, v in b.items()} for _, b in zip(range(n_batches), loader)]


def predict(model: switchable.SwitchableQuantLoRAModel, tok: Any, data: QAData, bitmap: Any,
            cfg: Config, device: torch.device) -> list[str]:
    """One answer per eval question at `bitmap`: the chosen candidate, or the generated text."""
    model.set_config(bitmap)
    prompts = [p for p, _ in data.eval_items]
    if data.multiple_choice:
        return choice.choose(model, tok, data.eval_examples, prompts, device, share_prompt=False)  # a small model
    return answer(model, tok, prompts, cfg.max_new_tokens, device)


def scores(preds: list[str], data: QAData) -> dict[str, float]:
    """Accuracy over candidates (multiple choice) or SQuAD's EM and F1."""
    if data.multiple_choice:
        return {"accuracy": choice.accuracy(data.eval_examples, preds)}
    return qa.em_f1(preds, [e.answer for e in data.eval_examples])


def evaluate(model: switchable.SwitchableQuantLoRAModel, tok: Any, data: QAData, bitmap: Any,
             cfg: Config, device: torch.device) -> dict[str, float]:
    return scores(predict(model, tok, data, bitmap, cfg, device), data)


def baselines(data: QAData) -> dict[str, Any]:
    """What a model that reads nothing (chance, the most frequent training answer) or a rule of thumb (the first
    parameter or entity the question does not name) scores on the same questions, with their answers."""
    golds = [e.answer for e in data.eval_examples]
    heur = qa.heuristic_preds(data.eval_examples)
    if not data.multiple_choice:
        return {"heuristic": qa.em_f1(heur, golds)}
    preds = {"majority": qa.majority_choices(data.train_examples, data.eval_examples), "heuristic": heur}
    return {"chance": {"accuracy": qa.chance_accuracy(data.eval_examples)},
            **{k: {**scores(p, data), "preds": p} for k, p in preds.items()}}


def perplexity_on_answers(model: switchable.SwitchableQuantLoRAModel, data: QAData, pad: int) -> float:
    """exp(mean CE) on the gold target tokens of the eval set (teacher forcing)."""
    loader = qa_loader(data.eval_items, 16, pad, 0)
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in loader:
            k = int((b["labels"][:, 1:] != -100).sum())
            nll += model(**{k2: v.to(next(model.parameters()).device) for k2, v in b.items()}).loss.item() * k
            n += k
    return float(torch.exp(torch.tensor(nll / n)))


def self_generated(asset: assets.Resolved, tok: Any, data: QAData, cfg: Config,
                   device: torch.device) -> tuple[list[Item], list[dict[str, str]]]:
    """LLM-QAT's data (Liu et al. 2023, the seed's `gen_data`): the full-precision model, prompted with each
    training question, writes its own completion, which replaces the gold target; as many questions as the
    training run reads (steps x batch), drawn with the run's seed."""
    fp = switchable.load_base(asset.path).to(device).eval()
    g = torch.Generator().manual_seed(cfg.seed)
    pick = torch.randperm(len(data.train), generator=g)[: cfg.steps * cfg.batch_size].tolist()
    prompts = [data.train[i][0] for i in pick]
    n_new = max(len(data.train[i][1]) for i in pick)
    outs = generate(fp, tok, prompts, n_new, device)
    items = [(p, o + [tok.eos_token_id]) for p, o in zip(prompts, outs)]
    rows = [{"id": data.train_examples[i].id, "prompt": tok.decode(p), "completion": tok.decode(o),
             "gold": tok.decode(data.train[i][1][:-1])} for i, p, o in zip(pick, prompts, outs)]
    return items, rows


# ---------------------------------------------------------------- the study

@dataclass
class SwitchableResult(StudyResult):
    losses: dict[str, list[float]]
    sensitivity: dict[str, Any]
    search_rows: list[dict[str, Any]]
    best: dict[str, Any]
    baselines: dict[str, Any]
    blocks: Any = None              # block_precision.BlockSearchResult (None: not run)


def _uniform_rows(name: str, model: Any, tok: Any, data: QAData, cfg: Config, device: torch.device,
                  widths: tuple[int, ...], train: Any, ids: dict[str, str], base: dict[str, Any],
                  answers: dict[str, list[str]]) -> list[dict[str, Any]]:
    """One row per width; each width's answers go to `answers` (per-example file), with paired differences
    against the majority answer and the heuristic where the questions are multiple choice."""
    rows = []
    prompt = torch.tensor([data.eval_items[0][0]], device=device)
    lora = sum(p.numel() for p in model.lora_parameters())  # every width's adapter
    total = sum(p.numel() for n, p in model.model.named_parameters() if "lora_" not in n) + lora
    for w in tqdm(widths, desc=f"{name}: each width on {len(data.eval_examples)} questions"):
        method = f"switchable_{name}_{w}"
        with metrics.PeakMemory(device) as mem:
            answers[method] = predict(model, tok, data, w, cfg, device)
        ppl = perplexity_on_answers(model, data, tok.eos_token_id)
        tps = metrics.decode_speed(model.model, prompt, cfg.max_new_tokens, cfg.latency_repeats,
                                   tok.eos_token_id, device)
        row = results.make_row(
            method, model=ids["model"], dataset=ids["data"], **scores(answers[method], data),
            perplexity=ppl, bits_per_param=float(w), tokens_per_s=tps, inference_peak_mem_bytes=mem.peak_bytes,
            peak_mem_source=mem.source, train_time_s=train.train_time_s, train_steps=train.steps,
            trainable_params=lora, total_params=total, style=name, bitmap=str(w),
            perplexity_note="gold target tokens of the eval questions, teacher-forced")
        for ref in ("majority", "heuristic") if data.multiple_choice else ():
            metrics.with_difference(row, f"accuracy_diff_vs_{ref}",
                                    choice.versus(data.eval_examples, base[ref]["preds"], answers[method], cfg.seed))
        rows.append(row)
    return rows


def plan(cfg: Config, model_config: Any, seq: int, device: torch.device) -> list[budget.Prediction]:
    """Every training run (styles, then single widths): LoRA on a frozen fp32 base in fp32 (no autocast), a
    fake-quantized copy of each weight kept for backward, and instantnet's teacher logits; a step of spnet or
    instantnet runs forward and backward once per bitmap it visits, one at a time."""
    a = accounting.arch(model_config)
    linears = accounting.params_by_kind(accounting.meta_model(model_config))["block_linears"]
    out = []
    for name, widths, style, _ in _runs(cfg):
        visits = 1 if style in ("cyclic", "single") else len(style_bitmaps(style, widths, a.layers))
        extra = {"fake_quant_copies": 4 * linears}
        if style == "instantnet":
            extra["teacher_logits"] = 4 * cfg.batch_size * seq * a.vocab
        out.append(budget.predict(f"06 {name}, batch {cfg.batch_size} x {seq}, {visits} pass(es) a step",
                                  model_config, "lora", batch=cfg.batch_size, seq=seq, steps=cfg.steps * visits,
                                  compute=torch.float32, rank=cfg.lora_rank,
                                  targets=tuple(adapters.target_modules("gpt2", "attention+mlp")), extra=extra))
    return out


def gpu_predictions(profile: str) -> list[budget.Prediction]:
    """This profile's training runs as a T4 would run them, predicted from the hub's true config
    (the study contract)."""
    cfg = config(profile)
    return plan(cfg, budget.hub_config(cfg.model_id), cfg.max_len or 1024, budget.T4)


def _runs(cfg: Config) -> list[tuple[str, tuple[int, ...], str, bool]]:
    """(name, widths, style, on self-generated data) of every training run."""
    runs = [(s, cfg.widths, s, False) for s in cfg.styles]
    runs += [(f"single_w{w}", (w,), "single", False) for w in cfg.widths] if cfg.single_baselines else []
    return runs + ([(f"{cfg.search_style}_selfgen", cfg.widths, cfg.search_style, True)] if cfg.gen_data else [])


@staged(STUDY)
def run(cfg: Config) -> SwitchableResult:
    """Train each style (the single-width baselines, and the search style on its own generations), evaluate every
    uniform width against the baselines, then sensitivity and greedy search on the `search_style` model;
    metrics.json, per_example.csv.gz, sensitivity.json, search_results.csv, gen_data.jsonl."""
    device = pick_device(cfg.device)
    set_seed(cfg.seed)
    asset, tok, data = load_setup(cfg)
    seq = max(len(p) + len(a) for p, a in data.train)
    gpu_plan = budget.announce(plan(cfg, hub.model_config(asset.path), seq, device), device) \
        if budget.wanted(cfg.profile, device) else None
    ids = {"model": asset.id, "data": data.asset.id}
    res_dir = results_dir(STUDY, cfg.profile)
    base = baselines(data)
    answers = {"id": [e.id for e in data.eval_examples], "answer": [e.answer for e in data.eval_examples],
               **{f"baseline_{k}": v["preds"] for k, v in base.items() if "preds" in v}}
    sections = metrics.Sections()
    with sections("self-generated training data"):
        gen_items, gen_rows = self_generated(asset, tok, data, cfg, device) if cfg.gen_data else ([], [])
    if gen_rows:
        atomic_write_text(res_dir / "gen_data.jsonl", "".join(json.dumps(r) + "\n" for r in gen_rows))
    rows, losses, trained = _train_styles(cfg, asset, tok, data, gen_items, device, sections,
                                          ids=ids, base=base, answers=answers)
    if cfg.gen_data:
        _selfgen_differences(rows, answers, data, cfg)
    model = trained[cfg.search_style]
    with sections("sensitivity and greedy search"):
        sens = search.sensitivity(model, calibration(data, tok, cfg, device,
                                                     max(1, cfg.n_calib // cfg.batch_size)))
        search_rows, best = _search(model, tok, data, cfg, device, sens, base, answers)
    atomic_write_text(res_dir / "sensitivity.json", json.dumps(sens, indent=2))
    atomic_write_text(res_dir / "search_results.csv", _csv(search_rows))
    results.write_per_example(STUDY, cfg.profile, "per_example", answers)
    with sections("block search on the real model"):
        blocks = run_blocks(cfg, device)
    doc_assets = {"model": {"role": "causal-lm", **asset.provenance()},
                  "data": {**data.asset.provenance(), "n_train": len(data.train), "n_eval": len(data.eval_items),
                           "n_train_dropped_too_long": data.dropped, "n_self_generated": len(gen_items)}}
    path = results.write_metrics(STUDY, cfg.profile, cfg.seed, metrics.runtime_env(device), doc_assets, rows,
                                 config={**asdict(cfg), "styles": list(cfg.styles), "widths": list(cfg.widths)},
                                 metric=data.metric, best_bitmap=best,
                                 baselines={k: {m: v for m, v in b.items() if m != "preds"} for k, b in base.items()},
                                 gpu_plan=gpu_plan,
                                 block_search=blocks and {"spec": asdict(blocks[1]),
                                                          "sensitivity": blocks[0].sensitivity,
                                                          "chosen": blocks[0].chosen, "steps": blocks[0].steps,
                                                          "rows": blocks[0].rows, "qa_rows": blocks[0].qa_rows,
                                                          **blocks[0].info},
                                 benchmark=benchmark(best, blocks[0] if blocks else None),
                                 section_seconds=sections.seconds,
                                 fake_quantization_note="weights are fake-quantized (rounded, kept in fp32): "
                                 "memory and speed do not fall with the width; the bits are what a packed "
                                 "deployment would store")
    return SwitchableResult(rows, results.load_metrics(path), path, losses, sens, search_rows, best, base,
                            blocks[0] if blocks else None)


def _train_styles(cfg: Config, asset: Any, tok: Any, data: QAData, gen_items: list[Any], device: torch.device,
                  sections: metrics.Sections, *, ids: dict[str, str], base: dict[str, Any],
                  answers: dict[str, list[str]]) -> tuple[list[dict[str, Any]], dict[str, list[float]], dict[str, Any]]:
    """Train each run of `_runs` and evaluate every width it holds (`_uniform_rows`); the multi-width adapters are
    saved and kept for the search."""
    out = outputs_dir(STUDY, cfg.profile)
    rows, losses, trained = [], {}, {}
    for name, widths, style, selfgen in _runs(cfg):
        set_seed(cfg.seed)
        model = switchable.build(asset.path, widths, cfg.lora_rank, device)
        loader = qa_loader(gen_items if selfgen else data.train, cfg.batch_size, tok.eos_token_id, cfg.seed)
        with sections("training"):
            tr = train_switchable(model, loader, style, cfg.steps, cfg.lr, device, cfg.kd_temperature,
                                  desc=f"{name}: {cfg.steps} steps")
        losses[name] = tr.losses
        with sections("evaluating every width"):
            rows += _uniform_rows(name, model, tok, data, cfg, device, widths, tr, ids, base, answers)
        if style != "single" and not selfgen:
            model.save(out / f"adapters-{name}")
            trained[name] = model
    return rows, losses, trained


def _selfgen_differences(rows: list[dict[str, Any]], answers: dict[str, list[str]], data: QAData,
                         cfg: Config) -> None:
    """Self-generated-data rows: their accuracy minus the gold-trained model's at the same width (paired)."""
    for row in rows:
        gold = row["method"].replace("_selfgen_", "_")
        if "_selfgen_" in row["method"] and data.multiple_choice:
            metrics.with_difference(row, "accuracy_diff_vs_gold_data",
                                    choice.versus(data.eval_examples, answers[gold], answers[row["method"]], cfg.seed))


def _search(model: Any, tok: Any, data: QAData, cfg: Config, device: torch.device, sens: dict[str, Any],
            base: dict[str, Any], answers: dict[str, list[str]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Greedy search under the budget on the dev questions; the chosen bitmap then answers the reported questions
    (its `dev_*` keys: what the search saw), compared with full precision and the baselines there."""
    bar = tqdm(desc="greedy search on dev (evaluations)")
    dev = data.dev()

    def score(bitmap: list[int]) -> dict[str, float]:
        bar.update(1)
        return evaluate(model, tok, dev, bitmap, cfg, device)
    rows = search.greedy_search(model, sens, score, cfg.budget, model.block_params(), data.metric)
    bar.close()
    chosen = search.best_bitmap(rows)
    answers["best_bitmap"] = predict(model, tok, data, chosen["bitmap"], cfg, device)
    held, fp = scores(answers["best_bitmap"], data), evaluate(model, tok, data, max(model.widths), cfg, device)
    best = {"bitmap": chosen["bitmap"], "avg_bits": chosen["avg_bits"], **held,
            "drop": fp[data.metric] - held[data.metric], "n_dev": len(dev.eval_examples),
            **{f"dev_{k}": chosen[k] for k in (data.metric, "drop")}}
    model.set_config(max(model.widths))
    for ref in ("majority", "heuristic") if data.multiple_choice else ():
        metrics.with_difference(best, f"accuracy_diff_vs_{ref}",
                                choice.versus(data.eval_examples, base[ref]["preds"], answers["best_bitmap"], cfg.seed))
    return rows, best


def benchmark(best: dict[str, Any], blocks: Any) -> dict[str, Any]:
    """Issue bar: the best switchable configuration above the constant answer by more than its interval, for the
    trained stand-in (the search's bitmap) and the real model (the block search's bitmap on the questions)."""
    out: dict[str, Any] = {"bar": "accuracy above the most frequent training answer, 95 % interval excluding 0"}
    if "accuracy_diff_vs_majority" in best:
        out["trained_standin"] = _against_bar(best, "bitmap")
    greedy = next((r for r in (blocks.qa_rows if blocks else []) if r["bitmap_name"] == "greedy"), None)
    if greedy:
        out["real_model_greedy"] = _against_bar(greedy)
    return out


def _against_bar(row: dict[str, Any], *extra: str) -> dict[str, Any]:
    keys = (*extra, "accuracy", "accuracy_diff_vs_majority", "accuracy_diff_vs_majority_lo",
            "accuracy_diff_vs_majority_hi")
    return {**{k: row[k] for k in keys}, "met": bool(row["accuracy_diff_vs_majority_lo"] > 0)}


def run_blocks(cfg: Config, device: torch.device) -> tuple[Any, Any] | None:
    """The post-training block search on a real model (`block_*` parameters), per-token losses saved."""
    if not cfg.block_model_id:
        return None
    spec = block_precision.BlockSearchSpec(cfg.block_model_id, "stdlib-code", cfg.block_low, cfg.block_high,
                                           cfg.block_budget, cfg.block_context,
                                           cfg.block_calib_tokens, cfg.block_eval_tokens, cfg.seed,
                                           cfg.block_qa_questions, random_orders=cfg.block_random_orders)
    res = block_precision.run_block_search(spec, device)
    results.write_per_example(STUDY, cfg.profile, "block_search_per_token_nll", res.nll)
    if res.qa_answers:
        results.write_per_example(STUDY, cfg.profile, "block_search_qa_per_example", res.qa_answers)
    return res, spec


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def findings(res: SwitchableResult) -> str:
    """Markdown findings from this run's numbers."""
    metric, base = res.doc["metric"], res.baselines
    by = {r["method"]: r for r in res.rows}
    names = list(dict.fromkeys(r["style"] for r in res.rows))
    widths = sorted({int(r["bitmap"]) for r in res.rows})
    if metric == "accuracy":
        lines = [f"- Baselines on the same {res.doc['assets']['data']['n_eval']} questions (multiple choice over the "
                 f"context's parameters): chance {base['chance']['accuracy']:.3f}, the most frequent training answer "
                 f"{base['majority']['accuracy']:.3f}, the first parameter the question does not name "
                 f"{base['heuristic']['accuracy']:.3f}."]
    else:
        lines = [f"- The heuristic (the first parameter, or capitalised span, of the context that the question does "
                 f"not name) scores EM {base['heuristic']['em']:.3f} / F1 {base['heuristic']['f1']:.3f}."]
    for w in widths:
        parts = [f"{n} {by[f'switchable_{n}_{w}'][metric]:.3f}" for n in names if f"switchable_{n}_{w}" in by]
        lines.append(f"- {w} bits, {metric}: " + ", ".join(parts) + ".")
    if metric == "accuracy":
        top = max(res.rows, key=lambda r: r["accuracy"])
        lines.append(f"- Best uniform row `{top['method']}` vs the majority answer: "
                     f"{results.points_interval(top, 'accuracy_diff_vs_majority')}; vs the heuristic: "
                     f"{results.points_interval(top, 'accuracy_diff_vs_heuristic')}.")
        gen = [r for r in res.rows if r.get("accuracy_diff_vs_gold_data") is not None]
        if gen:
            diffs = [f"{r['bitmap']} bits {results.points_interval(r, 'accuracy_diff_vs_gold_data')}" for r in gen]
            lines.append("- Trained on the FP model's own completions (LLM-QAT) minus trained on the gold sentences, "
                         "same style and steps: " + "; ".join(diffs) + ".")
    b = res.best
    lines.append(f"- Greedy search on {b['n_dev']} dev questions held out of training (budget: {metric} drop <= "
                 f"{res.doc['config']['budget']}; there {b['dev_' + metric]:.3f}, drop {b['dev_drop']:+.3f}): "
                 f"bitmap `{b['bitmap']}` = {b['avg_bits']:.1f} average bits; on the reported questions {metric} "
                 f"{b[metric]:.3f} (drop {b['drop']:+.3f} from full precision)"
                 + (f"; vs the majority answer {results.points_interval(b, 'accuracy_diff_vs_majority')}, "
                    f"vs the heuristic {results.points_interval(b, 'accuracy_diff_vs_heuristic')}."
                    if metric == "accuracy" else "."))
    order = search.layer_order(res.sensitivity)
    lines.append(f"- Blocks from least to most sensitive: {order} (MSE of the block output when only its weights are "
                 "rounded to the lowest width).")
    if "stdlib" in res.doc["assets"]["model"]["id"]:
        lines.append("- The trained model is a small stand-in pretrained here on the standard library: these rows "
                     "show the mechanics of switchable training, not its quality at scale (the post-training block "
                     "search below runs on a real model).")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line (the seed's scripts)

def main(argv: list[str] | None = None) -> int:
    """train | eval | sensitivity | search, on a saved switchable adapter folder."""
    ap = ArgumentParser(prog="python -m qlib")
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
    cfg = config(a.profile, steps=getattr(a, "steps", None), widths=getattr(a, "widths", None),
                            budget=getattr(a, "budget", None))
    device = pick_device(cfg.device)
    folder = Path(a.adapters or outputs_dir(STUDY, cfg.profile) / f"adapters-{getattr(a, 'style', 'spnet')}")
    if a.cmd == "train":
        check_replaceable(folder, ("switchable.json",))  # before minutes of training, not after
    set_seed(cfg.seed)
    asset, tok, data = load_setup(cfg)
    if a.cmd == "train":
        model = switchable.build(asset.path, cfg.widths, cfg.lora_rank, device)
        tr = train_switchable(model, qa_loader(data.train, cfg.batch_size, tok.eos_token_id, cfg.seed), a.style,
                              cfg.steps, cfg.lr, device, cfg.kd_temperature)
        model.save(folder)
        print(json.dumps({"adapters": str(folder), "steps": tr.steps, "final_loss": tr.losses[-1]}))
        return 0
    model = switchable.load(asset.path, folder, device)
    if a.cmd == "eval":
        try:
            bitmap = json.loads(a.bitmap) if a.bitmap.strip().startswith("{") else a.bitmap
        except json.JSONDecodeError as e:
            raise QlabError(f"bad bitmap: {a.bitmap!r} is not valid JSON ({e.msg})") from None
        print(json.dumps({"bitmap": switchable.bitmap_str(model.set_config(bitmap)),
                          **evaluate(model, tok, data, bitmap, cfg, device)}))
        return 0
    sens = search.sensitivity(model, calibration(data, tok, cfg, device, 2))
    if a.cmd == "sensitivity":
        print(json.dumps(sens, indent=2))
        return 0
    rows = search.greedy_search(model, sens, lambda bm: evaluate(model, tok, data.dev(), bm, cfg, device),
                                cfg.budget, model.block_params(), data.metric)
    print(_csv(rows))
    print(json.dumps(search.best_bitmap(rows)))
    return 0
