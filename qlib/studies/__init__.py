"""One module per notebook: the study's whole run as functions the notebook calls and the tests run on tiny data."""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlib.config import staged_run


@dataclass
class StudyResult:
    """What every study returns: its rows, the metrics document as written, and where it went."""

    rows: list[dict[str, Any]]
    doc: dict[str, Any]
    metrics_path: Path


# Each notebook's config builder ("module:function"), so a run's parameters are checked before papermill starts.
CONFIG_BUILDERS = {
    "01_baseline": "qlib.config:baseline_config",
    "02_ptq": "qlib.studies.ptq:ptq_config",
    "03_qat": "qlib.studies.qat:qat_config",
    "04_qlora_bert": "qlib.studies.qlora_bert:qlora_config",
    "05_gpt2_bitnet": "qlib.studies.gpt2_bitnet:gpt2_config",
    "06_switchable_precision": "qlib.studies.switchable:switchable_config",
    "07_llama_scaling": "qlib.studies.llama_scaling:scaling_config",
    "08_qwen_merge_gguf": "qlib.studies.qwen_merge:qwen_merge_config",
}


def staged(study: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for a study's `run(cfg)`: it runs staged (`config.staged_run`: results and artifacts move into
    place together, only when it succeeds), and the paths in what it returns and in its metrics.json name the
    final folders."""
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            with staged_run(study, cfg.profile) as dirs:
                res = fn(cfg, *args, **kwargs)
            moves = [(str(s), str(f)) for s, f in dirs.values() if s != f]
            if moves and isinstance(getattr(res, "metrics_path", None), Path):
                _rewrite(res.metrics_path, moves)
            return _moved(res, moves) if moves else res
        return run
    return wrap


def _moved(obj: Any, moves: list[tuple[str, str]], depth: int = 0) -> Any:
    """`obj` with every path (or path string) under a staging folder pointed at the final folder."""
    if depth > 6:
        return obj
    if isinstance(obj, (str, Path)):
        s = str(obj)
        for a, b in moves:
            if s == a or s.startswith(a + os.sep):
                return type(obj)(b + s[len(a):])
        return obj
    if isinstance(obj, dict):
        return {k: _moved(v, moves, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_moved(v, moves, depth + 1) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            object.__setattr__(obj, f.name, _moved(getattr(obj, f.name), moves, depth + 1))
    return obj


def _rewrite(staged_path: Path, moves: list[tuple[str, str]]) -> None:
    """metrics.json as moved into place, with the staging folders' names replaced by the final ones."""
    from qlib.report import atomic_write_text

    path = Path(_moved(staged_path, moves))
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        new = functools.reduce(lambda t, m: t.replace(m[0], m[1]), moves, text)
        if new != text:
            atomic_write_text(path, new)
