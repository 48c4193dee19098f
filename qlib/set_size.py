"""The same comparisons on the shared evaluation set's first 16 windows (the `default` run) and on the whole set (the
`full` run): every interval on the real LM side by side with its width ratio, so a reader sees what eight times the
scored tokens (and four times the modules and articles) buys. It reads results only, like `report`."""
from __future__ import annotations

import math
from collections.abc import Iterator
from statistics import median
from typing import Any

from qlib.config import FULL_STUDIES
from qlib.core.paths import repo_root, results_dir
from qlib.results import load_metrics

START, END = "<!-- full-set:start -->", "<!-- full-set:end -->"
SUMMARY_START = "<!-- full-set-summary:start -->"

Estimate = tuple[float, float, float]  # value, 95 % interval low, high


def _interval(d: dict[str, Any], key: str) -> Estimate | None:
    lo, hi = d.get(f"{key}_lo"), d.get(f"{key}_hi")
    return None if d.get(key) is None or lo is None or hi is None else (d[key], lo, hi)


def comparisons(doc: dict[str, Any]) -> Iterator[tuple[str, Estimate]]:
    """(what, estimate) of every interval on the real LM a study reports: rows' perplexity ratios and mean KL,
    06's held-out bitmaps, 08's adapter against the unquantized base."""
    blocks = doc.get("block_search") or {}
    rows = [(r["method"], r) for r in doc["rows"] if r.get("dataset") == "stdlib-code+bbc-news"]
    rows += [(f"bitmap {r['bitmap_name']}", r) for r in blocks.get("rows") or []]
    for name, r in rows:
        for key, label in (("perplexity_ratio", f"ppl vs {r.get('reference') or 'reference'}"), ("kl_mean", "KL")):
            if (est := _interval(r, key)) is not None:
                yield f"{name}: {label}", est
    for fmt, kept in (doc.get("adapter_kept") or {}).items():
        if fmt != "merged_fp16" and (est := _interval(kept, "ppl_vs_fp16_base")) is not None:
            yield f"merged {fmt}: ppl vs FP16 base", est


def pairs(default: dict[str, Any], full: dict[str, Any]) -> list[tuple[str, Estimate, Estimate]]:
    """The comparisons both runs report, in the default run's order."""
    got = dict(comparisons(full))
    return [(what, est, got[what]) for what, est in comparisons(default) if what in got]


def width_ratio(a: Estimate, b: Estimate, what: str = "") -> float | None:
    """Width of b's interval over a's (None where a's is empty, e.g. a row against itself). A perplexity ratio is
    multiplicative, so its width is log(hi / lo): a ratio that doubles between the runs does not read as wider."""
    if not a[2] > a[1]:
        return None
    if "ppl vs" in what and min(a[1], b[1]) > 0:
        return math.log(b[2] / b[1]) / math.log(a[2] / a[1])
    return (b[2] - b[1]) / (a[2] - a[1])


def _docs(study: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    paths = [p for p in (results_dir(study, "default") / "metrics.json", results_dir(study, "full") / "metrics.json")
             if p.is_file()]
    return (load_metrics(paths[0]), load_metrics(paths[1])) if len(paths) == 2 else None


def _studies() -> list[str]:
    return sorted(p.parent.name for p in (repo_root() / "results" / "full").glob("[0-9][0-9]_*/metrics.json")
                  if p.parent.name[:2] in FULL_STUDIES)


def _runs() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(what, default run, full run) of every study kept in results/full/ ({} where it has no default run), and of
    every `formats` list kept beside its whole-set twin (`--eval-tokens 32768 --name full`: formats/<x>-full/)."""
    out = [(study, *(_docs(study) or ({}, {}))) for study in _studies()]
    for full in sorted((repo_root() / "results" / "formats").glob("*-full/metrics.json")):
        default = full.parent.with_name(full.parent.name.removesuffix("-full")) / "metrics.json"
        if default.is_file():
            out.append((f"formats {default.parent.name}", load_metrics(default), load_metrics(full)))
    return out


def _cell(e: Estimate) -> str:
    return f"{e[0]:.3f} [{e[1]:.3f}, {e[2]:.3f}]"


def table() -> str:
    """Markdown: every comparison on both sets, its width ratio, and per study the median ratio."""
    out = []
    for study, default, full in _runs():
        if not default:
            out += [f"**{study}**: no default run to compare with.", ""]
            continue
        ps = pairs(default, full)
        ratios = [r for w, a, b in ps if (r := width_ratio(a, b, w)) is not None]
        out += [f"**{study}** ({_set(default)} against {_set(full)}): {len(ratios)} intervals, width ratio median "
                f"{median(ratios):.2f}, {sum(r <= 0.5 for r in ratios)} of {len(ratios)} at most half as wide.", "",
                "| comparison | first 16 windows | whole set | width ratio |", "|---|---|---|---|"]
        out += [f"| {w} | {_cell(a)} | {_cell(b)} | {_fmt_ratio(width_ratio(a, b, w))} |" for w, a, b in ps]
        out.append("")
    return "\n".join(out).strip() or ("No `full` run is kept in results/full/ yet: "
                                      "`python -m qlib run --profile full` (05, 06, 08) fills it, and "
                                      "`python -m qlib formats <model> --eval-tokens 32768 --name full` a list's twin.")


def _set(doc: dict[str, Any]) -> str:
    about = doc.get("eval_set") or (doc.get("block_search") or {}).get("eval_set") or \
        (doc.get("methods") or {}).get("eval_set") or {}
    return f"{about.get('windows', '?')} windows, {about.get('scored_tokens', 0):,} tokens" if about else "?"


def _fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}"


def summary() -> str:
    """Markdown for the README: per study the median width ratio, and 08's adapter against the FP16 base on both."""
    lines = ["| study | intervals | width ratio, median [min, max] | at most half as wide |", "|---|---|---|---|"]
    keep = []
    for study, default, full in _runs():
        if not default:
            continue
        ps = pairs(default, full)
        ratios = [r for w, a, b in ps if (r := width_ratio(a, b, w)) is not None]
        lines.append(f"| {study} | {len(ratios)} | {median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}] | "
                     f"{sum(r <= 0.5 for r in ratios)} |")
        keep += [(w, a, b) for w, a, b in ps if w.endswith("ppl vs FP16 base") or w.startswith("bitmap greedy: ppl")]
    if len(lines) == 2:
        return table()
    lines += ["", "| comparison | first 16 windows | whole set |", "|---|---|---|"]
    lines += [f"| {w} | {_cell(a)} | {_cell(b)} |" for w, a, b in keep]
    return "\n".join(lines)
