"""The registry of post-training methods and formats: what `formats` measures, by name.

In the spirit of torchao's `quantize_(model, config)` over a registry and peft's one backend per file: an entry
knows how to write its artifact from an FP16 model folder, which runtime reloads it (and so how it is scored, and
how its stored bits and tensor types are read), whether it needs calibration text, what must be made first, and
which round-to-nearest method on the same grid it is to be compared with. Adding a method is one module that calls
`register`, plus its test (DESIGN.md, "Adding a method").
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qlib import runmeta
from qlib.core.errors import QlabError

RUNTIMES = ("transformers", "llama.cpp")  # transformers artifacts are made and scored first


@dataclass(frozen=True)
class Calibration:
    """Calibration text as token windows, and where it came from (recorded in each artifact's metadata)."""

    source: str
    windows: list[torch.Tensor]

    def record(self) -> dict[str, Any]:
        return {"source": self.source, "samples": len(self.windows),
                "length": int(max((w.numel() for w in self.windows), default=0)),
                "tokens": int(sum(w.numel() for w in self.windows))}


@dataclass
class Job:
    """What a method's writer is given: the FP16 source folder, where to write, the run's naming and metadata,
    the artifacts made so far in this run (by method name), calibration, and products shared within the run."""

    src: Path
    out: Path
    device: torch.device
    info: runmeta.RunInfo
    peft: str = "none"
    keep_lm_head: bool = True
    pre_tokenizer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    made: dict[str, Path] = field(default_factory=dict)
    calibration: Calibration | None = None
    shared: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """One registered post-training method or format."""

    name: str                             # the row's method, lower case: fp16, bnb_nf4, gguf_q4_0, gguf_q4_0_imat
    runtime: str                          # one of RUNTIMES: how the artifact is reloaded and scored
    write: Callable[[Job], Path]          # the artifact (a folder or a file), with its metadata beside it
    needs: tuple[str, ...] = ()           # methods whose artifacts this one starts from (made first)
    control: str | None = None            # round-to-nearest on the same grid: the paired comparison
    calibration: bool = False             # needs calibration text
    about: str = ""
    load: Callable[[Path, torch.device], torch.nn.Module] | None = None  # transformers runtime: None = as stored
    bits: Callable[[Path], float | None] | None = None  # stored bits per quantized weight (None: not quantized)


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method; a name already taken or an unknown runtime is an error (two entries must not share a row)."""
    if method.name in REGISTRY:
        raise QlabError(f"method {method.name!r} is already registered")
    if method.runtime not in RUNTIMES or method.name != method.name.lower():
        raise QlabError(f"method {method.name!r}: runtime must be one of {RUNTIMES} and the name lower case")
    REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    """A registered method; an unknown name is one line listing the valid ones."""
    if name not in REGISTRY:
        raise QlabError(f"unknown format(s) {name}; valid: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def resolve(names: Iterable[str], first: str = "fp16") -> tuple[str, ...]:
    """The methods to make, in order: `first` (the reference), then each asked-for method after what it needs and
    its control, transformers artifacts before llama.cpp ones; unknown names are one line."""
    wanted = [n.strip().lower() for n in names if n.strip()]
    bad = [n for n in wanted if n not in REGISTRY]
    if bad:
        raise QlabError(f"unknown format(s) {', '.join(bad)}; valid: {', '.join(REGISTRY)}")
    order: list[str] = []

    def add(n: str) -> None:
        if n in order:
            return
        m = REGISTRY[n]
        for dep in (*m.needs, *([m.control] if m.control else [])):
            add(dep)
        order.append(n)

    for n in [first, *wanted]:
        add(n)
    rank = {r: i for i, r in enumerate(RUNTIMES)}
    return tuple(sorted(order, key=lambda n: (n != first, rank[REGISTRY[n].runtime])))
