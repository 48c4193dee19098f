"""Where things live: the checkout, results/ and outputs/ of a study and profile (staged while it runs), the cache."""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from qlib.core.errors import QlabError
from qlib.core.io import make_folder


def repo_root() -> Path:
    """The qlab checkout (QLAB_ROOT, else the nearest parent holding pyproject.toml + qlib/)."""
    env = os.environ.get("QLAB_ROOT")
    if env:
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for p in (here, *here.parents):
        if (p / "pyproject.toml").is_file() and (p / "qlib").is_dir():
            return p
    return Path(__file__).resolve().parent.parent


_STAGING: dict[tuple[str, str], dict[str, Path]] = {}  # (study, profile) -> its staging folders while it runs


def results_dir(study: str, profile: str) -> Path:
    """results/<study>/ for the default profile, results/<profile>/<study>/ otherwise (its staging folder while
    that study runs)."""
    if (study, profile) in _STAGING:
        return _STAGING[(study, profile)]["results"]
    base = repo_root() / "results"
    return base / study if profile == "default" else base / profile / study


def outputs_dir(study: str, profile: str) -> Path:
    """Ignored folder for weights and checkpoints of one study and profile (staged like results_dir)."""
    if (study, profile) in _STAGING:
        return _STAGING[(study, profile)]["outputs"]
    return repo_root() / "outputs" / profile / study


@contextlib.contextmanager
def staged_run(study: str, profile: str) -> Iterator[dict[str, tuple[Path, Path]]]:
    """While the block runs, the study's results/ and outputs/ folders are fresh staging folders beside them; when
    it succeeds both replace the previous ones together, so a kill or a failed write leaves the previous run whole
    (model and metrics from the same run). Yields {kind: (staging, final)}."""
    if (study, profile) in _STAGING:  # already staged by an outer call
        yield {k: (v, v) for k, v in _STAGING[(study, profile)].items()}
        return
    finals = {"results": results_dir(study, profile), "outputs": outputs_dir(study, profile)}
    stages = {k: p.with_name(f".{p.name}.staging") for k, p in finals.items()}
    for k, final in finals.items():
        if final.exists() and not final.is_dir():
            raise QlabError(f"cannot write {k} of {study} to {final}: a file of that name is in the way; move it away")
    for d in stages.values():
        shutil.rmtree(d, ignore_errors=True)  # what a killed run left
        make_folder(d)
    _STAGING[(study, profile)] = stages
    try:
        yield {k: (stages[k], finals[k]) for k in finals}
    except BaseException:
        for d in stages.values():
            shutil.rmtree(d, ignore_errors=True)
        raise
    finally:
        _STAGING.pop((study, profile), None)
    _swap_in(study, stages, finals)


def _swap_in(study: str, stages: dict[str, Path], finals: dict[str, Path]) -> None:
    """Both staging folders replace results and outputs, or neither does: a move that fails undoes the ones
    before it, so results and outputs always come from the same run."""
    olds = {k: p.with_name(f".{p.name}.old") for k, p in finals.items()}
    done: list[tuple[Path, Path]] = []
    try:
        for k, final in finals.items():
            shutil.rmtree(olds[k], ignore_errors=True)
            if final.exists():
                os.replace(final, olds[k])
                done.append((final, olds[k]))
        for k, final in finals.items():
            os.replace(stages[k], final)
            done.append((stages[k], final))
    except OSError as e:
        for src, dst in reversed(done):
            with contextlib.suppress(OSError):
                os.replace(dst, src)
        raise QlabError(f"{study}: the new run could not replace the previous one ({e.strerror}: {e.filename}); "
                        f"the previous results and outputs are kept, the new run is in "
                        f"{', '.join(str(d) for d in stages.values())}") from None
    for old in olds.values():
        shutil.rmtree(old, ignore_errors=True)


def cache_dir() -> Path:
    """Where fetched data and qlib-pretrained models live (QLAB_CACHE, else ~/.cache/qlab)."""
    return Path(os.environ.get("QLAB_CACHE", Path.home() / ".cache" / "qlab"))
