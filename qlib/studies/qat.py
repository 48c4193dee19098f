"""Study 03: quantization-aware INT8 fine-tuning from the notebook-01 baseline, against static PTQ."""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from qlib import budget, data, metrics, quant, results
from qlib.config import build_quantization_plan, make_config
from qlib.core.device import pick_device, set_seed
from qlib.core.errors import QlabError
from qlib.core.io import atomic_dir
from qlib.core.paths import outputs_dir
from qlib.quant import ptq, qat
from qlib.studies import StudyResult, baseline, staged
from qlib.studies.ptq import _forward, baseline_label, compare_to_fp32, load_setup
from qlib.train import TrainResult, finetune, predict, seed_column, seeds

STUDY = "03_qat"
ASSET_ROLES: dict[str, str] = {}  # notebook 01's model and data
README = results.readme_block(summary_tables={baseline.BERT_TABLE: ["qat_int8"]})


@dataclass(frozen=True)
class Config:
    """Notebook 03's parameters."""

    profile: str = "default"
    seed: int = 0
    epochs: float = 0.5           # QAT from notebook 01's converged fine-tune: a short second stage
    lr: float = 2e-5
    batch_size: int = 32
    per_channel: bool = True
    calib_sentences: int = 256
    control: bool = True          # also fine-tune FP32 for the same steps: is QAT's gain just more training?
    low_bits: int | None = 4      # also weight-only QAT vs round-to-nearest PTQ at this width (None: skip)
    n_seeds: int = 3              # every training run from seeds seed, seed+1, ...: accuracy mean ± sd
    latency_repeats: int = 30
    device: str = "auto"          # where fake-quant training runs (CUDA when present); INT8 always on the CPU


PROFILES: dict[str, dict[str, Any]] = {
    "smoke": dict(batch_size=16, calib_sentences=32, latency_repeats=3, n_seeds=2),
    "default": {}, "t4": {},
}


def config(profile: str = "default", **overrides: Any) -> Config:
    cfg = make_config(Config, PROFILES, profile, **overrides)
    if cfg.low_bits not in (None, 0, 2, 4, 8):
        raise QlabError(f"low_bits must be 2, 4 or 8 (0 or None: skip); got {cfg.low_bits!r}")
    return cfg


@dataclass
class QATResult(StudyResult):
    qat_train: TrainResult
    model_dir: Path
    reload_ok: bool


def save_qat(model: torch.nn.Module, fp32_config: Any, tok: Any, path: Path, meta: dict[str, Any]) -> Path:
    """qat_bert_int8/: INT8 state_dict (weights_only-loadable), the architecture's config, tokenizer."""
    with atomic_dir(path) as tmp:
        ptq.save_quantized(model, tmp / "model_int8.pt")
        fp32_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "qlab.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path


def plan(cfg: Config, model_config: Any, n_train: int, seq: int, device: torch.device) -> list[budget.Prediction]:
    """QAT and its control on the GPU: full fine-tunes in fp32 (fake quantization runs in fp32)."""
    steps = max(1, math.ceil(cfg.epochs * math.ceil(n_train / cfg.batch_size)))
    runs = ["QAT (fake-quant INT8)"] + (["FP32 control"] if cfg.control else [])
    return [budget.predict(f"03 {r}, batch {cfg.batch_size} x {seq}", model_config, "full", batch=cfg.batch_size,
                           seq=seq, steps=steps, compute=torch.float32) for r in runs]


def gpu_predictions(profile: str) -> list[budget.Prediction]:
    """This profile's training runs as a T4 would run them, predicted from the hub's true config
    (the study contract)."""
    b = baseline.config(profile)
    return plan(config(profile), budget.hub_config(b.model_id), budget.train_rows(b.dataset_id, b.n_train),
                b.max_length, budget.T4)


@staged(STUDY)
def run(cfg: Config) -> QATResult:
    """Static PTQ and QAT from the same baseline in one run; the QAT model is saved and reloaded.
    Fake-quant training (and its FP32 control) runs on the GPU where there is one, in fp32; the INT8
    conversion, evaluation and timing run on the CPU, where torch.ao's INT8 kernels are."""
    train_device = pick_device(cfg.device)
    set_seed(cfg.seed)
    st = load_setup(cfg.profile, cfg.seed, cfg.calib_sentences)
    train = data.classification_loader(st.tok, st.ds.train_texts, st.ds.train_labels, cfg.batch_size,
                                       st.bcfg.max_length, shuffle=True, seed=cfg.seed)
    gpu_plan = budget.announce(plan(cfg, st.fp32.config, len(st.ds.train_texts), st.bcfg.max_length, train_device),
                               train_device) if budget.wanted(cfg.profile, train_device) else None
    v = make_variants(cfg, st, train, train_device)
    preds = {k: predict(m, st.eval_loader, CPU, k)[0] for k, m in v.models.items()}
    replicas = {s: replicate(cfg, s, st.fp32, train, st.eval_loader, train_device, CPU)
                for s in seeds(cfg.seed, cfg.n_seeds)[1:]}
    lat = time_int8(cfg, st, v.models)
    quality = {k: metrics.accuracy_f1(p, list(st.ds.eval_labels)) for k, p in preds.items()}
    out = outputs_dir(STUDY, cfg.profile)
    model_dir, reload_ok = save_and_reload(cfg, st, v.models["qat_int8"], quality["qat_int8"], out)
    rows = _rows(v.models, quality, lat, v.trains, out, model_dir, st.ds, st.fp32, baseline_label(st.bcfg))
    rows = compare_to_fp32(rows, preds, list(st.ds.eval_labels), st.ds.train_labels, cfg.seed)
    path = write_results(cfg, st, v, rows, preds, replicas, reload_ok=reload_ok, train_device=train_device,
                         gpu_plan=gpu_plan)
    return QATResult(rows, results.load_metrics(path), path, v.trains["qat_int8"][0], model_dir, reload_ok)


CPU = torch.device("cpu")  # torch.ao's INT8 kernels


@dataclass
class Variants:
    """Every model the study compares, the training record of those it trained, and QAT before conversion."""

    models: dict[str, Any]
    trains: dict[str, Any]
    prepared: Any


def make_variants(cfg: Config, st: Any, train: Any, train_device: torch.device) -> Variants:
    """Static and dynamic PTQ of the baseline, QAT (converted to INT8) and its controls, trained from one seed."""
    static = quant.apply(st.fp32, "ptq_int8", calib=st.calib, per_channel=cfg.per_channel)
    dynamic = quant.apply(st.fp32, "ptq_int8", per_channel=cfg.per_channel)  # 02's most accurate torch.ao PTQ
    trained = train_runs(cfg, cfg.seed, st.fp32, train, train_device)
    prepared, (tr, mem) = trained.pop("qat_int8")
    models_ = {"fp32": st.fp32, "ptq_int8_static": static, "ptq_int8_dynamic": dynamic,
               "qat_int8": qat.convert_qat(prepared.to(CPU))}
    trains = {"qat_int8": (tr, mem)}
    if cfg.low_bits:
        models_[f"ptq_w{cfg.low_bits}"] = qat.fake_quant_weights(st.fp32, cfg.low_bits)
    for k, (m, t) in trained.items():
        models_[k], trains[k] = m.to(CPU), t
    return Variants(models_, trains, prepared)


def time_int8(cfg: Config, st: Any, models_: dict[str, Any]) -> dict[int, Any]:
    """Interleaved latency of FP32 and the three INT8 models, at batch 1 and 8."""
    timed = {k: m for k, m in models_.items() if k in ("fp32", "ptq_int8_static", "ptq_int8_dynamic", "qat_int8")}
    return {b: metrics.compare_latency({k: _forward(m, enc) for k, m in timed.items()},
                                       warmup=max(2, cfg.latency_repeats // 10), repeats=cfg.latency_repeats)
            for b, enc in st.shapes.items()}


def save_and_reload(cfg: Config, st: Any, int8: Any, quality: dict[str, float], out: Path) -> tuple[Path, bool]:
    """Save the QAT INT8 model with its metadata; reloaded, it must score exactly as before."""
    meta = {"base": str(st.base_dir), "config": asdict(cfg), **quality,
            **build_quantization_plan("qat_int8").metadata()}
    model_dir = save_qat(int8, st.fp32.config, st.tok, out / "qat_bert_int8", meta)
    again = metrics.accuracy_f1(*predict(qat.load_qat(model_dir), st.eval_loader, CPU, "reloaded"))
    return model_dir, again == quality


def write_results(cfg: Config, st: Any, v: Variants, rows: list[dict[str, Any]], preds: dict[str, Any],
                  replicas: dict[int, Any], **extra: Any) -> Path:
    """Seed spread, per-example predictions and metrics.json."""
    labels = list(st.ds.eval_labels)
    compare_runs({r["method"]: r for r in rows}, {cfg.seed: preds, **replicas}, labels, cfg)
    results.write_per_example(STUDY, cfg.profile, "per_example", {"label": labels, **preds, **{
        seed_column(k, s): p for s, ps in replicas.items() for k, p in ps.items()}})
    env = {**metrics.runtime_env(CPU), "quantized_engine": torch.backends.quantized.engine}
    doc_assets = {"model": {"role": "encoder", "id": rows[0]["model"], "source": f"notebook 01 ({st.base_dir})"},
                  "data": st.ds.provenance()}
    low = cfg.low_bits and {
        "bits": cfg.low_bits, "grid": "symmetric, one absmax scale per output row",
        "layers": "every nn.Linear but the pooler and the classifier",
        "weights": qat.fake_quant_weight_count(v.models[f"ptq_w{cfg.low_bits}"]),
        "note": "simulated (fake-quant in fp32): no 4-bit kernel in torch.ao on CPU, "
                "so no size, bits/param or speed is claimed for these rows"}
    runs = [{"method": k, "seed": s, **metrics.accuracy_f1(p, labels)}
            for s, ps in {cfg.seed: preds, **replicas}.items() for k, p in ps.items() if k in TRAINED]
    return results.write_metrics(STUDY, cfg.profile, cfg.seed, env, doc_assets, rows, config=asdict(cfg),
                                 latency_shape={"seq_len": st.bcfg.max_length, "batches": [1, 8]},
                                 train_device=extra["train_device"].type, gpu_plan=extra["gpu_plan"],
                                 reload_matches=extra["reload_ok"],
                                 fake_quant_modules=qat.fake_quant_modules(v.prepared),
                                 low_bit_weights=low, seed_runs=runs, readme=README)


TRAINED = ("qat_int8", "fp32_more_steps", "qat_w2", "qat_w4", "qat_w8")
# (row, reference): QAT against the best PTQ of its width and against FP32 fine-tuned for the same steps
COMPARISONS = (("qat_int8", "ptq_int8_static"), ("qat_int8", "ptq_int8_dynamic"), ("qat_int8", "fp32_more_steps"),
               *((f"qat_w{b}", f"ptq_w{b}") for b in (2, 4, 8)), *((f"qat_w{b}", "fp32_more_steps") for b in (2, 4, 8)))


def train_runs(cfg: Config, seed: int, fp32: torch.nn.Module, train: Any,
               device: torch.device) -> dict[str, tuple[torch.nn.Module, tuple[TrainResult, Any]]]:
    """The training runs of one seed, each from the FP32 baseline on the same batches in the same order: INT8
    QAT, the FP32 control, weight-only QAT at `low_bits`. Fake-quant training runs in fp32 (no autocast)."""
    runs = {"qat_int8": lambda: quant.apply(fp32, "qat_int8", per_channel=cfg.per_channel)}
    if cfg.control:
        runs["fp32_more_steps"] = lambda: copy.deepcopy(fp32)
    if cfg.low_bits:
        runs[f"qat_w{cfg.low_bits}"] = lambda: qat.fake_quant_weights(fp32, cfg.low_bits)
    out = {}
    for name, make in runs.items():
        set_seed(seed)
        train.generator.manual_seed(seed)  # the loader's shuffle restarts: every run sees the same batches
        model = make()
        with metrics.PeakMemory(device) as mem:
            tr = finetune(model, train, cfg.epochs, cfg.lr, device, desc=f"{name} (seed {seed})", autocast=False)
        out[name] = (model, (tr, mem))
    return out


def replicate(cfg: Config, seed: int, fp32: torch.nn.Module, train: Any, ev: Any, train_device: torch.device,
              device: torch.device) -> dict[str, list[int]]:
    """Every training run again from another seed (data order): the predictions on the same sentences."""
    runs = train_runs(cfg, seed, fp32, train, train_device)
    models_ = {k: (qat.convert_qat(m.to(device)) if k == "qat_int8" else m.to(device)) for k, (m, _) in runs.items()}
    return {k: predict(m, ev, device, f"{k} (seed {seed})")[0] for k, m in models_.items()}


def compare_runs(by: dict[str, dict[str, Any]], preds: dict[int, dict[str, list[int]]], labels: list[int],
                 cfg: Config) -> None:
    """Main-seed paired intervals (bootstrap over sentences) and, per trained row, mean ± sd over seeds of its
    accuracy and of each difference (a PTQ reference is the same in every seed; the control is its own seed's)."""
    main = preds[cfg.seed]
    for row, ref in COMPARISONS:
        if row in main and ref in main:
            metrics.with_difference(by[row], f"accuracy_diff_vs_{ref}",
                                    metrics.accuracy_difference(main[ref], main[row], labels, cfg.seed))
            metrics.with_seeds(by[row], f"accuracy_diff_vs_{ref}",
                               [metrics.accuracy(ps[row], labels) - metrics.accuracy(ps.get(ref, main[ref]), labels)
                                for ps in preds.values()])
    for row in TRAINED:
        if row in main:
            metrics.with_seeds(by[row], "accuracy", [metrics.accuracy(ps[row], labels) for ps in preds.values()])


def _rows(models_: dict, quality: dict, lat: dict, trains: dict, out: Path, model_dir: Path,
          ds: Any, fp32: torch.nn.Module, label: str) -> list[dict[str, Any]]:
    n = metrics.param_counts(fp32)["total_params"]
    rows = []
    for k, m in models_.items():
        simulated = k.startswith(("ptq_w", "qat_w"))  # fake-quant in fp32: nothing smaller to store or time
        if k == "qat_int8":
            size = metrics.size_on_disk(model_dir / "model_int8.pt")
        else:
            size = None if simulated else metrics.size_on_disk(ptq.save_quantized(m, out / f"{k}.pt"))
        tr, mem = trains.get(k, (None, None))
        timed = k in lat[1]
        rows.append(results.make_row(
            k, model=label, dataset=ds.asset.id, **quality[k],
            size_bytes=size, bits_per_param=metrics.bits_per_param(size, n) if size else None,
            latency_ms=lat[1][k]["median_ms"] if timed else None,
            latency_ms_b8=lat[8][k]["median_ms"] if timed else None,
            timing_threads=lat[8][k]["threads"] if timed else None,
            load_avg_1m=lat[8][k]["load_avg_1m"] if timed else None,
            peak_mem_bytes=mem.peak_bytes if mem else None, peak_mem_source=mem.source if mem else None,
            train_time_s=tr.train_time_s if tr else None, train_steps=tr.steps if tr else None,
            trainable_params=n if tr else 0, total_params=n,
            quantized_modules=ptq.count_quantized(m) if "int8" in k else None,
            note=f"weights on the {k.split('_w')[1]}-bit per-row grid, simulated in fp32 (no size or speed claimed)"
            if simulated else None))
        metrics.with_difference(rows[-1], "speedup_vs_fp32", metrics.speed_ratio(
            lat[8]["fp32"]["times_ms"], lat[8][k]["times_ms"]) if timed else None, value="ratio")
    return rows


def findings(res: QATResult) -> str:
    """Markdown findings from this run's numbers; a difference is called real only when its paired 95 % interval
    (bootstrap over the same held-out sentences) excludes zero."""
    by = {r["method"]: r for r in res.rows}
    fp, pt, qa = by["fp32"], by["ptq_int8_static"], by["qat_int8"]
    n = res.doc["assets"]["data"]["n_eval"]
    lines = [f"- {n} held-out sentences. FP32 {fp['accuracy']:.3f}; static PTQ INT8 {pt['accuracy']:.3f} "
             f"({results.points_interval(pt, 'accuracy_diff_vs_fp32')} vs FP32); QAT INT8 {qa['accuracy']:.3f} "
             f"({results.points_interval(qa, 'accuracy_diff_vs_fp32')} vs FP32) "
             f"after {qa['train_steps']} fake-quant steps "
             f"({qa['train_time_s']:.0f} s)."]
    lines.append(f"- QAT vs static PTQ: {results.points_interval(qa, 'accuracy_diff_vs_ptq_int8_static')}.")
    if "ptq_int8_dynamic" in by:
        dy = by["ptq_int8_dynamic"]
        lines.append(f"- QAT vs the best torch.ao PTQ (dynamic INT8, {dy['accuracy']:.3f}): "
                     f"{results.points_interval(qa, 'accuracy_diff_vs_ptq_int8_dynamic')}. "
                     "Dynamic INT8 needs no calibration and no "
                     "training; notebook 02 also has ONNX Runtime's dynamic INT8.")
    if "fp32_more_steps" in by:
        c = by["fp32_more_steps"]
        lines.append(f"- Control: FP32 fine-tuned for the same extra steps reaches {c['accuracy']:.3f}; QAT vs it: "
                     f"{results.points_interval(qa, 'accuracy_diff_vs_fp32_more_steps')}. "
                     "QAT's gain over PTQ is read against this.")
    if "majority" in by:
        lines.append(f"- Always answering the majority class scores {by['majority']['accuracy']:.3f}.")
    if qa["train_time_s"] and by.get("fp32_more_steps", {}).get("train_time_s"):
        ratio = qa["train_time_s"] / by["fp32_more_steps"]["train_time_s"]
        lines.append(f"- A fake-quant step costs {ratio:.2f}× an FP32 step here.")
    lines.append(f"- INT8 size {qa['size_bytes'] / 2**20:.1f} MiB ({qa['bits_per_param']:.2f} bits/param), "
                 f"batch-8 speedup {results.times_interval(qa, 'speedup_vs_fp32')} vs FP32 in this run. "
                 f"`qat_bert_int8/` reloads (weights_only) with identical accuracy: {res.reload_ok}.")
    low = next((r for r in res.rows if r["method"].startswith("qat_w")), None)
    if low:
        b = low["method"].split("_w")[1]
        ptq_low = by[f"ptq_w{b}"]
        lines.append(f"- {b}-bit weights (per-row grid, simulated): round-to-nearest PTQ {ptq_low['accuracy']:.3f} "
                     f"({results.points_interval(ptq_low, 'accuracy_diff_vs_fp32')} vs FP32); QAT at {b} bits "
                     f"{low['accuracy']:.3f}: {results.points_interval(low, f'accuracy_diff_vs_ptq_w{b}')} "
                     "vs that PTQ, "
                     f"{results.points_interval(low, 'accuracy_diff_vs_fp32_more_steps')} vs the FP32 control.")
    lines += _seed_lines(by)
    return "\n".join(lines)


def _seed_lines(by: dict[str, dict[str, Any]]) -> list[str]:
    """Mean ± sd over training seeds: what the intervals over sentences of one run leave out."""
    trained = [by[k] for k in TRAINED if k in by]
    if not trained or trained[0].get("n_seeds", 1) < 2:
        return ["- One seed: the intervals above are over sentences, not over training runs."]
    accs = "; ".join(f"{r['method']} {results.seed_spread_text(r, 'accuracy')}" for r in trained)
    diffs = "; ".join(f"{row} − {ref} "
                      f"{results.seed_spread_text(by[row], f'accuracy_diff_vs_{ref}', 100, '+.1f', ' pt')}"
                      for row, ref in COMPARISONS
                      if by.get(row, {}).get(f"accuracy_diff_vs_{ref}_seed_mean") is not None)
    return [f"- Over training seeds (data order; the same FP32 start): {accs}.",
            f"- Differences over seeds: {diffs}. A difference is read as real only when the sentence interval "
            "excludes zero and the seeds agree in sign."]
