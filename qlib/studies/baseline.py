"""Study 01: full-precision fine-tune of the BERT-family encoder, the baseline every BERT study compares to."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from qlib import assets, budget, data, metrics, models, results
from qlib.config import make_config
from qlib.core.device import compute_dtype_name, pick_device, set_seed
from qlib.core.io import atomic_dir
from qlib.core.paths import outputs_dir
from qlib.studies import staged
from qlib.train import TrainResult, finetune, predict, seed_column, seeds

STUDY = "01_baseline"
# the BERT studies' rows side by side in the summary (same encoder, same held-out split)
BERT_TABLE = "BERT compression (01-04, same encoder, same held-out split)"
README = results.readme_block(summary_tables={BERT_TABLE: ["fp32"]})


# the asset role of each id parameter (`python -m qlib run` resolves a -p id before papermill starts)
ASSET_ROLES = {"model_id": "encoder", "dataset_id": "classification"}


@dataclass(frozen=True)
class Config:
    """Notebook 01: full-precision fine-tune of the BERT-family encoder (one field per parameter)."""

    profile: str = "default"
    seed: int = 0
    model_id: str = "minilm"          # registry key or hub id
    dataset_id: str = "mr-polarity"   # registry key or hub id
    max_length: int = 64
    n_train: int | None = None        # None: the whole training split
    n_eval: int | None = None
    epochs: float = 2.0
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    n_seeds: int = 3                  # fine-tunes from seeds seed, seed+1, ...: accuracy mean ± sd (04 compares)
    latency_repeats: int = 30
    device: str = "auto"
    random_init: bool = False         # `gpu` profile: true architecture, random weights


PROFILES: dict[str, dict[str, Any]] = {
    "smoke": dict(n_train=64, n_eval=64, epochs=1, batch_size=16, max_length=32,
                  latency_repeats=3, n_seeds=2),
    "default": dict(),
    "t4": dict(model_id="bert-base-uncased", dataset_id="sst2", max_length=128, epochs=3,
               lr=2e-5),
    "gpu": dict(model_id="bert-base-uncased", random_init=True, max_length=128, epochs=1,
                n_train=2048, n_eval=512, latency_repeats=50),
}


def config(profile: str = "default", **overrides: Any) -> Config:
    """The notebook-01 config for a profile, with overrides."""
    return make_config(Config, PROFILES, profile, **overrides)


@dataclass
class BaselineResult:
    """Everything notebook 01 shows: the row, the loss curve, predictions, where things went."""

    row: dict[str, Any]
    train: TrainResult
    preds: list[int]
    labels: list[int]
    model_dir: Path
    metrics_path: Path
    doc: dict[str, Any]


def classifier_latency(model: torch.nn.Module, tokenizer: Any, texts: list[str], batch: int,
                       max_length: int, device: torch.device, repeats: int) -> dict[str, float]:
    """Median forward latency on `batch` held-out sentences padded to max_length (a fixed shape)."""
    enc = tokenizer(texts[:batch], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return forward_latency(model, dict(enc), device, repeats)


def forward_latency(model: torch.nn.Module, enc: dict[str, torch.Tensor], device: torch.device,
                    repeats: int) -> dict[str, float]:
    """Median forward latency of one fixed batch (inference mode, CUDA synchronized)."""
    enc = {k: v.to(device) for k, v in enc.items()}
    model.to(device).eval()

    def step() -> None:
        with torch.inference_mode():
            model(**enc)

    return metrics.measure_latency(step, warmup=max(2, repeats // 10), repeats=repeats, device=device)


def plan(cfg: Config, model_config: Any, n_train: int, device: torch.device) -> list[budget.Prediction]:
    """The fine-tune's predicted peak GPU memory and time (fp32 weights, autocast, AdamW; padded to max_length)."""
    steps = max(1, math.ceil(cfg.epochs * math.ceil(n_train / cfg.batch_size)))
    return [budget.predict(f"01 fp32 fine-tune of {cfg.model_id}, batch {cfg.batch_size} x {cfg.max_length}",
                           model_config, "full", batch=cfg.batch_size, seq=cfg.max_length, steps=steps,
                           compute=budget.compute_for(device))]


def gpu_predictions(profile: str) -> list[budget.Prediction]:
    """This profile's training runs as a T4 would run them, predicted from the hub's true config
    (the study contract)."""
    cfg = config(profile)
    return plan(cfg, budget.hub_config(cfg.model_id), budget.train_rows(cfg.dataset_id, cfg.n_train), budget.T4)


@staged(STUDY)
def run(cfg: Config) -> BaselineResult:
    """Fine-tune, evaluate on the held-out split, save baseline-model/, measure, write metrics.json."""
    device = pick_device(cfg.device, cfg.profile)
    set_seed(cfg.seed)
    if cfg.random_init:
        return random_init_run(cfg, device)
    model_asset = assets.resolve_model("encoder", cfg.model_id)
    ds = data.load_classification(cfg.dataset_id, cfg.n_train, cfg.n_eval)
    tok = models.load_tokenizer(model_asset)
    model = models.load_classifier(model_asset, len(ds.label_names), cfg.seed)

    train_loader = data.classification_loader(tok, ds.train_texts, ds.train_labels, cfg.batch_size,
                                              cfg.max_length, shuffle=True, seed=cfg.seed)
    gpu_plan = budget.announce(plan(cfg, model.config, len(ds.train_texts), device), device) \
        if budget.wanted(cfg.profile, device) else None
    eval_loader = data.classification_loader(tok, ds.eval_texts, ds.eval_labels, 64, cfg.max_length)
    with metrics.PeakMemory(device) as mem:
        tr = finetune(model, train_loader, cfg.epochs, cfg.lr, device, cfg.weight_decay,
                      cfg.warmup_ratio, desc="fine-tune fp32")
    preds, labels = predict(model, eval_loader, device)
    quality = metrics.accuracy_f1(preds, labels)
    replicas = {s: replicate(cfg, s, model_asset, ds, tok, eval_loader, device)
                for s in seeds(cfg.seed, cfg.n_seeds)[1:]}

    model_dir = outputs_dir(STUDY, cfg.profile) / "baseline-model"
    models.save_model(model, tok, model_dir, metadata={"config": asdict(cfg), **quality})
    size = metrics.size_on_disk(model_dir / "model.safetensors")
    params = metrics.param_counts(model)
    lat1 = classifier_latency(model, tok, ds.eval_texts, 1, cfg.max_length, device, cfg.latency_repeats)
    lat8 = classifier_latency(model, tok, ds.eval_texts, 8, cfg.max_length, device, cfg.latency_repeats)

    row = results.make_row(
        "fp32", model=model_asset.id, dataset=ds.asset.id, **quality, size_bytes=size,
        bits_per_param=metrics.bits_per_param(size, params["total_params"]),
        latency_ms=lat1["median_ms"], latency_ms_b8=lat8["median_ms"],
        timing_threads=lat8["threads"], load_avg_1m=lat8["load_avg_1m"],
        tokens_per_s=8 * cfg.max_length / (lat8["median_ms"] / 1e3), speedup_vs_fp32=1.0,
        peak_mem_bytes=mem.peak_bytes, peak_mem_source=mem.source, train_time_s=tr.train_time_s,
        train_steps=tr.steps, step_time_s=tr.median_step_s, final_loss=tr.final_loss, **params)
    metrics.with_seeds(row, "accuracy",
                       [quality["accuracy"]] + [metrics.accuracy(p, labels) for p in replicas.values()])
    env = metrics.runtime_env(device)
    doc_assets = {"model": {"role": "encoder", **model_asset.provenance()}, "data": ds.provenance()}
    majority, maj = majority_row(ds.asset.id, ds.train_labels, labels, preds, cfg.seed)
    results.write_per_example(STUDY, cfg.profile, "per_example",
                              {"label": labels, "fp32": preds, "majority": maj,
                               **{seed_column("fp32", s): p for s, p in replicas.items()}})
    path = results.write_metrics(STUDY, cfg.profile, cfg.seed, env, doc_assets, [row, majority],
                                 config=asdict(cfg), latency_shape={"seq_len": cfg.max_length,
                                                                    "batches": [1, 8]}, gpu_plan=gpu_plan,
                                 seed_runs=[{"method": "fp32", "seed": s, **metrics.accuracy_f1(p, labels)}
                                            for s, p in {cfg.seed: preds, **replicas}.items()], readme=README)
    doc = results.load_metrics(path)
    return BaselineResult(row, tr, preds, labels, model_dir, path, doc)


def replicate(cfg: Config, seed: int, model_asset: Any, ds: Any, tok: Any, eval_loader: Any,
              device: torch.device) -> list[int]:
    """The same fine-tune from another seed (head init and data order), evaluated on the same sentences: its
    predictions. Nothing is saved but the predictions."""
    set_seed(seed)
    model = models.load_classifier(model_asset, len(ds.label_names), seed)
    loader = data.classification_loader(tok, ds.train_texts, ds.train_labels, cfg.batch_size, cfg.max_length,
                                        shuffle=True, seed=seed)
    finetune(model, loader, cfg.epochs, cfg.lr, device, cfg.weight_decay, cfg.warmup_ratio,
             desc=f"fine-tune fp32 (seed {seed})")
    return predict(model, eval_loader, device)[0]


def majority_row(dataset: str, train_labels: list[int], labels: list[int], fp32_preds: list[int] | None, seed: int,
                 **extra: Any) -> tuple[dict[str, Any], list[int]]:
    """The majority-answer floor as a results row (and its predictions), against the FP32 fine-tune's predictions
    on the same sentences when there are some."""
    maj = metrics.majority_preds(train_labels, len(labels))
    row = results.make_row("majority", model="constant answer", dataset=dataset, **metrics.accuracy_f1(maj, labels),
                           **extra)
    d = metrics.accuracy_difference(fp32_preds, maj, labels, seed) if fp32_preds else None
    return metrics.with_difference(row, "accuracy_diff_vs_fp32", d), maj


def random_init_run(cfg: Config, device: torch.device) -> BaselineResult:
    """gpu profile: the true bert-base architecture with random weights on random tokens (no tokenizer, no
    corpus needed on the GPU machine): training step time, peak memory, forward latency; accuracy null."""
    asset = assets.resolve_model("encoder", cfg.model_id, random_init=True)
    model = models.load_classifier(asset, 2, cfg.seed)
    vocab, n_train = model.config.vocab_size, cfg.n_train or 2048
    batches = data.random_token_batches(vocab, cfg.batch_size, cfg.max_length, -(-n_train // cfg.batch_size), cfg.seed)
    with metrics.PeakMemory(device) as mem:
        tr = finetune(model, batches, cfg.epochs, cfg.lr, device, cfg.weight_decay, cfg.warmup_ratio,
                      desc="fine-tune fp32 (random init, random tokens)")
    model_dir = outputs_dir(STUDY, cfg.profile) / "baseline-model"
    with atomic_dir(model_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    size, params = metrics.size_on_disk(model_dir / "model.safetensors"), metrics.param_counts(model)
    inputs = {b: data.random_token_batches(vocab, b, cfg.max_length, 1, cfg.seed)[0] for b in (1, 8)}
    lat = {b: forward_latency(model, {k: v for k, v in x.items() if k != "labels"}, device, cfg.latency_repeats)
           for b, x in inputs.items()}
    row = results.make_row(
        "fp32", model=asset.id, dataset="random tokens", accuracy=None, f1=None, size_bytes=size,
        bits_per_param=metrics.bits_per_param(size, params["total_params"]), latency_ms=lat[1]["median_ms"],
        latency_ms_b8=lat[8]["median_ms"], tokens_per_s=8 * cfg.max_length / (lat[8]["median_ms"] / 1e3),
        speedup_vs_fp32=1.0, peak_mem_bytes=mem.peak_bytes, peak_mem_source=mem.source,
        train_time_s=tr.train_time_s, train_steps=tr.steps, step_time_s=tr.median_step_s,
        compute_dtype=compute_dtype_name(device), final_loss=tr.final_loss,
        **params)
    doc_assets = {"model": {"role": "encoder", **asset.provenance()},
                  "data": {"id": "random tokens", "source": "torch.randint", "n_train": n_train, "n_eval": 0}}
    path = results.write_metrics(STUDY, cfg.profile, cfg.seed, metrics.runtime_env(device), doc_assets, [row],
                                 config=asdict(cfg), latency_shape={"seq_len": cfg.max_length, "batches": [1, 8]},
                                 notes="random weights on random tokens: memory and speed only, accuracy null",
                                 readme=README)
    return BaselineResult(row, tr, [], [], model_dir, path, results.load_metrics(path))


def findings(res: BaselineResult) -> str:
    """Markdown findings written from this run's numbers."""
    r = res.row
    n_eval = res.doc["assets"]["data"]["n_eval"]
    lines = [f"- **Model**: `{r['model']}`, {r['total_params'] / 1e6:.2f} M parameters, all trainable; "
             f"stored as fp32 safetensors: {r['size_bytes'] / 2**20:.1f} MiB "
             f"({r['bits_per_param']:.2f} bits/param, header included)."]
    if r["accuracy"] is None:
        lines.append("- **Quality**: not measured — random-init weights (speed and memory only).")
    else:
        lines.append(f"- **Quality** on {n_eval} held-out sentences: accuracy {r['accuracy']:.3f}, "
                     f"macro-F1 {r['f1']:.3f}, after {r['train_steps']} steps "
                     f"({r['train_time_s']:.0f} s; final loss {r['final_loss']:.3f}). Always answering the majority "
                     f"class scores {res.doc['rows'][1]['accuracy']:.3f}; a 95 % interval on an accuracy from "
                     f"{n_eval} sentences is about ±{196 * (r['accuracy'] * (1 - r['accuracy']) / n_eval) ** 0.5:.1f} "
                     "points.")
        lines.append(f"- **Seeds**: the same fine-tune from {r['n_seeds']} seeds (head initialisation and data order) "
                     f"scores {results.seed_spread_text(r, 'accuracy')} (values "
                     f"{', '.join(f'{v:.3f}' for v in r['accuracy_seed_values'])}); the saved model is the first.")
    n = r.get("timing_threads")
    threads = f"{n} thread{'s' if n != 1 else ''}, " if n else ""
    lines.append(f"- **Latency** ({res.doc['env']['device']}, {threads}"
                 f"seq {res.doc['config']['max_length']}): batch 1 {r['latency_ms']:.1f} ms, batch 8 "
                 f"{r['latency_ms_b8']:.1f} ms (medians). "
                 + ("Absolute" if r["accuracy"] is None else "These are the FP32 references that the PTQ/QAT/QLoRA "
                    "studies divide by; absolute") + " times do not transfer between machines.")
    lines.append(f"- **Peak training memory** ({r['peak_mem_source']}): {r['peak_mem_bytes'] / 2**20:.0f} MiB.")
    return "\n".join(lines)
