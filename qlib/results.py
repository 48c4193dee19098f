"""The results schema (DESIGN.md): every study's metrics.json, its rows (every key, null where it does not apply),
per-example CSVs beside it, and the text helpers findings use for intervals and seed spreads."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from qlib.core.errors import QlabError
from qlib.core.io import atomic_write_bytes, atomic_write_text
from qlib.core.paths import results_dir

# Every row carries all of these; a metric that does not apply is None (null), never left out.
ROW_KEYS = ("method", "model", "dataset", "accuracy", "f1", "perplexity", "em", "size_bytes",
            "bits_per_param", "latency_ms", "tokens_per_s", "speedup_vs_fp32", "peak_mem_bytes",
            "train_time_s", "trainable_params", "total_params")
TOP_KEYS = ("study", "profile", "seed", "env", "assets", "rows")


def peak_memory_text(rep: dict[str, Any] | None) -> str:
    """One line of a peak-memory report (`metrics.PeakMemory.report`): CUDA reserved/allocated, or CPU RSS."""
    if not rep:
        return "not measured"
    if rep.get("memory") == "cuda":
        gpus = "; ".join(f"GPU {g['gpu']} {g['max_reserved_gb']:.2f}/{g['max_allocated_gb']:.2f}"
                         for g in rep["per_gpu"])
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
    block = doc.get("readme")
    if block is not None and (not isinstance(block, dict) or set(block) - README_KEYS):
        raise QlabError(f"{where}: readme must be an object with keys {sorted(README_KEYS)}, got {block!r:.120}")
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
        if (isinstance(v, bool) or not isinstance(v, NUM) or not whole_ok
                or (isinstance(v, float) and not math.isfinite(v))):
            raise QlabError(f"{where} ({row['method']}): {k} must be a {'whole' if types == INT else 'finite'} "
                            f"number or null, got {v!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise QlabError(f"{where} ({row['method']}): {k} = {v!r} is outside "
                            f"[{lo}, {hi if hi is not None else '∞'}]")


README_KEYS = frozenset({"published", "summary_tables", "gpu_pairs", "lines"})


def readme_block(published: dict[str, str] | None = None, summary_tables: dict[str, list[str]] | None = None,
                 gpu_pairs: list[tuple[str, ...]] | None = None, lines: list[str] | None = None) -> dict[str, Any]:
    """What a study asks the README and summary to show beyond its rows (the `readme` key of its metrics):
    published figures by method (a reference column, never our result), its rows in a cross-study table by title,
    (method, against[, study holding `against` when this run has none]) pairs for the GPU table, extra lines."""
    return {"published": published or {}, "summary_tables": summary_tables or {},
            "gpu_pairs": [list(p) for p in gpu_pairs or []], "lines": lines or []}


def write_metrics(study: str, profile: str, seed: int, env: dict[str, Any],
                  assets: dict[str, Any], rows: list[dict[str, Any]],
                  out_dir: str | Path | None = None, **extra: Any) -> Path:
    """Write results/<study>/metrics.json (or results/<profile>/<study>/) atomically."""
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

    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        gz.write(pd.DataFrame(columns).to_csv(index=False, float_format="%.5g").encode())
    return atomic_write_bytes(results_dir(study, profile) / f"{name}.csv.gz", buf.getvalue())


def points_interval(row: dict[str, Any], key: str, label: str = "") -> str:
    """'-1.2 pt [-2.5, +0.1]<label>, within noise' from the `key`, `key_lo/_hi/_real` of an accuracy difference."""
    d, lo, hi = (100 * row[k] for k in (key, f"{key}_lo", f"{key}_hi"))
    return f"{d:+.1f} pt [{lo:+.1f}, {hi:+.1f}]{label}" + ("" if row[f"{key}_real"] else ", within noise")


def times_interval(row: dict[str, Any], key: str) -> str:
    """'1.95× [1.80, 2.10]' from a speed ratio's `key`, `key_lo/_hi` (the bare ratio where no interval was kept)."""
    if row.get(key) is None:
        return "–"
    ci = f" [{row[f'{key}_lo']:.2f}, {row[f'{key}_hi']:.2f}]" if row.get(f"{key}_lo") is not None else ""
    return f"{row[key]:.2f}×{ci}"


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
