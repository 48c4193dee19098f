"""The offline code corpus: real functions with docstrings from this Python's standard library, split by module
(a stand-in for CodeSearchNet-Python that needs no download, and what qlib's small stand-in LMs pretrain on)."""
from __future__ import annotations

import ast
import hashlib
import json
import sys
import sysconfig
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

from qlib.core.io import atomic_write_text
from qlib.core.paths import cache_dir

SPLIT_SEED = 1234  # fixed, independent of the run seed: every study sees the same held-out split


@dataclass(frozen=True)
class CodeFunction:
    """One real function from the standard library: its module, docstring and source."""

    module: str
    name: str
    docstring: str
    code: str


_SKIP_PARTS = {"test", "tests", "lib2to3", "idlelib", "site-packages", "dist-packages", "__pycache__",
               "turtledemo", "ensurepip"}


def _functions_in(path: Path, module: str, min_doc: int) -> list[CodeFunction]:
    try:
        src = path.read_text(encoding="utf-8")
        tree = ast.parse(src)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = src.splitlines()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_doc and node.end_lineno:
                # slicing lines is ~50x faster than ast.get_source_segment over the whole stdlib
                body = lines[node.lineno - 1:node.end_lineno]
                code = textwrap.dedent("\n".join(body))
                out.append(CodeFunction(module, node.name, doc, code))
    return out


def load_code_corpus(min_doc: int = 20, stdlib: str | None = None) -> list[CodeFunction]:
    """Unique functions with docstrings from the stdlib, in a stable order (tests excluded).

    Parsing takes seconds, so the result is cached per Python version and stdlib path.
    """
    root = Path(stdlib or sysconfig.get_path("stdlib"))
    key = hashlib.sha256(f"{sys.version}|{root}|{min_doc}".encode()).hexdigest()[:12]
    cached = cache_dir() / "data" / f"stdlib-code-{key}.json"
    if cached.is_file():
        try:
            return [CodeFunction(**d) for d in json.loads(cached.read_text())]
        except (json.JSONDecodeError, TypeError):
            cached.unlink()  # corrupt cache: rebuild it below
    funcs = _parse_stdlib(root, min_doc)
    atomic_write_text(cached, json.dumps([asdict(f) for f in funcs]))
    return funcs


def _parse_stdlib(root: Path, min_doc: int) -> list[CodeFunction]:
    seen: set[str] = set()
    funcs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_PARTS & set(rel.parts) or rel.name.startswith("test_"):
            continue
        module = ".".join(rel.with_suffix("").parts)
        for fn in _functions_in(path, module, min_doc):
            if fn.code not in seen:
                seen.add(fn.code)
                funcs.append(fn)
    return funcs


def split_by_module(funcs: list[CodeFunction], eval_frac: float = 0.1
                    ) -> tuple[list[CodeFunction], list[CodeFunction]]:
    """Hold out whole modules (a stable hash picks ~eval_frac of them): no function leaks across."""
    def held(module: str) -> bool:
        h = hashlib.sha256(f"{SPLIT_SEED}:{module}".encode()).digest()
        return int.from_bytes(h[:4], "big") / 2**32 < eval_frac

    train = [f for f in funcs if not held(f.module)]
    evals = [f for f in funcs if held(f.module)]
    return train, evals


def sft_text(fn: CodeFunction) -> str:
    """A CodeSearchNet-style SFT example: the docstring's summary as a comment, then the function."""
    summary = fn.docstring.strip().splitlines()[0]
    return f"# {summary}\n{fn.code}\n"
