"""One module per notebook, each with the same contract (flax's `get_config` / `train_and_evaluate`):

    STUDY             the notebook's stem, e.g. "02_ptq" (results/<STUDY>/, outputs/<profile>/<STUDY>/)
    ASSET_ROLES       {config field: role} for each field naming a model or dataset (checked before a run, fetched)
    Config            a frozen dataclass, one field per notebook parameter
    PROFILES          {profile: {field: value}}: what each profile changes
    config(profile, **params) -> Config    (None keeps the profile's value; an unknown name is an error)
    run(cfg) -> a StudyResult subclass     (rows, the metrics document, where it went)
    findings(res) -> str                   (markdown the notebook shows)
    gpu_predictions(profile) -> [Prediction]  (its training runs as a T4 would run them: `python -m qlib plan`)

so the CLI and the tests loop over studies, and a notebook builds its config in one call
(`notebook_config(module, globals())`)."""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from qlib.core.errors import QlabError
from qlib.core.io import atomic_write_text
from qlib.core.paths import staged_run
from qlib.core.quiet import no_load_bars

# Notebook stem -> module under qlib.studies, in notebook order.
STUDIES = {
    "01_baseline": "baseline",
    "02_ptq": "ptq",
    "03_qat": "qat",
    "04_qlora_bert": "qlora_bert",
    "05_gpt2_bitnet": "gpt2_bitnet",
    "06_switchable_precision": "switchable",
    "07_llama_scaling": "llama_scaling",
    "08_qwen_merge_gguf": "qwen_merge",
}


def study(name: str) -> ModuleType:
    """The study module for a notebook stem ("02_ptq") or its number ("02")."""
    stem = next((s for s in STUDIES if name in (s, s[:2])), None)
    if stem is None:
        raise QlabError(f"unknown study {name!r}; valid: {', '.join(STUDIES)}")
    return importlib.import_module(f"qlib.studies.{STUDIES[stem]}")


def asset_ids(module: ModuleType, cfg: Any) -> list[tuple[str, str, str]]:
    """(field, role, id) of every model or dataset a study's config names and uses; a study whose use of one depends
    on its settings says which with `uses_asset(cfg, field)`."""
    used = getattr(module, "uses_asset", lambda c, f: True)
    return [(f, role, getattr(cfg, f)) for f, role in module.ASSET_ROLES.items() if getattr(cfg, f) and used(cfg, f)]


def notebook_config(module: ModuleType, namespace: dict[str, Any]) -> Any:
    """A study's config from a notebook's parameters: `profile` and every Config field the namespace holds (the
    parameters cell and papermill's injected cell), a None keeping the profile's value."""
    fields = {f.name for f in dataclasses.fields(module.Config)} - {"profile"}
    params = {k: namespace[k] for k in sorted(fields) if k in namespace}
    return module.config(namespace.get("profile", "default"), **params)


@dataclass
class StudyResult:
    """What every study returns: its rows, the metrics document as written, and where it went."""

    rows: list[dict[str, Any]]
    doc: dict[str, Any]
    metrics_path: Path


def staged(study: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for a study's `run(cfg)`: it runs staged (`core.paths.staged_run`: results and artifacts move into
    place together, only when it succeeds), and the paths in what it returns and in its metrics.json name the
    final folders."""
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            no_load_bars()
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
    path = Path(_moved(staged_path, moves))
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        new = functools.reduce(lambda t, m: t.replace(m[0], m[1]), moves, text)
        if new != text:
            atomic_write_text(path, new)
