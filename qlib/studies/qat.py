"""Study 03: quantization-aware INT8 fine-tuning from the notebook-01 baseline, against static PTQ."""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from qlib import budget, data, metrics, report
from qlib.config import QlabError, build_quantization_plan, make_config, outputs_dir, pick_device
from qlib.quant import ptq, qat
from qlib.report import atomic_dir
from qlib.studies.ptq import _forward, baseline_label, compare_to_fp32, load_setup
from qlib.studies import StudyResult
from qlib.train import TrainResult, finetune, predict, set_seed

STUDY = "03_qat"


@dataclass(frozen=True)
class QATConfig:
    """Notebook 03's parameters."""

    profile: str = "default"
    seed: int = 0
    epochs: float = 1.0
    lr: float = 2e-5
    batch_size: int = 32
    per_channel: bool = True
    calib_sentences: int = 256
    control: bool = True          # also fine-tune FP32 for the same steps: is QAT's gain just more training?
    latency_repeats: int = 30
    device: str = "auto"          # where fake-quant training runs (CUDA when present); INT8 always on the CPU


QAT_PROFILES: dict[str, dict[str, Any]] = {
    "smoke": dict(batch_size=16, calib_sentences=32, latency_repeats=3),
    "default": {}, "t4": {},
}


def qat_config(profile: str = "default", **overrides: Any) -> QATConfig:
    return make_config(QATConfig, QAT_PROFILES, profile, **overrides)


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


def load_qat(path: str | Path) -> torch.nn.Module:
    """Rebuild a saved QAT INT8 model: architecture from config.json, weights with weights_only=True."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    p = Path(path)
    if not (p / "model_int8.pt").is_file() or not (p / "config.json").is_file():
        raise QlabError(f"{p} is not a QAT INT8 folder (needs model_int8.pt and config.json)")
    arch = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(p))
    skeleton = qat.convert_qat(qat.prepare_qat_int8(arch))
    return ptq.load_quantized(p / "model_int8.pt", skeleton)


def plan(cfg: QATConfig, model_config: Any, n_train: int, seq: int, device: torch.device) -> list[budget.Prediction]:
    """QAT and its control on the GPU: full fine-tunes in fp32 (fake quantization runs in fp32)."""
    steps = max(1, math.ceil(cfg.epochs * math.ceil(n_train / cfg.batch_size)))
    runs = ["QAT (fake-quant INT8)"] + (["FP32 control"] if cfg.control else [])
    return [budget.predict(f"03 {r}, batch {cfg.batch_size} x {seq}", model_config, "full", batch=cfg.batch_size,
                           seq=seq, steps=steps, compute=torch.float32) for r in runs]


def run(cfg: QATConfig) -> QATResult:
    """Static PTQ and QAT from the same baseline in one run; the QAT model is saved and reloaded.
    Fake-quant training (and its FP32 control) runs on the GPU where there is one, in fp32; the INT8
    conversion, evaluation and timing run on the CPU, where torch.ao's INT8 kernels are."""
    device = torch.device("cpu")
    train_device = pick_device(cfg.device)
    set_seed(cfg.seed)
    st = load_setup(cfg.profile, cfg.seed, cfg.calib_sentences)
    base_dir, bcfg, fp32, tok, ds, ev, calib = st.base_dir, st.bcfg, st.fp32, st.tok, st.ds, st.eval_loader, st.calib
    train = data.classification_loader(tok, ds.train_texts, ds.train_labels, cfg.batch_size,
                                       bcfg.max_length, shuffle=True, seed=cfg.seed)

    static = ptq.static_int8(fp32, calib, per_channel=cfg.per_channel)
    dynamic = ptq.dynamic_int8(fp32, per_channel=cfg.per_channel)  # notebook 02's most accurate torch.ao PTQ
    gpu_plan = budget.announce(plan(cfg, fp32.config, len(ds.train_texts), bcfg.max_length, train_device),
                               train_device) if budget.wanted(cfg.profile, train_device) else None
    prepared = qat.prepare_qat_int8(fp32, per_channel=cfg.per_channel)
    with metrics.PeakMemory(train_device) as mem:
        tr = finetune(prepared, train, cfg.epochs, cfg.lr, train_device, desc="QAT (fake-quant INT8)", autocast=False)
    int8 = qat.convert_qat(prepared.to(device))
    models_ = {"fp32": fp32, "ptq_int8_static": static, "ptq_int8_dynamic": dynamic, "qat_int8": int8}
    trains = {"qat_int8": (tr, mem)}
    if cfg.control:
        more = copy.deepcopy(fp32)
        set_seed(cfg.seed)
        train.generator.manual_seed(cfg.seed)  # the same batches in the same order as QAT saw
        with metrics.PeakMemory(train_device) as cmem:
            ctr = finetune(more, train, cfg.epochs, cfg.lr, train_device, desc="FP32 control (same steps)",
                           autocast=False)
        models_["fp32_more_steps"] = more.to(device)
        trains["fp32_more_steps"] = (ctr, cmem)

    preds = {k: predict(m, ev, device, k)[0] for k, m in models_.items()}
    labels = list(ds.eval_labels)
    quality = {k: metrics.accuracy_f1(p, labels) for k, p in preds.items()}
    timed = {k: m for k, m in models_.items() if k != "fp32_more_steps"}
    lat = {b: metrics.compare_latency({k: _forward(m, enc) for k, m in timed.items()},
                                      warmup=max(2, cfg.latency_repeats // 10),
                                      repeats=cfg.latency_repeats) for b, enc in st.shapes.items()}

    out = outputs_dir(STUDY, cfg.profile)
    meta = {"base": str(base_dir), "config": asdict(cfg), **quality["qat_int8"],
            **build_quantization_plan("qat_int8").metadata()}
    model_dir = save_qat(int8, fp32.config, tok, out / "qat_bert_int8", meta)
    reloaded = load_qat(model_dir)
    reload_ok = metrics.accuracy_f1(*predict(reloaded, ev, device, "reloaded")) == quality["qat_int8"]

    rows = _rows(models_, quality, lat, trains, out, model_dir, ds, fp32, baseline_label(bcfg))
    rows = compare_to_fp32(rows, preds, labels, ds.train_labels, cfg.seed)
    by = {r["method"]: r for r in rows}
    for ref in ("ptq_int8_static", "ptq_int8_dynamic", "fp32_more_steps"):
        if ref in preds:  # is QAT better than the best PTQ, and than the same steps in FP32?
            metrics.with_difference(by["qat_int8"], f"accuracy_diff_vs_{ref}",
                                    metrics.accuracy_difference(preds[ref], preds["qat_int8"], labels, cfg.seed))
    report.write_per_example(STUDY, cfg.profile, "per_example", {"label": labels, **preds})
    env = metrics.runtime_env(device)
    env["quantized_engine"] = torch.backends.quantized.engine
    doc_assets = {"model": {"role": "encoder", "id": rows[0]["model"],
                            "source": f"notebook 01 ({base_dir})"}, "data": ds.provenance()}
    path = report.write_metrics(STUDY, cfg.profile, cfg.seed, env, doc_assets, rows, config=asdict(cfg),
                                latency_shape={"seq_len": bcfg.max_length, "batches": [1, 8]},
                                reload_matches=reload_ok, train_device=train_device.type, gpu_plan=gpu_plan,
                                fake_quant_modules=qat.fake_quant_modules(prepared))
    return QATResult(rows, report.load_metrics(path), path, tr, model_dir, reload_ok)


def _rows(models_: dict, quality: dict, lat: dict, trains: dict, out: Path, model_dir: Path,
          ds: Any, fp32: torch.nn.Module, label: str) -> list[dict[str, Any]]:
    n = metrics.count_params(fp32)["total_params"]
    rows = []
    for k, m in models_.items():
        if k == "qat_int8":
            size = metrics.size_on_disk(model_dir / "model_int8.pt")
        else:
            size = metrics.size_on_disk(ptq.save_quantized(m, out / f"{k}.pt"))
        tr, mem = trains.get(k, (None, None))
        timed = k in lat[1]
        rows.append(report.make_row(
            k, model=label, dataset=ds.asset.id, **quality[k],
            size_bytes=size, bits_per_param=metrics.bits_per_param(size, n),
            latency_ms=lat[1][k]["median_ms"] if timed else None,
            latency_ms_b8=lat[8][k]["median_ms"] if timed else None,
            timing_threads=lat[8][k]["threads"] if timed else None,
            load_avg_1m=lat[8][k]["load_avg_1m"] if timed else None,
            speedup_vs_fp32=lat[8]["fp32"]["median_ms"] / lat[8][k]["median_ms"] if timed else None,
            peak_mem_bytes=mem.peak_bytes if mem else None, peak_mem_source=mem.source if mem else None,
            train_time_s=tr.train_time_s if tr else None, train_steps=tr.steps if tr else None,
            trainable_params=n if tr else 0, total_params=n,
            quantized_modules=ptq.count_quantized(m) if "int8" in k else None))
    return rows


def findings(res: QATResult) -> str:
    """Markdown findings from this run's numbers; a difference is called real only when its paired 95 % interval
    (bootstrap over the same held-out sentences) excludes zero."""
    by = {r["method"]: r for r in res.rows}
    fp, pt, qa = by["fp32"], by["ptq_int8_static"], by["qat_int8"]
    n = res.doc["assets"]["data"]["n_eval"]
    lines = [f"- {n} held-out sentences. FP32 {fp['accuracy']:.3f}; static PTQ INT8 {pt['accuracy']:.3f} "
             f"({report.points_interval(pt, 'accuracy_diff_vs_fp32')} vs FP32); QAT INT8 {qa['accuracy']:.3f} "
             f"({report.points_interval(qa, 'accuracy_diff_vs_fp32')} vs FP32) after {qa['train_steps']} fake-quant steps "
             f"({qa['train_time_s']:.0f} s)."]
    lines.append(f"- QAT vs static PTQ: {report.points_interval(qa, 'accuracy_diff_vs_ptq_int8_static')}.")
    if "ptq_int8_dynamic" in by:
        dy = by["ptq_int8_dynamic"]
        lines.append(f"- QAT vs the best torch.ao PTQ (dynamic INT8, {dy['accuracy']:.3f}): "
                     f"{report.points_interval(qa, 'accuracy_diff_vs_ptq_int8_dynamic')}. Dynamic INT8 needs no calibration and no "
                     "training; notebook 02 also has ONNX Runtime's dynamic INT8.")
    if "fp32_more_steps" in by:
        c = by["fp32_more_steps"]
        lines.append(f"- Control: FP32 fine-tuned for the same extra steps reaches {c['accuracy']:.3f}; QAT vs it: "
                     f"{report.points_interval(qa, 'accuracy_diff_vs_fp32_more_steps')}. QAT's gain over PTQ is read against this.")
    if "majority" in by:
        lines.append(f"- Always answering the majority class scores {by['majority']['accuracy']:.3f}.")
    if qa["train_time_s"] and by.get("fp32_more_steps", {}).get("train_time_s"):
        ratio = qa["train_time_s"] / by["fp32_more_steps"]["train_time_s"]
        lines.append(f"- A fake-quant step costs {ratio:.2f}× an FP32 step here.")
    lines.append(f"- INT8 size {qa['size_bytes'] / 2**20:.1f} MiB ({qa['bits_per_param']:.2f} bits/param), "
                 f"batch-8 speedup {qa['speedup_vs_fp32']:.2f}× vs FP32 in this run. "
                 f"`qat_bert_int8/` reloads (weights_only) with identical accuracy: {res.reload_ok}.")
    lines.append("- One seed: the intervals above are over sentences, not over training runs (seed-to-seed "
                 "variation of the fine-tunes is not in them).")
    return "\n".join(lines)
