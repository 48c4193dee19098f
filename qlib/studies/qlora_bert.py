"""Study 04: QLoRA for the BERT-family encoder: NF4 + double-quant base, LoRA adapters, HF checkpoints."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from qlib import adapters, artifacts, assets, budget, data, hub, metrics, models, results, runmeta
from qlib.backends import bnb
from qlib.config import make_config
from qlib.core.device import compute_dtype, compute_dtype_name, pick_device, set_seed
from qlib.core.errors import QlabError
from qlib.core.paths import outputs_dir, results_dir
from qlib.studies import StudyResult, baseline, staged
from qlib.studies.ptq import baseline_settings
from qlib.train import finetune, predict, seed_column, seeds

STUDY = "04_qlora_bert"
README = results.readme_block(published={"qlora": "NF4+DQ stores 4.127 bits per quantized weight (Dettmers et al. "
                                                   "2023, QLoRA): compare with bits_per_quantized_weight, not "
                                                   "bits/param (embeddings and head stay 32-bit here)"},
                              summary_tables={baseline.BERT_TABLE: ["qlora"]},
                              gpu_pairs=[("qlora", "fp32", "01_baseline")])  # on the CPU, 01 ran the FP32 fine-tune


# the asset role of each id parameter (`python -m qlib run` resolves a -p id before papermill starts)
ASSET_ROLES = {"model_id": "encoder", "dataset_id": "classification"}


@dataclass(frozen=True)
class Config:
    """Notebook 04's parameters."""

    profile: str = "default"
    seed: int = 0
    ranks: tuple[int, ...] = (8,)         # LoRA ranks swept (t4: 8, 16, 64); main_rank's run keeps checkpoints
    main_rank: int = 8                    # lora_r of the run whose checkpoints and adapter are kept
    lora_alpha: int | None = None         # None: 2 x rank
    lora_targets: str = "attention+mlp"   # preset: attention (query/key/value) | attention+mlp
    merge_after_train: bool = False       # also save main_rank's adapter merged into the dequantized base
    gradient_checkpointing: bool = False
    optimizer: str = "adamw_torch_fused"  # the Trainer's default; adamw_torch | paged_adamw_32bit | paged_adamw_8bit
    epochs: float | None = None           # None: notebook 01's epochs, so QLoRA and FP32 take the same steps
    lr: float = 1e-3
    batch_size: int = 32
    save_steps: int | None = None         # None: twice per run
    n_seeds: int = 3                      # main_rank's fine-tune from seeds seed, seed+1, ... (01 runs as many)
    random_init: bool = False             # gpu profile: bert-base architecture, random weights + tokens
    random_arch: str = "bert-base"        # or "tiny" (the tests)
    bench_steps: int = 20                 # random-init: training steps timed per method
    seq_len: int = 128
    model_id: str | None = None           # None: notebook 01's encoder of this profile (as it ran); or a folder
    dataset_id: str | None = None         # None: notebook 01's data of this profile; or a folder of split files
    device: str = "auto"


PROFILES: dict[str, dict[str, Any]] = {
    "smoke": dict(ranks=(8,), batch_size=16, n_seeds=2),
    "default": {},
    "t4": dict(ranks=(8, 16, 64), main_rank=16, lr=2e-4),
    "gpu": dict(ranks=(16,), main_rank=16, random_init=True),
}


def config(profile: str = "default", **overrides: Any) -> Config:
    cfg = make_config(Config, PROFILES, profile, **overrides)
    knobs(cfg, cfg.main_rank)  # a bad preset or optimizer: one line
    if cfg.main_rank not in cfg.ranks:
        cfg = make_config(Config, PROFILES, profile,
                          **{**overrides, "main_rank": cfg.ranks[0]})
    return cfg


def _baseline_settings(profile: str, model_id: str | None = None, dataset_id: str | None = None) -> baseline.Config:
    """Notebook 01's encoder, data, split and sequence length as it last ran in this profile (its saved config,
    overrides included), else the profile's; `model_id` / `dataset_id` given to notebook 04 win."""
    try:
        bcfg = baseline_settings(outputs_dir(baseline.STUDY, profile) / "baseline-model")
    except (OSError, ValueError, KeyError, TypeError):
        bcfg = baseline.config(profile)
    over = {k: v for k, v in (("model_id", model_id), ("dataset_id", dataset_id)) if v}
    return dataclasses.replace(bcfg, **over)


def plan(cfg: Config, bcfg: baseline.Config, model_config: Any, n_train: int,
         device: torch.device) -> list[budget.Prediction]:
    """Each rank's QLoRA fine-tune (NF4 base, fp32 adapters, Trainer's AdamW), padded to max_length."""
    steps = max(1, round(_epochs(cfg, bcfg) * -(-n_train // cfg.batch_size)))
    return [budget.predict(f"04 QLoRA r={r} on {bcfg.model_id}, batch {cfg.batch_size} x {bcfg.max_length}",
                           model_config, "qlora", batch=cfg.batch_size, seq=bcfg.max_length, steps=steps,
                           compute=budget.compute_for(device), rank=r,
                           targets=tuple(adapters.target_modules("bert", cfg.lora_targets)), lora_dropout=True,
                           checkpointing=cfg.gradient_checkpointing,
                           optimizer_bytes=2 if cfg.optimizer == "paged_adamw_8bit" else 8)
            for r in cfg.ranks]


def gpu_predictions(profile: str) -> list[budget.Prediction]:
    """This profile's training runs as a T4 would run them, predicted from the hub's true config
    (the study contract)."""
    b = baseline.config(profile)
    return plan(config(profile), b, budget.hub_config(b.model_id), budget.train_rows(b.dataset_id, b.n_train),
                budget.T4)


def knobs(cfg: Config, rank: int) -> runmeta.LoraKnobs:
    """The recipe's knobs of one rank's run (the head is a new classifier: it always trains in full precision)."""
    return runmeta.LoraKnobs(r=rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets,
                             merge_after_train=cfg.merge_after_train,
                             gradient_checkpointing=cfg.gradient_checkpointing, optimizer=cfg.optimizer)


def _epochs(cfg: Config, bcfg: baseline.Config) -> float:
    """Notebook 01's epochs unless given: with 01's batch size too, both fine-tunes take the same steps."""
    return cfg.epochs if cfg.epochs is not None else bcfg.epochs


def _hf_dataset(tok: Any, texts: list[str], labels: list[int], max_length: int) -> Any:
    import datasets

    ds = datasets.Dataset.from_dict({"text": texts, "label": labels})
    return ds.map(lambda b: tok(b["text"], truncation=True, max_length=max_length), batched=True,
                  remove_columns=["text"])


def train_qlora(cfg: Config, rank: int, bcfg: baseline.Config, ds: Any, tok: Any,
                model_path: str, out_dir: Path | None, device: torch.device) -> dict[str, Any]:
    """One QLoRA fine-tune with transformers' Trainer; checkpoints go to out_dir when given."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    set_seed(cfg.seed)
    base = adapters.load_nf4_classifier(model_path, len(ds.label_names), device)
    model = adapters.add_lora(base, rank, cfg.lora_targets, cfg.lora_alpha,
                              gradient_checkpointing=cfg.gradient_checkpointing)
    counts = metrics.param_counts(model)
    storage = bnb.nf4_storage(model)
    train = _hf_dataset(tok, ds.train_texts, ds.train_labels, bcfg.max_length)
    steps = max(1, round(_epochs(cfg, bcfg) * -(-len(train) // cfg.batch_size)))
    half = compute_dtype(device)
    args = TrainingArguments(
        output_dir=str(out_dir or outputs_dir(STUDY, cfg.profile) / f".scratch-r{rank}"),
        per_device_train_batch_size=cfg.batch_size, max_steps=steps, learning_rate=cfg.lr,
        warmup_steps=max(1, steps // 10), lr_scheduler_type="linear", weight_decay=0.0,
        logging_steps=max(1, steps // 20), save_strategy="steps" if out_dir else "no",
        save_steps=cfg.save_steps or max(1, steps // 2), save_total_limit=3, seed=cfg.seed,
        data_seed=cfg.seed, report_to="none", use_cpu=device.type != "cuda",
        bf16=device.type == "cuda" and half == torch.bfloat16,
        fp16=device.type == "cuda" and half == torch.float16, dataloader_num_workers=0,
        optim=cfg.optimizer, disable_tqdm=False)
    trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tok,
                      data_collator=DataCollatorWithPadding(tok))
    with metrics.PeakMemory(device) as mem:
        t0 = time.perf_counter()
        trainer.train()
        train_time = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"model": model.eval(), "counts": counts, "storage": storage, "mem": mem, "base_bytes": base_bytes(model),
            "train_time_s": train_time, "steps": steps, "losses": losses}


def save_run(run_: dict[str, Any], info: runmeta.RunInfo, cfg: Config, tok: Any, adapter_dir: Path,
             quality: dict[str, float], device: torch.device) -> dict[str, Any]:
    """The adapter under its run name with its metadata (and, with merge_after_train, the merged model beside it,
    scored); what the metrics file says about them."""
    k, mem = knobs(cfg, cfg.main_rank), run_["mem"].report()
    plan = adapters.nf4_classifier_plan(device)
    extra = dict(knobs=k, peak_memory=mem, accuracy=quality["accuracy"], train_steps=run_["steps"],
                 train_time_s=run_["train_time_s"], **run_["counts"])
    adapters.save_adapter(run_["model"], tok, adapter_dir,
                          info.meta(adapter_dir.name, plan, "adapter", "fp32", **extra))
    for ckpt in sorted((adapter_dir.parent / "checkpoints" / adapter_dir.name).glob("checkpoint-*")):
        step = int(ckpt.name.split("-")[-1])  # each Trainer checkpoint loads like the adapter: say how it was made
        runmeta.write_meta(ckpt, info.meta(adapter_dir.name, plan, "adapter", "fp32", knobs=k, checkpoint_step=step))
    out = {"artifacts": {"adapter": adapter_dir.name}, "peak_memory": {"qlora": mem}}
    if cfg.merge_after_train:
        merged_dir = adapter_dir.with_name(adapter_dir.name + "_merged")
        models.save_model(merge_classifier(adapter_dir, device), tok, merged_dir, info.meta(
            merged_dir.name, plan, "merged", "fp32", merged_from=adapter_dir.name, stored_dtype="fp32", **extra))
        out["artifacts"]["merged"] = merged_dir.name
    return out


def merge_classifier(adapter_dir: Path, device: torch.device) -> torch.nn.Module:
    """Dequantize-then-merge: the adapter loaded the flag-free way, its NF4 base dequantized to fp32, the LoRA
    deltas merged in (merging into NF4 would re-round the sum onto the 4-bit grid)."""
    model, _ = artifacts.load(adapter_dir, device, dequantize=True)
    return model.merge_and_unload().to(torch.float32).eval()


def base_bytes(model: torch.nn.Module) -> int:
    """Bytes of the base as stored (NF4 linears with their constants, everything else at its dtype), no LoRA."""
    return sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if "lora_" not in k)


def predictions(model: torch.nn.Module, tok: Any, ds: Any, max_length: int, device: torch.device) -> list[int]:
    loader = data.classification_loader(tok, ds.eval_texts, ds.eval_labels, 64, max_length)
    return predict(model, loader, device)[0]


def evaluate(model: torch.nn.Module, tok: Any, ds: Any, max_length: int, device: torch.device) -> dict[str, float]:
    return metrics.accuracy_f1(predictions(model, tok, ds, max_length, device), ds.eval_labels)


def evaluate_adapter(adapter_dir: str | Path, profile: str, model_id: str | None = None,
                     dataset_id: str | None = None) -> dict[str, float]:
    """Load the adapter with `artifacts.load` (its NF4 base rebuilt from the metadata beside it; plain peft
    underneath) and score the held-out split: what a user would do."""
    bcfg = _baseline_settings(profile, model_id, dataset_id)
    device = pick_device("auto")
    asset = assets.resolve_model("encoder", bcfg.model_id)
    ds = data.load_classification(bcfg.dataset_id, bcfg.n_train, bcfg.n_eval)
    tok = models.load_tokenizer(asset)
    model, _ = artifacts.load(adapter_dir, device)  # no flags: the NF4 base as the metadata records it
    return evaluate(model, tok, ds, bcfg.max_length, device)


def verify_in_fresh_process(adapter_dir: Path, cfg: Config) -> dict[str, float]:
    """Run evaluate_adapter in a new Python process (nothing shared with this one)."""
    extra = [a for k, v in (("--model-id", cfg.model_id), ("--dataset-id", cfg.dataset_id)) if v for a in (k, v)]
    r = subprocess.run([sys.executable, "-m", "qlib.studies.qlora_bert", "verify", str(adapter_dir),
                        "--profile", cfg.profile, *extra], capture_output=True, text=True)
    if r.returncode != 0:
        raise QlabError(f"fresh-process adapter check failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


RANDOM_ARCHS = {"bert-base": models.BERT_BASE,
                "tiny": dict(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=128, max_position_embeddings=512, type_vocab_size=2)}


def random_init_rows(cfg: Config, device: torch.device, out: Path
                     ) -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
    """gpu profile: the true bert-base architecture with random weights, trained on random tokens: an FP32
    full fine-tune vs QLoRA (NF4 base + LoRA) for step time, peak memory and trainable parameters only."""
    from transformers import BertConfig, BertForSequenceClassification

    if cfg.random_arch not in RANDOM_ARCHS:
        raise QlabError(f"unknown random_arch {cfg.random_arch!r}; valid: {', '.join(RANDOM_ARCHS)}")
    arch = RANDOM_ARCHS[cfg.random_arch]
    base = models.save_random_init(out / f"random-init-{cfg.random_arch}",
                                   lambda: BertForSequenceClassification(BertConfig(**arch, num_labels=2)), cfg.seed)
    batches = data.random_token_batches(arch["vocab_size"], cfg.batch_size, cfg.seq_len, cfg.bench_steps, cfg.seed)
    rows, losses = [], {}
    for method in ("fp32", "qlora"):
        set_seed(cfg.seed)
        if method == "fp32":
            model, extra = BertForSequenceClassification.from_pretrained(base).to(device), {"bits_per_param": 32.0}
        else:
            model = adapters.add_lora(adapters.load_nf4_classifier(base, 2, device), cfg.main_rank, cfg.lora_targets,
                                      cfg.lora_alpha, gradient_checkpointing=cfg.gradient_checkpointing)
            storage, n = bnb.nf4_storage(model), metrics.param_counts(model)["total_params"]
            extra = {"bits_per_param": 8 * base_bytes(model) / n,
                     "bits_per_quantized_weight": storage["bits_per_param"],
                     "nf4_layers": storage["nf4_layers"], "lora_rank": cfg.main_rank}
        counts = metrics.param_counts(model)
        with metrics.PeakMemory(device) as mem:
            tr = finetune(model, batches, 1.0, cfg.lr, device, desc=f"{method} (random init)")
        losses[method] = tr.losses
        rows.append(results.make_row(
            method, model=f"{cfg.random_arch} (random init)", dataset="random tokens", accuracy=None, f1=None,
            peak_mem_bytes=mem.peak_bytes, peak_mem_source=mem.source, train_time_s=tr.train_time_s,
            train_steps=tr.steps, step_time_s=tr.median_step_s, compute_dtype=compute_dtype_name(device),
            tokens_per_s=cfg.batch_size * cfg.seq_len / tr.median_step_s, **counts, **extra))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, losses


@dataclass
class QLoRAResult(StudyResult):
    losses: dict[int | str, list[float]]  # by LoRA rank; by method on random init
    adapter_dir: Path
    fresh: dict[str, float]


@staged(STUDY)
def run(cfg: Config) -> QLoRAResult:
    """Sweep LoRA ranks on an NF4 base; keep checkpoints + final adapter of main_rank; verify reload."""
    device = pick_device(cfg.device, cfg.profile)
    if cfg.random_init:
        return run_random_init(cfg, device)
    bcfg = _baseline_settings(cfg.profile, cfg.model_id, cfg.dataset_id)
    asset = assets.resolve_model("encoder", bcfg.model_id)
    ds = data.load_classification(bcfg.dataset_id, bcfg.n_train, bcfg.n_eval)
    tok = models.load_tokenizer(asset)
    gpu_plan = budget.announce(plan(cfg, bcfg, hub.model_config(asset.path), len(ds.train_texts), device), device) \
        if budget.wanted(cfg.profile, device) else None
    out = outputs_dir(STUDY, cfg.profile)
    info = runmeta.RunInfo(STUDY, cfg.profile, cfg.seed, asset.id, str(asset.path), ds.asset.id)
    adapter_dir = out / info.name("CLS", knobs(cfg, cfg.main_rank).token(), "qlora", 4, "fp32")
    sweep = Sweep()
    for rank in cfg.ranks:
        train_rank(cfg, rank, Inputs(bcfg, asset, ds, tok, device), info, adapter_dir, out, sweep)
    for s_ in seeds(cfg.seed, cfg.n_seeds)[1:]:  # the same recipe from other seeds: predictions only
        run_ = train_qlora(dataclasses.replace(cfg, seed=s_), cfg.main_rank, bcfg, ds, tok, asset.path, None, device)
        sweep.preds[seed_column("qlora", s_)] = predictions(run_["model"], tok, ds, bcfg.max_length, device)
        del run_
    rows = [r for r in sweep.rows if r["method"] == "qlora"] + [r for r in sweep.rows if r["method"] != "qlora"]
    rows = _compare([_fp32_reference(cfg.profile, bcfg), *rows], sweep.preds, ds, cfg)
    doc_assets = {"model": {"role": "encoder", **asset.provenance()}, "data": ds.provenance()}
    saved = sweep.saved
    path = results.write_metrics(STUDY, cfg.profile, cfg.seed, metrics.runtime_env(device), doc_assets, rows,
                                 config={**asdict(cfg), "ranks": list(cfg.ranks)},
                                 fresh_process_reload=sweep.fresh, gpu_plan=gpu_plan, baseline_settings=asdict(bcfg),
                                 artifacts=saved.get("artifacts"), peak_memory=saved.get("peak_memory"),
                                 merged_accuracy=saved.get("merged_accuracy"),
                                 notes="fp32 row copied from notebook 01's metrics.json of this profile "
                                       "(a separate process), compared on its saved per-example predictions",
                                 definitions=DEFINITIONS, readme=README)
    return QLoRAResult(rows, results.load_metrics(path), path, sweep.losses, adapter_dir, sweep.fresh)


def run_random_init(cfg: Config, device: torch.device) -> QLoRAResult:
    """The gpu profile: memory and speed of the true architecture with random weights; accuracy is null."""
    out = outputs_dir(STUDY, cfg.profile)
    rows, losses = random_init_rows(cfg, device, out)
    arch_id = "bert-base-uncased" if cfg.random_arch == "bert-base" else f"{cfg.random_arch} BERT"
    doc_assets = {"model": {"role": "encoder", "id": arch_id, "source": "random-init", "architecture": cfg.random_arch},
                  "data": {"id": "random tokens", "source": "torch.randint", "seq_len": cfg.seq_len}}
    path = results.write_metrics(STUDY, cfg.profile, cfg.seed, metrics.runtime_env(device), doc_assets, rows,
                                 config={**asdict(cfg), "ranks": list(cfg.ranks)},
                                 notes="random weights: memory and speed only, accuracy null", readme=README)
    return QLoRAResult(rows, results.load_metrics(path), path, losses, out, {})


@dataclass
class Inputs:
    """What every rank of the sweep trains and is scored on."""

    bcfg: baseline.Config
    asset: Any
    ds: Any
    tok: Any
    device: torch.device


@dataclass
class Sweep:
    """What the rank sweep gathers: rows, predictions, losses, and the main rank's saved artifacts and reload."""

    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    preds: dict[str, Any] = dataclasses.field(default_factory=dict)
    losses: dict[int, Any] = dataclasses.field(default_factory=dict)
    saved: dict[str, Any] = dataclasses.field(default_factory=dict)
    fresh: dict[str, Any] = dataclasses.field(default_factory=dict)


def train_rank(cfg: Config, rank: int, x: Inputs, info: runmeta.RunInfo, adapter_dir: Path, out: Path,
               sweep: Sweep) -> None:
    """One rank: train, predict, and for the main rank save, reload in a fresh process and reload merged."""
    is_main = rank == cfg.main_rank
    method = "qlora" if is_main else f"qlora_r{rank}"
    run_ = train_qlora(cfg, rank, x.bcfg, x.ds, x.tok, x.asset.path,
                       out / "checkpoints" / adapter_dir.name if is_main else None, x.device)
    sweep.preds[method] = predictions(run_["model"], x.tok, x.ds, x.bcfg.max_length, x.device)
    quality = metrics.accuracy_f1(sweep.preds[method], x.ds.eval_labels)
    sweep.losses[rank] = run_["losses"]
    if is_main:
        sweep.saved = save_run(run_, info, cfg, x.tok, adapter_dir, quality, x.device)
        sweep.fresh = verify_in_fresh_process(adapter_dir, cfg)
        if "merged" in sweep.saved["artifacts"]:  # reloaded the flag-free way: a plain fp32 classifier
            merged, _ = artifacts.load(out / sweep.saved["artifacts"]["merged"], x.device)
            sweep.saved["merged_accuracy"] = evaluate(merged, x.tok, x.ds, x.bcfg.max_length, x.device)["accuracy"]
            del merged
    adapter_bytes = metrics.size_on_disk(adapter_dir / "adapter_model.safetensors") if is_main else None
    whole = run_["base_bytes"] + adapter_bytes if adapter_bytes else None  # what a user loads: base + adapter
    sweep.rows.append(results.make_row(
        method, model=x.asset.id, dataset=x.ds.asset.id, **quality, size_bytes=whole, adapter_bytes=adapter_bytes,
        bits_per_param=metrics.bits_per_param(whole, run_["counts"]["total_params"]) if whole else None,
        bits_per_quantized_weight=run_["storage"]["bits_per_param"],
        peak_mem_bytes=run_["mem"].peak_bytes, peak_mem_source=run_["mem"].source,
        train_time_s=run_["train_time_s"], train_steps=run_["steps"], lora_rank=rank,
        nf4_layers=run_["storage"]["nf4_layers"], **run_["counts"]))


DEFINITIONS = {
    "size_bytes": "the whole artifact a user loads: the NF4 base as stored (NF4 linears with their constants, "
                  "embeddings, norms and classifier as they are) + the adapter file; FP32: its safetensors file",
    "bits_per_param": "8 x size_bytes / all parameters",
    "bits_per_quantized_weight": "bits per weight of the NF4 linears only (4-bit codes + double-quantized absmax)",
    "accuracy_diff_vs_fp32": "accuracy minus notebook 01's FP32 fine-tune's, same sentences, 95 % paired bootstrap",
}
_SAME_RUN_KEYS = ("model_id", "dataset_id", "n_train", "n_eval", "max_length")


def _compare(rows: list[dict[str, Any]], preds: dict[str, list[int]], ds: Any, cfg: Config) -> list[dict[str, Any]]:
    """Each QLoRA row against notebook 01's FP32 predictions on the same sentences (when 01 ran on them), and the
    majority-answer row."""
    labels = list(ds.eval_labels)
    fp32 = _fp32_predictions(cfg.profile, labels) if rows[0].get("accuracy") is not None else None
    preds = {**({"fp32": fp32} if fp32 else {}), **preds}
    for r in rows:
        d = metrics.accuracy_difference(fp32, preds[r["method"]], labels, cfg.seed) \
            if fp32 and r["method"] != "fp32" else None
        metrics.with_difference(r, "accuracy_diff_vs_fp32", d)
    _seed_spread(rows[1] if rows[1]["method"] == "qlora" else None, preds, labels, cfg)
    row, preds["majority"] = baseline.majority_row(ds.asset.id, ds.train_labels, labels, fp32, cfg.seed)
    rows.append(row)
    results.write_per_example(STUDY, cfg.profile, "per_example", {"label": labels, **preds})
    return rows


def _seed_spread(q: dict[str, Any] | None, preds: dict[str, list[int]], labels: list[int], cfg: Config) -> None:
    """QLoRA's accuracy over its seeds, and QLoRA minus FP32 seed by seed (seed i of both: 01 ran the same seeds)."""
    if q is None:
        return
    runs = {s: metrics.accuracy(preds["qlora" if s == cfg.seed else seed_column("qlora", s)], labels)
            for s in seeds(cfg.seed, cfg.n_seeds)}
    metrics.with_seeds(q, "accuracy", list(runs.values()))
    fp32 = _fp32_seed_predictions(cfg.profile, labels)
    pairs = [(runs[s], metrics.accuracy(fp32[s], labels)) for s in runs if s in fp32]
    if pairs:
        metrics.with_seeds(q, "accuracy_diff_vs_fp32", [a - b for a, b in pairs])
        q["n_seeds"] = len(runs)
        q["seeds_paired_with_fp32"] = len(pairs)


def _fp32_columns(profile: str, labels: list[int]) -> dict[str, list[int]]:
    """Notebook 01's saved per-example FP32 predictions (`fp32`, then `fp32@seedN`), if they are for these very
    labels."""
    import pandas as pd

    p = results_dir(baseline.STUDY, profile) / "per_example.csv.gz"
    if not p.is_file():
        return {}
    t = pd.read_csv(p)
    if t["label"].tolist() != labels:
        return {}
    return {c: t[c].astype(int).tolist() for c in t.columns if c == "fp32" or c.startswith("fp32@seed")}


def _fp32_seed_predictions(profile: str, labels: list[int]) -> dict[int, list[int]]:
    """Notebook 01's predictions of every seed it fine-tuned (its first seed from its metrics.json)."""
    m = results_dir(baseline.STUDY, profile) / "metrics.json"
    cols = _fp32_columns(profile, labels)
    if not m.is_file() or not cols:
        return {}
    seed0 = results.load_metrics(m).get("seed", 0)
    return {seed0 if c == "fp32" else int(c.split("@seed")[1]): p for c, p in cols.items()}


def _fp32_predictions(profile: str, labels: list[int]) -> list[int] | None:
    """Notebook 01's saved per-example predictions of its first seed, if they are for these very labels."""
    return _fp32_columns(profile, labels).get("fp32")





def _fp32_reference(profile: str, bcfg: baseline.Config) -> dict[str, Any]:
    """Notebook 01's FP32 row for comparison (marked as such) when 01 ran on this encoder and data; else a
    row of nulls that says why (a reference from other data would compare nothing)."""
    p = results_dir(baseline.STUDY, profile) / "metrics.json"
    if not p.is_file():
        return results.make_row("fp32", source="notebook 01 not run in this profile")
    doc = results.load_metrics(p)
    ran = {k: doc.get("config", {}).get(k) for k in _SAME_RUN_KEYS}
    differ = [f"{k} {ran[k]!r} vs {getattr(bcfg, k)!r}" for k in _SAME_RUN_KEYS if ran[k] != getattr(bcfg, k)]
    if differ:
        return results.make_row("fp32", source=f"notebook 01 ran with other settings ({'; '.join(differ)}): not shown")
    row = dict(doc["rows"][0])
    row["source"] = "notebook 01"
    return row


def findings(res: QLoRAResult) -> str:
    """Markdown findings from this run's numbers."""
    by = {r["method"]: r for r in res.rows}
    fp, q = by["fp32"], by["qlora"]
    lines = [f"- QLoRA r={q['lora_rank']}: {q['trainable_params']:,} trainable of {q['total_params']:,} "
             f"parameters ({100 * q['trainable_params'] / q['total_params']:.2f} %); the {q['nf4_layers']} "
             f"NF4 + double-quant linears store {q['bits_per_quantized_weight']:.3f} bits per weight as saved "
             "(4 + 8/64 + 32/(64·256) = 4.127 expected; bitsandbytes' CPU backend repacks them after the first "
             "forward: bf16 absmax, double quantization undone, 4.25 bits in memory)."]
    if q.get("size_bytes"):
        lines.append(f"- The whole artifact (NF4 base as stored + adapter) is {q['size_bytes'] / 2**20:.1f} MiB = "
                     f"{q['bits_per_param']:.1f} bits/param: the embeddings and everything else that stays 32-bit "
                     f"dominate at this size (FP32 file: {fp.get('bits_per_param') or float('nan'):.1f} bits/param).")
    if fp.get("accuracy") is not None and q["accuracy"] is not None:
        d = (results.points_interval(q, "accuracy_diff_vs_fp32") if q.get("accuracy_diff_vs_fp32") is not None
             else "no paired predictions from notebook 01")
        lines.append(f"- Accuracy {q['accuracy']:.3f} vs {fp['accuracy']:.3f} for the full FP32 fine-tune of "
                     f"notebook 01 ({d}) after {q['train_steps']} steps vs {fp.get('train_steps')}; the majority "
                     f"answer scores {by['majority']['accuracy']:.3f}. The interval is over sentences of one run each.")
        if q.get("accuracy_diff_vs_fp32_seed_mean") is not None:
            lines.append(f"- Over training seeds: QLoRA {results.seed_spread_text(q, 'accuracy')}, FP32 "
                         f"{results.seed_spread_text(fp, 'accuracy')}; QLoRA minus FP32, seed by seed: "
                         f"{results.seed_spread_text(q, 'accuracy_diff_vs_fp32', 100, '+.1f', ' pt')}.")
        if fp.get("peak_mem_bytes"):
            ratio = q["peak_mem_bytes"] / fp["peak_mem_bytes"]
            verdict = (f"QLoRA needs {100 * (1 - ratio):.0f} % less" if ratio < 1 else
                       f"QLoRA needs {100 * (ratio - 1):.0f} % **more** — at {fp['total_params'] / 1e6:.1f} M "
                       "parameters the weights (~90 MB in FP32) and Adam state are a small part of a peak "
                       "dominated by activations, allocator pools and the Trainer; NF4 pays off when weights "
                       "dominate memory, i.e. in larger models")
            lines.append(f"- Peak training memory ({q['peak_mem_source']}, separate processes): "
                         f"{q['peak_mem_bytes'] / 2**20:.0f} MiB vs {fp['peak_mem_bytes'] / 2**20:.0f} MiB for "
                         f"the FP32 full fine-tune: {verdict}. Time per step: "
                         f"{q['train_time_s'] / q['train_steps']:.2f} s vs "
                         f"{fp['train_time_s'] / fp['train_steps']:.2f} s.")
    sweep = [r for r in res.rows if r["method"].startswith("qlora")]
    if len(sweep) > 1:
        lines.append("- Rank sweep: " + ", ".join(f"r={r['lora_rank']}: acc {r['accuracy']:.3f}, "
                                                   f"{r['trainable_params']:,} trainable" for r in
                                                   sorted(sweep, key=lambda r: r["lora_rank"])) + ".")
    if q["accuracy"] is None:  # random-init (gpu profile): memory and speed only
        amp = "" if q["compute_dtype"] == "float32" else f"; FP32 weights under {q['compute_dtype']} autocast"
        lines.append(f"- Random weights, random tokens ({q['model']}): peak training memory "
                     f"{q['peak_mem_bytes'] / 2**20:.0f} MiB for QLoRA vs "
                     f"{fp['peak_mem_bytes'] / 2**20:.0f} MiB for the "
                     f"FP32 full fine-tune ({q['peak_mem_source']}); {q['step_time_s']:.3f} s vs "
                     f"{fp['step_time_s']:.3f} s per step (median{amp}). "
                     "Accuracy is not measured (null) on random weights.")
        return "\n".join(lines)
    lines.append(f"- The adapter alone is {q['adapter_bytes'] / 2**20:.2f} MiB on disk, saved as "
                 f"`{res.adapter_dir.name}/` with its metadata; a fresh process loading it with no flags "
                 "(`qlib.artifacts.load`: the NF4 base rebuilt from the metadata, plain peft underneath) scores "
                 f"accuracy {res.fresh.get('accuracy', float('nan')):.3f} (in-process {q['accuracy']:.3f}).")
    if res.doc.get("merged_accuracy") is not None:
        lines.append("- Merged after training (dequantize-then-merge, fp32): "
                     f"accuracy {res.doc['merged_accuracy']:.3f}.")
    lines.append("- Peak-memory report of the QLoRA fine-tune: "
                 + results.peak_memory_text((res.doc.get("peak_memory") or {}).get("qlora")) + ".")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m qlib.studies.qlora_bert verify ADAPTER_DIR --profile P`: prints the accuracy JSON."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m qlib.studies.qlora_bert")
    p.add_argument("cmd", choices=["verify"])
    p.add_argument("adapter_dir")
    p.add_argument("--profile", default="default")
    p.add_argument("--model-id")
    p.add_argument("--dataset-id")
    a = p.parse_args(argv)
    try:
        print(json.dumps(evaluate_adapter(a.adapter_dir, a.profile, a.model_id, a.dataset_id)))
    except QlabError as e:
        print(f"qlab: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
