"""Results on disk: atomic writes, the metrics.json schema, results/summary.md and figures."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qlib.config import QlabError, repo_root

# Every row carries all of these; a metric that does not apply is None (null), never left out.
ROW_KEYS = ("method", "model", "dataset", "accuracy", "f1", "perplexity", "em", "size_bytes",
            "bits_per_param", "latency_ms", "tokens_per_s", "speedup_vs_fp32", "peak_mem_bytes",
            "train_time_s", "trainable_params", "total_params")
TOP_KEYS = ("study", "profile", "seed", "env", "assets", "rows")


# ---------------------------------------------------------------- atomic writes

def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temp file in the same folder, fsync, then rename: readers never see half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return p


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder to fill; on success it replaces `path`, on error it is removed."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a saved model is meant to be shared like any folder
    try:
        yield tmp
        old = p.with_name(f".{p.name}.old")
        if p.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(p, old)
        os.replace(tmp, p)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------- the schema

def peak_memory_text(rep: dict[str, Any] | None) -> str:
    """One line of a peak-memory report (`metrics.PeakMemory.report`): CUDA reserved/allocated, or CPU RSS."""
    if not rep:
        return "not measured"
    if rep.get("memory") == "cuda":
        gpus = "; ".join(f"GPU {g['gpu']} {g['max_reserved_gb']:.2f}/{g['max_allocated_gb']:.2f}" for g in rep["per_gpu"])
        return (f"CUDA max reserved {rep['overall_max_reserved_gb']:.2f} GiB, max allocated "
                f"{rep['overall_max_allocated_gb']:.2f} GiB (per GPU reserved/allocated: {gpus})")
    return (f"CPU RSS (no GPU): process peak {rep['rss_peak_gb']:.2f} GiB, of which the run added "
            f"{rep['rss_growth_peak_gb']:.2f} GiB")


def make_row(method: str, **metrics: Any) -> dict[str, Any]:
    """A results row with every schema key (None where it does not apply) plus any extra keys."""
    if not method or method != method.lower():
        raise ValueError(f"method must be a non-empty lower-case name, got {method!r}")
    row: dict[str, Any] = {k: None for k in ROW_KEYS}
    row.update(method=method, **metrics)
    for k, v in row.items():
        if isinstance(v, float) and not math.isfinite(v):
            row[k] = None
    return row


# The results schema (DESIGN.md, "Results schema"): each row key's type and range; null where it does not apply.
NUM, INT = (int, float), (int,)
ROW_SCHEMA: dict[str, tuple[tuple[type, ...], float | None, float | None]] = {
    "accuracy": (NUM, 0, 1), "f1": (NUM, 0, 1), "em": (NUM, 0, 1), "perplexity": (NUM, 1, None),
    "size_bytes": (INT, 0, None), "bits_per_param": (NUM, 0, None), "latency_ms": (NUM, 0, None),
    "tokens_per_s": (NUM, 0, None), "speedup_vs_fp32": (NUM, 0, None), "peak_mem_bytes": (NUM, None, None),
    "train_time_s": (NUM, 0, None), "trainable_params": (INT, 0, None), "total_params": (INT, 0, None)}
TOP_SCHEMA: dict[str, type | tuple[type, ...]] = {"study": str, "profile": str, "seed": int, "env": dict,
                                                  "assets": dict, "rows": list}


def validate_metrics(doc: Any, where: str = "metrics") -> dict[str, Any]:
    """Check a metrics document against the results schema (keys, types, ranges); raise a QlabError naming the
    first thing that is wrong. Used for writing and for reading."""
    if not isinstance(doc, dict):
        raise QlabError(f"{where}: a metrics document is a JSON object, got {type(doc).__name__}")
    missing = [k for k in TOP_KEYS if k not in doc]
    if missing:
        raise QlabError(f"{where}: missing top-level keys {missing}")
    for k, t in TOP_SCHEMA.items():
        if not isinstance(doc[k], t) or isinstance(doc[k], bool):
            raise QlabError(f"{where}: {k} must be {getattr(t, '__name__', t)}, got {type(doc[k]).__name__}")
    if not doc["rows"]:
        raise QlabError(f"{where}: rows is empty")
    for i, row in enumerate(doc["rows"]):
        _validate_row(row, f"{where}: row {i}")
    return doc


def _validate_row(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise QlabError(f"{where} must be an object, got {type(row).__name__}")
    lacking = [k for k in ROW_KEYS if k not in row]
    if lacking:
        raise QlabError(f"{where} ({row.get('method')}) lacks keys {lacking}")
    if not isinstance(row["method"], str) or not row["method"]:
        raise QlabError(f"{where}: method must be a non-empty string, got {row['method']!r}")
    for k in ("model", "dataset"):
        if row[k] is not None and not isinstance(row[k], str):
            raise QlabError(f"{where} ({row['method']}): {k} must be a string or null, got {row[k]!r}")
    for k, (types, lo, hi) in ROW_SCHEMA.items():
        v = row[k]
        if v is None:
            continue
        whole_ok = types != INT or isinstance(v, int) or (isinstance(v, float) and v.is_integer())
        if isinstance(v, bool) or not isinstance(v, NUM) or not whole_ok or (isinstance(v, float) and not math.isfinite(v)):
            raise QlabError(f"{where} ({row['method']}): {k} must be a {'whole' if types == INT else 'finite'} "
                            f"number or null, got {v!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise QlabError(f"{where} ({row['method']}): {k} = {v!r} is outside [{lo}, {hi if hi is not None else '∞'}]")


def write_metrics(study: str, profile: str, seed: int, env: dict[str, Any],
                  assets: dict[str, Any], rows: list[dict[str, Any]],
                  out_dir: str | Path | None = None, **extra: Any) -> Path:
    """Write results/<study>/metrics.json (or results/<profile>/<study>/) atomically."""
    from qlib.config import results_dir

    doc = {"study": study, "profile": profile, "seed": seed, "env": env, "assets": assets,
           "rows": rows, **extra}
    validate_metrics(doc, study)
    d = Path(out_dir) if out_dir else results_dir(study, profile)
    return atomic_write_text(d / "metrics.json", json.dumps(doc, indent=2, default=_jsonable) + "\n")


def write_per_example(study: str, profile: str, name: str, columns: dict[str, Any]) -> Path:
    """Per-example results (one row per sentence, answer or token; one column per method) as a gzipped CSV
    beside metrics.json, so any comparison can be re-tested without rerunning the study."""
    import gzip
    import io

    import pandas as pd

    from qlib.config import results_dir

    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        gz.write(pd.DataFrame(columns).to_csv(index=False, float_format="%.5g").encode())
    return atomic_write_bytes(results_dir(study, profile) / f"{name}.csv.gz", buf.getvalue())


def points_interval(row: dict[str, Any], key: str, label: str = "") -> str:
    """'-1.2 pt [-2.5, +0.1]<label>, within noise' from the `key`, `key_lo/_hi/_real` of an accuracy difference."""
    d, lo, hi = (100 * row[k] for k in (key, f"{key}_lo", f"{key}_hi"))
    return f"{d:+.1f} pt [{lo:+.1f}, {hi:+.1f}]{label}" + ("" if row[f"{key}_real"] else ", within noise")


def seed_spread_text(row: dict[str, Any], key: str, scale: float = 1.0, fmt: str = ".3f", unit: str = "") -> str:
    """'0.805 ± 0.004 over 3 seeds' from `key_seed_mean/_sd` (`scale` 100 and unit ' pt' for differences)."""
    mean, sd, n = row.get(f"{key}_seed_mean"), row.get(f"{key}_seed_sd"), row.get("n_seeds")
    if mean is None:
        return "one seed"
    if sd is None:
        return f"{scale * mean:{fmt}}{unit}, one seed"
    return f"{scale * mean:{fmt}} ± {scale * sd:{fmt.lstrip('+')}}{unit} over {n} seeds"


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_metrics(path: str | Path) -> dict[str, Any]:
    """Read and validate one metrics.json; a missing or corrupt file is a clear error."""
    p = Path(path)
    if not p.is_file():
        raise QlabError(f"results file not found: {p}")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QlabError(f"corrupt results file {p}: {type(e).__name__}: {e}") from None
    return validate_metrics(doc, str(p))


# ---------------------------------------------------------------- summary

SUMMARY_COLS = ("method", "model", "accuracy", "f1", "perplexity", "em", "size_bytes",
                "bits_per_param", "latency_ms", "latency_ms_b8", "tokens_per_s", "speedup_vs_fp32", "peak_mem_bytes",
                "train_time_s", "trainable_params", "total_params")


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "–"
    if key.endswith("_bytes"):
        return f"{v / 2**20:.1f}"
    if key.endswith("params"):
        return f"{v / 1e6:.2f}"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def _header(key: str) -> str:
    if key.endswith("_bytes"):
        return key[: -len("_bytes")] + " (MiB)"
    if key.endswith("params"):
        return key + " (M)"
    return {"latency_ms": "latency b1 (ms)", "latency_ms_b8": "latency b8 (ms)"}.get(key, key)


def metrics_table(doc: dict[str, Any]) -> str:
    """A markdown table of one study's rows (only columns some row fills)."""
    cols = [c for c in SUMMARY_COLS if any(r.get(c) is not None for r in doc["rows"])]
    lines = ["| " + " | ".join(_header(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in doc["rows"]:
        lines.append("| " + " | ".join(_fmt(c, r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def collect(profile: str = "default", skipped: list[str] | None = None) -> list[dict[str, Any]]:
    """Every study's metrics.json of one profile, in notebook order; a malformed one is left out and named in
    `skipped` (one line each), so it cannot take the others down with it."""
    base = repo_root() / "results"
    base = base if profile == "default" else base / profile
    docs = []
    for p in sorted(base.glob("[0-9][0-9]_*/metrics.json")):
        try:
            docs.append(load_metrics(p))
        except QlabError as e:
            if skipped is None:
                raise
            skipped.append(str(e))
    return docs


# Rows gathered across studies into one comparison table (study, method), in this order.
CROSS_TABLES = {
    "BERT compression (01-04, same encoder, same held-out split)": [
        ("01_baseline", "fp32"), ("02_ptq", "ptq_int8_dynamic"), ("02_ptq", "ptq_int8_static"),
        ("02_ptq", "ort_int8_dynamic"), ("02_ptq", "ort_int8_static"), ("03_qat", "qat_int8"),
        ("04_qlora_bert", "qlora")],
}


def cross_table(docs: list[dict[str, Any]], picks: list[tuple[str, str]]) -> str | None:
    """One markdown table of chosen rows from several studies (None if fewer than two are there)."""
    by = {(d["study"], r["method"]): r for d in docs for r in d["rows"]}
    rows = [{"study": s, **by[(s, m)]} for s, m in picks if (s, m) in by]
    if len(rows) < 2:
        return None
    cols = ["study"] + [c for c in SUMMARY_COLS if any(r.get(c) is not None for r in rows)]
    lines = ["| " + " | ".join(_header(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(c, r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_summary(profile: str = "default", skipped: list[str] | None = None) -> Path:
    """results/summary.md (or results/<profile>/summary.md): one table per study, with provenance; malformed
    results files are named in `skipped` and in the summary, and left out."""
    skipped = [] if skipped is None else skipped
    docs = collect(profile, skipped)
    if not docs:
        raise QlabError(f"no results for profile {profile!r} yet: run `python -m qlib run --profile {profile}`")
    out = [f"# qlab results ({profile} profile)", "",
           "Generated by `python -m qlib report` from results/*/metrics.json. Sizes in MiB "
           "(2^20 bytes), latency in ms (median after warm-up), memory as stated per study.", ""]
    for title, picks in CROSS_TABLES.items():
        table = cross_table(docs, picks)
        if table:
            out += [f"## {title}", "", "Latency and speedup are comparable only within one study's "
                    "run (each study measures its own FP32 reference).", "", table, ""]
    for d in docs:
        env = d["env"]
        where = env.get("gpu") or f"{env.get('cpu')} ({', '.join(env.get('isa', [])) or 'no AVX2'})"
        assets = "; ".join(f"{k}: {v.get('id')} [{v.get('source')}]" for k, v in d["assets"].items())
        out += [f"## {d['study']}", "", f"Device: {env.get('device')} – {where}, "
                f"{env.get('threads')} threads, torch {env.get('torch')}. Seed {d['seed']}.",
                f"Assets: {assets}.", "", metrics_table(d), ""]
        if d.get("notes"):
            out += [f"Notes: {d['notes']}", ""]
    out += ["## Left out (malformed results)", ""] + [f"- {m}" for m in skipped] + [""] if skipped else []
    base = repo_root() / "results"
    path = base / "summary.md" if profile == "default" else base / profile / "summary.md"
    return atomic_write_text(path, "\n".join(out))


# ---------------------------------------------------------------- figures

def plot_loss(losses: list[float], ax: Any, window: int = 10, title: str = "training loss") -> Any:
    """Per-step loss and its rolling mean."""
    import pandas as pd
    import seaborn as sns

    df = pd.DataFrame({"step": range(1, len(losses) + 1), "loss": losses})
    df["rolling mean"] = df["loss"].rolling(min(window, len(df)), min_periods=1).mean()
    sns.lineplot(data=df, x="step", y="loss", ax=ax, alpha=0.35, label="per step")
    sns.lineplot(data=df, x="step", y="rolling mean", ax=ax, label=f"mean of {window}")
    ax.set(title=title, ylabel="cross-entropy")
    return ax


def plot_confusion(preds: list[int], labels: list[int], names: list[str], ax: Any,
                   title: str = "held-out confusion matrix") -> Any:
    """Counts of (true, predicted) label pairs as an annotated heat-map."""
    import numpy as np
    import seaborn as sns

    k = len(names)
    m = np.zeros((k, k), dtype=int)
    for p, y in zip(preds, labels):
        m[y, p] += 1
    sns.heatmap(m, annot=True, fmt="d", cmap="Blues", cbar=False, xticklabels=names,
                yticklabels=names, ax=ax)
    ax.set(title=title, xlabel="predicted", ylabel="true")
    return ax


# ---------------------------------------------------------------- README

README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"

# Published figures, shown beside ours and never as our results.
REFERENCES = {
    ("02_ptq", "ptq_int8_dynamic"): "BERT-base dynamic INT8: 438→181 MB, 1.78× on a VNNI CPU "
                                    "(PyTorch dynamic-quantization BERT tutorial)",
    ("04_qlora_bert", "qlora"): "NF4+DQ: 4.127 bits/param (Dettmers et al. 2023, QLoRA)",
    ("05_gpt2_bitnet", "bitnet"): "b1.58 matches FP16 perplexity from 3B params up when trained from "
                                  "scratch (Ma et al. 2024)",
    ("08_qwen_merge_gguf", "gguf_q4_0"): "LLaMA-7B Q4_0: perplexity +4.2 % vs F16 (llama.cpp README "
                                         "quantization table, 2023)",
}


def _speed(r: dict[str, Any]) -> str:
    if r.get("speedup_vs_fp32") is not None:
        return f"{r['speedup_vs_fp32']:.2f}×"
    if r.get("decode_vs_fp16_same_runtime") is not None:  # deploy formats: vs the FP16 of the same runtime
        return f"{r['decode_vs_fp16_same_runtime']:.2f}× vs FP16 ({r.get('backend')})"
    return "–"


def _quality(r: dict[str, Any]) -> str:
    """Accuracy or perplexity, with the first paired interval the row has (vs fp32, the majority answer, or the
    reference of the same tokens), and the spread over training seeds where the row was trained several times."""
    q = _quality_of_run(r)
    for key, fmt in (("accuracy", ".3f"), ("perplexity", ".2f")):
        if r.get(f"{key}_seed_sd") is not None:
            return f"{q}; {seed_spread_text(r, key, fmt=fmt)}"
    return q


def _quality_of_run(r: dict[str, Any]) -> str:
    if r.get("accuracy") is not None:
        for key, label in (("accuracy_diff_vs_fp32", "fp32"), ("accuracy_diff_vs_majority", "majority answer")):
            if r.get(f"{key}_lo") is not None:  # paired bootstrap over the same sentences / questions
                d, lo, hi = (100 * r[f"{key}{k}"] for k in ("", "_lo", "_hi"))
                return f"acc {r['accuracy']:.3f} ({d:+.1f} pt [{lo:+.1f}, {hi:+.1f}] vs {label})"
        return f"acc {r['accuracy']:.3f}"
    if r.get("perplexity") is not None:
        ci = ""
        for key, label in (("perplexity_ratio", r.get("reference")), ("perplexity_ratio_vs_fp32", "fp32")):
            if r.get(f"{key}_lo") is not None:  # vs a reference on the same tokens, 95 % paired bootstrap
                lo, mid, hi = (r[f"{key}{k}"] for k in ("_lo", "", "_hi"))
                ci = (f" ({100 * (mid - 1):+.1f} % [{100 * (lo - 1):+.1f}, {100 * (hi - 1):+.1f}] vs {label})"
                      if mid < 2 else f" (×{mid:.3g} [{lo:.3g}, {hi:.3g}] vs {label})")
                break
        return f"ppl {r['perplexity']:.2f}{ci}"
    return "–"


def readme_table(profile: str = "default") -> str:
    """Every row of every study: quality, size, bits, speed ratio, memory, plus a reference column."""
    lines = ["| study | method | model | quality | size (MiB) | bits/param | speed vs fp32 (same run) | "
             "peak train mem (MiB) | reference (published, not ours) |", "|" + "---|" * 9]
    for d in collect(profile, []):
        for r in d["rows"]:
            if r.get("source") == "notebook 01":
                continue  # a copy of 01's row, shown once
            lines.append("| " + " | ".join([
                d["study"], r["method"], str(r.get("model") or "–"), _quality(r), _fmt("size_bytes", r.get("size_bytes")),
                _fmt("bits_per_param", r.get("bits_per_param")),
                _speed(r),
                _fmt("peak_mem_bytes", r.get("peak_mem_bytes")),
                REFERENCES.get((d["study"], r["method"]), "")]) + " |")
        lines += _projection_lines(d)
    return "\n".join(lines)


def _projection_lines(d: dict[str, Any]) -> list[str]:
    """Study 07's 7B-on-T4 projection (accounting, not a measurement): one README row per method, the measured H100
    peak of the same recipe in the reference column."""
    ref = d.get("reference") or {}
    out = []
    for p in d.get("projection_7b") or []:
        peak = ref.get(f"{p['method']}_7b_peak_gib")
        cite = f"{peak:g} GiB measured in bf16 ({ref['source']})" if peak else ""
        out.append(f"| {d['study']} | {p['method']} (7B on T4, **projected** by the accounting) | llama-7b | – | – | – | – | "
                   f"{p['accounting_bytes'] / 2**20:.1f} | {cite} |")
    return out


def update_readme(path: str | Path | None = None) -> Path:
    """Refill the README's results section (default run) and, where it has one, its GPU-results section."""
    p = Path(path) if path else repo_root() / "README.md"
    text = p.read_text()
    if README_START not in text or README_END not in text:
        raise QlabError(f"{p} has no {README_START} … {README_END} section to fill")
    text = _fill(text, README_START, README_END, readme_table("default"))
    if GPU_START in text and GPU_END in text:
        text = _fill(text, GPU_START, GPU_END, gpu_readme_table())
    if T4_START in text and T4_END in text:
        from qlib import plans  # predictions from the t4 configs and the hub models' true configs

        text = _fill(text, T4_START, T4_END, plans.table(plans.profile_plans("t4")))
    return atomic_write_text(p, text)


T4_START, T4_END = "<!-- t4-plan:start -->", "<!-- t4-plan:end -->"


def _fill(text: str, start: str, end: str, body: str) -> str:
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


# ---------------------------------------------------------------- README: GPU results

GPU_START, GPU_END = "<!-- gpu-results:start -->", "<!-- gpu-results:end -->"

# (study, method, against): one comparison measured side by side in the gpu run; the same pair from the default
# (CPU) run sits beside it. On the CPU, 04 has no FP32 full fine-tune of its own: 01's is that run's reference.
GPU_PAIRS = [("04_qlora_bert", "qlora", "fp32"), ("05_gpt2_bitnet", "qlora", "fp32"),
             ("05_gpt2_bitnet", "bitnet", "fp32"), ("05_gpt2_bitnet", "qlora_bitnet", "fp32"),
             ("07_llama_scaling", "qlora", "lora")]
CPU_STAND_IN = {("04_qlora_bert", "fp32"): "01_baseline"}


def _step_s(r: dict[str, Any]) -> float | None:
    if r.get("step_time_s") is not None:
        return r["step_time_s"]
    return r["train_time_s"] / r["train_steps"] if r.get("train_time_s") and r.get("train_steps") else None


def _pair(docs: dict[str, dict[str, Any]], study: str, method: str, against: str
          ) -> tuple[dict[str, Any], dict[str, Any], str] | None:
    """The two rows to compare (07: at the largest rung where both ran), and what they are."""
    def rows(s: str) -> list[dict[str, Any]]:
        return [r for r in docs[s]["rows"] if r.get("status", "ok") == "ok"] if s in docs else []

    if study == "07_llama_scaling":
        by = {(r["rung"], r["method"]): r for r in rows(study) if r.get("rung")}
        both = [r for r, m in by if m == method and (r, against) in by]
        if not both:
            return None
        rung = max(both, key=lambda x: by[(x, method)]["total_params"])
        return by[(rung, method)], by[(rung, against)], rung
    a = next((r for r in rows(study) if r["method"] == method), None)
    b = next((r for r in rows(CPU_STAND_IN.get((study, against), study)) if r["method"] == against), None)
    if b is None:
        b = next((r for r in rows(study) if r["method"] == against), None)
    return (a, b, str(a.get("model"))) if a and b else None


def _ratio_cell(p: tuple[dict[str, Any], dict[str, Any], str] | None) -> str:
    if p is None:
        return "–"
    a, b, what = p
    mem = (f"{a['peak_mem_bytes'] / b['peak_mem_bytes']:.2f}×" if a.get("peak_mem_bytes") and b.get("peak_mem_bytes")
           else "–")
    ta, tb = _step_s(a), _step_s(b)
    return f"mem {mem}, time {f'{ta / tb:.2f}×' if ta and tb else '–'} ({what})"


def gpu_readme_table() -> str:
    """GPU vs CPU: each pair's peak memory and step time on the GPU, and the same ratios from the CPU run."""
    gpu = {d["study"]: d for d in collect("gpu", [])}
    if not gpu:
        return ("**Not run here**: no GPU was lent to the sessions so far (the device tool's `can_start_another` "
                "was false), so this section holds no GPU number. `make gpu` on a CUDA machine fills it from "
                "`results/gpu/`; the CPU rehearsal of the same notebooks runs in the tests.")
    cpu = {d["study"]: d for d in collect("default", [])}
    env = next(iter(gpu.values()))["env"]
    lines = [f"Device: {env.get('gpu')} (CUDA {env.get('cuda')}, torch {env.get('torch')}, bitsandbytes "
             f"{env.get('bitsandbytes')}). Ratios are method / reference, measured in the same run.", "",
             "| study | method vs reference | GPU peak mem (GiB) | GPU step time (s) | GPU ratio | CPU ratio (default run) |",
             "|" + "---|" * 6]
    for study, method, against in GPU_PAIRS:
        p = _pair(gpu, study, method, against)
        if p is None:
            continue
        a, b, _ = p
        mems = " / ".join(f"{r['peak_mem_bytes'] / 2**30:.2f}" if r.get("peak_mem_bytes") else "–" for r in (a, b))
        times = " / ".join(f"{t:.3f}" if (t := _step_s(r)) else "–" for r in (a, b))
        lines.append(f"| {study} | {method} vs {against} | {mems} | {times} | {_ratio_cell(p)} | "
                     f"{_ratio_cell(_pair(cpu, study, method, against))} |")
    return "\n".join(lines + _gpu_7b_lines(gpu.get("07_llama_scaling")))


def _gpu_7b_lines(doc: dict[str, Any] | None) -> list[str]:
    """07 at 7B: the accounting's prediction against the measurement, the T4-conditions rerun, the bars."""
    from qlib.studies.llama_scaling import measured_7b_lines

    return [""] + measured_7b_lines(doc) if doc else []
