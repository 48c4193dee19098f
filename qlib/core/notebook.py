"""An executed notebook made readable as a report: papermill stores every progress-bar refresh as its own output
(tens of thousands in one notebook) and the absolute paths of the machine that ran it. `tidy` keeps what a terminal
would finally show: consecutive stream outputs merged, each carriage-return rewrite settled to its last state,
terminal escape codes dropped, and the run's root, its Python environment and home written as `.`,
`<env>` and `~`."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

TOKEN = re.compile(r"(\x1b\[[0-9;?]*[A-Za-z]|\r|\n)")
UP = "\x1b[A"


def settle(text: str) -> str:
    """What a terminal finally shows of `text`: a carriage return rewrites its line, the cursor-up code that nested
    progress bars use moves back a line, other escape codes are dropped, blank runs collapse to one."""
    lines, row, rewrite = [""], 0, False
    for tok in TOKEN.split(text):
        if tok == "\n":
            row, rewrite = row + 1, False
            if row == len(lines):
                lines.append("")
        elif tok == "\r":
            rewrite = True
        elif tok == UP:
            row = max(0, row - 1)
        elif tok and not tok.startswith("\x1b"):
            lines[row] = tok if rewrite else lines[row] + tok
            rewrite = False
    kept = [ln.rstrip() for ln in lines]
    return "\n".join(ln for i, ln in enumerate(kept) if ln or (i and kept[i - 1])).rstrip("\n") + \
        ("\n" if text.endswith("\n") else "")


def merge_streams(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive stream outputs of the same stream as one, settled; other outputs kept in place."""
    merged: list[dict[str, Any]] = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if out.get("output_type") == "stream" and prev and prev.get("output_type") == "stream" \
                and prev.get("name") == out.get("name"):
            prev["text"] = _text(prev) + _text(out)
        else:
            merged.append(dict(out, text=_text(out)) if out.get("output_type") == "stream" else out)
    for out in merged:
        if out.get("output_type") == "stream":
            out["text"] = settle(out["text"])
    return merged


def _text(out: dict[str, Any]) -> str:
    t = out.get("text", "")
    return "".join(t) if isinstance(t, list) else t


def tidy(nb: dict[str, Any], root: Path) -> dict[str, Any]:
    """The notebook with its streams merged and settled, and no absolute path of this machine."""
    for cell in nb.get("cells", []):
        if "outputs" in cell:
            cell["outputs"] = merge_streams(cell["outputs"])
    text = json.dumps(nb, ensure_ascii=False)
    for path, short in ((str(root.resolve()), "."), *_env(), (str(Path.home()), "~")):
        text = text.replace(path + "/", short + "/").replace(path, short)
    return json.loads(text)


def _env() -> list[tuple[str, str]]:
    """The Python environment's folder as `<env>`, after the root (a venv inside the repository stays ./.venv), and
    only where it is an environment of its own (a venv or conda env, not the system's /usr)."""
    return [] if sys.prefix in ("/", "/usr", "/usr/local") else [(sys.prefix, "<env>")]


def tidy_file(path: Path, root: Path) -> None:
    """Tidy an executed notebook in place (the caller writes it to a temporary name first)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(tidy(nb, root), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
