"""Atomic writes: a reader (or a killed run) never sees half a file or half a model folder. And the bytes a
stored tensor takes."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qlib.core.errors import QlabError


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def make_folder(path: str | Path) -> Path:
    """mkdir -p, where a file in the way is one line naming it (not a FileExistsError traceback)."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((q for q in (p, *p.parents) if q.exists() and not q.is_dir()), p)
        raise QlabError(f"cannot make the folder {p}: {blocker} is a file; move it away") from None
    return p


def check_replaceable(path: str | Path, markers: tuple[str, ...]) -> Path:
    """A folder qlab may write over: absent, empty, or a previous artifact (holds one of `markers`); a user's own
    folder (or a file) at that path is refused, so a typo never deletes someone's files."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise QlabError(f"{p} is a file, not a folder qlab wrote; pick another path or move it away")
    if p.is_dir() and any(p.iterdir()) and not any((p / m).exists() for m in markers):
        raise QlabError(f"{p} holds files qlab did not write (no {' or '.join(markers)}); it is not replaced: "
                        "pick another path or empty it")
    return p


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temp file in the same folder, fsync, then rename: readers never see half a file."""
    p = Path(path)
    make_folder(p.parent)
    if p.is_dir():
        raise QlabError(f"cannot write {p}: a folder of that name is in the way; move it away")
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
    make_folder(p.parent)
    if p.exists() and not p.is_dir():
        raise QlabError(f"cannot write the folder {p}: a file of that name is in the way; move it away")
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


def tensor_bytes(st: Any, key: str) -> int:
    """Bytes one tensor of an open safetensors file (`safe_open`) stores."""
    t = st.get_tensor(key)
    return t.numel() * t.element_size()
