"""qlib's imports point down (DESIGN.md, "Layers"): a module may import only modules of a lower layer, or of its
own layer listed before it. Imports inside functions count too: they are how import cycles hide."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import qlib

ROOT = Path(qlib.__file__).parent

# Bottom to top; inside a layer, a module may import only those listed before it.
LAYERS: list[tuple[str, list[str]]] = [
    ("ground floor", ["core", "core.errors", "core.io", "core.paths", "core.device", "core.pip", "core.notebook",
                      "core.quiet", "core.progress", "core.dist"]),
    ("foundations", ["config", "vocab", "runmeta", "results", "figures", "render", "metrics", "machine", "fidelity",
                     "replay", "ngram", "accounting", "corpus", "hub", "sharding",
                     "quant.uniform", "quant.nf4", "quant.bitnet", "quant.ptq", "quant.qat",
                     "quant.ladder", "quant.imatrix", "quant.api", "quant"]),
    ("models and data", ["pretrain", "assets", "data", "qa", "evalset", "choice", "budget", "models", "adapters",
                         "train", "backends", "backends.onnx", "backends.gguf_table", "backends.gguf",
                         "backends.bnb", "backends.llama_variants"]),
    ("methods", ["switchable", "search", "merge", "artifacts", "methods.registry", "methods.grid", "methods.hf",
                 "methods.gguf", "methods.imatrix", "methods.llm_compressor", "methods.hqq", "methods.torchao",
                 "methods", "formats", "formats_report", "roofline"]),
    ("studies", ["studies", "studies.baseline", "studies.ptq", "studies.qat", "studies.qlora_bert",
                 "studies.ptq_ladder", "studies.ptq_methods", "studies.gpt2_bitnet", "studies.block_precision",
                 "studies.switchable", "studies.llama_finetune", "studies.llama_scaling", "studies.qwen_merge"]),
    ("top", ["plans", "set_size", "report", "cli", "__main__", ""]),  # "" is the package itself (qlib/__init__.py)
]
RANK = {name: (i, j) for i, (_, mods) in enumerate(LAYERS) for j, name in enumerate(mods)}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _targets(node: ast.ImportFrom | ast.Import, here: str, is_pkg: bool) -> list[str]:
    """The qlib modules an import statement loads (`from qlib.x import y` loads qlib.x.y when y is a module)."""
    if isinstance(node, ast.Import):
        return [a.name.removeprefix("qlib").lstrip(".") for a in node.names if a.name.split(".")[0] == "qlib"]
    if node.level:  # relative import
        base = here.split(".") if is_pkg else here.split(".")[:-1]
        base = base[: len(base) - node.level + 1] if node.level > 1 else base
        module = ".".join([p for p in base if p] + ([node.module] if node.module else []))
    elif node.module and node.module.split(".")[0] == "qlib":
        module = node.module.removeprefix("qlib").lstrip(".")
    else:
        return []
    out = []
    for a in node.names:
        sub = f"{module}.{a.name}" if module else a.name
        out.append(sub if sub in RANK else module)
    return out


def imports() -> list[tuple[str, str, int]]:
    """(importer, imported, line) for every qlib import in qlib, at any depth."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        here = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found += [(here, t, node.lineno) for t in _targets(node, here, path.name == "__init__.py")]
    return found


def test_every_module_has_a_layer():
    mods = {_module_name(p) for p in ROOT.rglob("*.py")}
    assert sorted(mods - set(RANK)) == [], "place each new module in LAYERS (and DESIGN.md)"
    assert sorted(set(RANK) - mods) == [], "LAYERS names a module that no longer exists"


def test_imports_point_down():
    up = [f"qlib.{a or '__init__'} (line {n}, {LAYERS[RANK[a][0]][0]}) imports qlib.{b} ({LAYERS[RANK[b][0]][0]})"
          for a, b, n in imports() if b in RANK and RANK[b] >= RANK[a] and a != b]
    assert up == []


def test_the_ground_floor_imports_nothing_above_it():
    for a, b, _ in imports():
        if RANK[a][0] == 0:
            assert b.startswith("core"), f"qlib.{a} imports qlib.{b}"


@pytest.mark.parametrize("src, bad", [
    ("from qlib.studies import ptq\n", "studies.ptq"),     # a foundation reaching up to a study
    ("def f():\n    from qlib import report\n", "report"),  # hidden inside a function
])
def test_an_upward_import_is_caught(tmp_path, monkeypatch, src, bad):
    """The check itself can fail: the same scan over a foundation module that imports upward reports it."""
    fake = tmp_path / "qlib"
    (fake / "core").mkdir(parents=True)
    (fake / "metrics.py").write_text(src)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    hits = [(a, b) for a, b, _ in imports() if b in RANK and RANK[b] >= RANK[a]]
    assert hits == [("metrics", bad)]


def test_the_summary_reads_results_and_imports_no_study():
    """Studies put what the README shows into their metrics (`results.readme_block`); report only reads them."""
    assert [b for a, b, _ in imports() if a == "report" and b.startswith("studies")] == []
