"""Run names and the metadata JSON beside every artifact a study writes, and detection of how an artifact was made.

A run name is the QLoRA method's `{base}-{dataset}_{task}_{peft}_{METHOD}_w{bits}_head{dtype}`, e.g.
`SmolLM2-135M-stdlib-code_SFT_LoRa16a32-attnmlp_QLORA_w4_headfp32`: task `SFT`/`CLS` (trained in this format) or
`PTQ` (quantized after training), `QA`, peft `full`, `none` (not fine-tuned) or the LoRA recipe's token, an optional
`_merged` / `_dense` suffix for a merged or dequantized copy. The metadata (`qlab.json` inside a folder,
`<file>.qlab.json` beside a file) holds the `quantization` block (method, weights_bits, lm_head_dtype, backend,
extras), the seed, the profile, the qlab version and what the run measured. `detect` reads both and refuses a
name that contradicts its metadata, so a loader rebuilds the right quantization config with no flags.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlib import vocab
from qlib.config import QuantizationPlan, QuantMethod, build_quantization_plan
from qlib.core import __version__
from qlib.core.device import dtype_name
from qlib.core.errors import QlabError
from qlib.core.io import atomic_write_text

META_FILE = "qlab.json"
FILE_SUFFIXES = (".gguf", ".safetensors", ".pt", ".onnx")  # artifacts that are one file (folder names hold dots)
TASKS = ("SFT", "CLS", "PTQ", "QA")  # QA: the seed's second example
PARTS = ("merged", "dense")
_NAME = re.compile(r"^(?P<stem>.+)_(?P<task>[A-Z]+)_(?P<peft>[A-Za-z0-9-]+)_(?P<method>[A-Z0-9]+(?:_[A-Z0-9]+)*)"
                   r"(?:-(?P<variant>[A-Z0-9-]+))?_w(?P<bits>\d+(?:p\d+)?)_head(?P<head>[a-z0-9]+)"
                   r"(?:_(?P<part>merged|dense))?$")
TARGET_PRESETS = ("attention", "attention+mlp")  # LoRA target presets (`adapters.target_modules` per architecture)
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit", "paged_adamw_8bit")  # transformers' names
_PEFT = re.compile(r"^LoRa(?P<r>\d+)a(?P<alpha>\d+)-(?P<targets>attn|attnmlp)(?P<flags>(?:-[a-z0-9]+)*)$")


def _clean(text: str) -> str:
    """A name part: the last path segment, only letters, digits, dots and dashes (`_` separates the fields)."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", str(text).rstrip("/").split("/")[-1]).strip("-") or "x"


def bits_token(bits: float) -> str:
    """4 -> '4', 1.58 -> '1p58', 4.5 -> '4p5' (at most two decimals)."""
    return f"{round(float(bits), 2):g}".replace(".", "p")


def run_name(base: str, dataset: str, task: str, peft: str | None, method: str | QuantMethod, bits: float,
             head_dtype: str, variant: str | None = None, part: str | None = None) -> str:
    """`{base}-{dataset}_{task}_{peft}_{METHOD}[-{variant}]_w{bits}_head{dtype}[_{part}]` for an artifact."""
    m = QuantMethod.parse(method)
    if task not in TASKS:
        raise QlabError(f"unknown run task {task!r}; valid: {', '.join(TASKS)}")
    if part is not None and part not in PARTS:
        raise QlabError(f"unknown artifact part {part!r}; valid: {', '.join(PARTS)}")
    var = f"-{_clean(variant).upper().replace('.', '-')}" if variant else ""
    head = re.sub(r"[^a-z0-9]", "", head_dtype.lower())
    return (f"{_clean(base)}-{_clean(dataset)}_{task}_{_clean(peft or 'full')}_{m.name}{var}_w{bits_token(bits)}"
            f"_head{head}" + (f"_{part}" if part else ""))


def parse_run_name(name: str) -> dict[str, Any] | None:
    """The fields of a run name (None when `name` is not one); the method as its QuantMethod value."""
    m = _NAME.match(name)
    if m is None or m["method"] not in QuantMethod.__members__:
        return None
    out = m.groupdict()
    out["method"] = QuantMethod[m["method"]].value
    out["bits"] = float(m["bits"].replace("p", "."))
    p = _PEFT.match(out["peft"])
    out["lora_r"], out["lora_alpha"] = (int(p["r"]), int(p["alpha"])) if p else (None, None)
    return out


@dataclass(frozen=True)
class LoraKnobs:
    """The LoRA / QLoRA recipe's knobs as a study's parameters set them; each shows in the run name and metadata."""

    r: int = 16
    alpha: int | None = None             # None: 2r
    targets: str = "attention+mlp"       # preset: attention | attention+mlp (`adapters.target_modules`)
    keep_lm_head_fp16: bool = True       # False: bitsandbytes quantizes the LM head too (untied heads only)
    merge_after_train: bool = False      # also save the adapter merged into its (dequantized) base
    gradient_checkpointing: bool = False
    optimizer: str = "adamw_torch"       # one of OPTIMIZERS (`train.make_optimizer`)

    def __post_init__(self) -> None:
        """A study's config builder makes its knobs, so a bad preset or optimizer is one line before anything runs."""
        if self.targets not in TARGET_PRESETS:
            raise QlabError(f"unknown LoRA target preset {self.targets!r}; valid: {', '.join(TARGET_PRESETS)}")
        if self.optimizer not in OPTIMIZERS:
            raise QlabError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")

    @property
    def lora_alpha(self) -> int:
        return self.alpha if self.alpha is not None else 2 * self.r

    def token(self) -> str:
        """The run name's peft field: `LoRa{r}a{alpha}-{attn|attnmlp}` + `-gc`, `-paged8`/`-paged32`, `-headq`."""
        t = {"attention": "attn", "attention+mlp": "attnmlp"}[self.targets]
        flags = (["gc"] if self.gradient_checkpointing else []) + \
            ([f"paged{self.optimizer.split('_')[-1].removesuffix('bit')}"]
             if self.optimizer.startswith("paged") else []) + \
            ([] if self.keep_lm_head_fp16 else ["headq"])
        return "-".join([f"LoRa{self.r}a{self.lora_alpha}-{t}", *flags])

    def extras(self) -> dict[str, Any]:
        return {"lora_r": self.r, "lora_alpha": self.lora_alpha, "target_preset": self.targets,
                "merge_after_train": self.merge_after_train, "keep_lm_head_fp16": self.keep_lm_head_fp16,
                "gradient_checkpointing": self.gradient_checkpointing, "optimizer": self.optimizer}


def head_dtype(model: torch.nn.Module) -> str:
    """What the LM head (or a classifier's head) is stored as: nf4 / int8 when bitsandbytes quantized it, else its
    float dtype (fp32, fp16, bf16)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        head = next((m for n, m in model.named_modules() if n.endswith(("classifier", "score"))
                     and hasattr(m, "weight")), None)
        head = getattr(head, "modules_to_save", {}).get("default", head) if head is not None else None
    if head is None or not hasattr(head, "weight"):
        return "none"
    kind = type(head).__name__
    if kind == "Linear4bit":
        return "nf4"
    if kind == "Linear8bitLt":
        return "int8"
    return dtype_name(head.weight.dtype) if head.weight.dtype.is_floating_point else str(head.weight.dtype)


def meta_path(artifact: str | Path) -> Path:
    """Where an artifact's metadata lives: `qlab.json` inside a folder, `<file>.qlab.json` beside a file."""
    p = Path(artifact)
    is_file = p.is_file() or (not p.exists() and p.suffix in FILE_SUFFIXES)
    return p.with_name(p.name + "." + META_FILE) if is_file else p / META_FILE


def metadata(name: str, plan: QuantizationPlan, *, study: str, profile: str, seed: int, base_model: str,
             base_model_path: str | None, dataset: str, artifact: str, lm_head_dtype: str,
             knobs: LoraKnobs | None = None, weights_bits: float | None = None,
             extras: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The metadata document of one artifact (the quantization block with this run's head dtype, knobs and bits)."""
    q = plan.metadata()["quantization"]
    q["lm_head_dtype"] = lm_head_dtype
    if weights_bits is not None:
        q["weights_bits"] = weights_bits
    q["extras"].update({**(knobs.extras() if knobs else {}), **(extras or {})})
    return {"run_name": name, "artifact": artifact, "quantization": q, "study": study, "profile": profile,
            "seed": seed, "base_model": base_model, "base_model_path": base_model_path, "dataset": dataset,
            "qlab_version": __version__, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}


@dataclass(frozen=True)
class RunInfo:
    """What every artifact of one study run shares in its name and metadata."""

    study: str
    profile: str
    seed: int
    base_model: str
    base_model_path: str | None
    dataset: str

    def name(self, task: str, peft: str | None, method: str, bits: float, head: str, variant: str | None = None,
             part: str | None = None) -> str:
        return run_name(self.base_model, self.dataset, task, peft, method, bits, head, variant, part)

    def meta(self, name: str, method: str | QuantizationPlan, artifact: str, head: str, **kw: Any) -> dict[str, Any]:
        """`metadata` for one artifact of this run (`method`: a method name or a plan built with its options)."""
        plan = method if isinstance(method, QuantizationPlan) else build_quantization_plan(method, "cpu")
        return metadata(name, plan, study=self.study, profile=self.profile, seed=self.seed,
                        base_model=self.base_model, base_model_path=self.base_model_path, dataset=self.dataset,
                        artifact=artifact, lm_head_dtype=head, **kw)


def write_meta(folder_or_file: str | Path, doc: dict[str, Any]) -> Path:
    """Write the metadata next to (a file) or into (a folder, e.g. an `atomic_dir` staging folder) an artifact; the
    tokenizer it goes with (the folder's own if saved already, else its base model's) is fingerprinted into it, so
    `inspect` names a foreign one put beside it later."""
    base = doc.get("base_model_path")
    tok = vocab.fingerprint(folder_or_file) if Path(folder_or_file).is_dir() else None
    tok = tok or (vocab.fingerprint(base) if isinstance(base, str) and Path(base).is_dir() else None)
    doc = {**doc, "tokenizer_sha256": tok} if tok else doc
    return atomic_write_text(meta_path(folder_or_file), json.dumps(doc, indent=2, sort_keys=True, default=str))


def read_meta(artifact: str | Path) -> dict[str, Any] | None:
    """An artifact's metadata, None when it has none; a corrupt file or an unknown method is one clear error."""
    p = meta_path(artifact)
    if not p.is_file():
        return None
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QlabError(f"corrupt metadata {p}: {type(e).__name__}: {e}") from None
    if not isinstance(doc, dict):
        raise QlabError(f"corrupt metadata {p}: a JSON object is expected, got {type(doc).__name__}")
    q = doc.get("quantization")
    if q is None:
        return doc  # notebook 01's model: its config and scores, a full-precision model
    if not isinstance(q, dict) or not isinstance(q.get("method"), str):
        raise QlabError(f"corrupt metadata {p}: the quantization block has no method")
    QuantMethod.parse(q["method"])  # an unknown method is named with the valid ones
    bits = q.get("weights_bits")
    if not isinstance(bits, (int, float)) or isinstance(bits, bool):
        raise QlabError(f"corrupt metadata {p}: quantization.weights_bits must be a number, got {bits!r}")
    if not isinstance(q.get("extras") or {}, dict):
        raise QlabError(f"corrupt metadata {p}: quantization.extras must be a JSON object, got "
                        f"{type(q['extras']).__name__}")
    return doc


@dataclass(frozen=True)
class Detected:
    """How an artifact was made: its method, from its metadata or else its run name, and what else is known."""

    path: Path
    method: str
    source: str                 # "metadata" | "run name" | "config.json" | "nothing (plain model)"
    meta: dict[str, Any] | None
    name: dict[str, Any] | None

    @property
    def part(self) -> str | None:
        """`merged` / `dense` for a full-precision copy made from a quantized run (load it as stored)."""
        said = (self.meta or {}).get("artifact") or (self.name or {}).get("part")
        return said if said in PARTS else None

    @property
    def extras(self) -> dict[str, Any]:
        return ((self.meta or {}).get("quantization") or {}).get("extras") or {}


def detect(artifact: str | Path) -> Detected:
    """The method of an artifact: its metadata first, else its run name, else a bitsandbytes folder's config.json;
    a run name that contradicts the metadata is one clear error."""
    p = Path(artifact)
    meta, name = read_meta(p), parse_run_name(p.name.removesuffix(".gguf"))
    q = (meta or {}).get("quantization")
    if q is not None:
        if name is not None:
            _check_name(p, name, meta)
        return Detected(p, QuantMethod.parse(q["method"]).value, "metadata", meta, name)
    if name is not None:
        return Detected(p, name["method"], "run name", meta, name)
    bnb = saved_bnb_method(p)
    if bnb:
        return Detected(p, bnb, "config.json", meta, None)
    return Detected(p, "gguf" if p.suffix == ".gguf" else "fp32", "nothing (plain model)", meta, None)


def _check_name(p: Path, name: dict[str, Any], meta: dict[str, Any]) -> None:
    """The run name and the metadata must tell the same story: method, bits, head, LoRA rank and alpha."""
    q = meta["quantization"]
    said = {"method": (name["method"], QuantMethod.parse(q["method"]).value),
            "weights_bits": (bits_token(name["bits"]), bits_token(q["weights_bits"])),
            "head": (name["head"], re.sub(r"[^a-z0-9]", "", str(q.get("lm_head_dtype", "")).lower()))}
    ex = q.get("extras") or {}
    if name["lora_r"] is not None and "lora_r" in ex:
        said["lora_r"] = (name["lora_r"], ex["lora_r"])
        said["lora_alpha"] = (name["lora_alpha"], ex.get("lora_alpha"))
    for k, (from_name, from_meta) in said.items():
        if from_name != from_meta:
            raise QlabError(f"{p}: the run name says {k} {from_name!r} but {meta_path(p).name} says {from_meta!r}: "
                            "one of them was edited or belongs to another artifact")


def saved_bnb_method(p: Path) -> str | None:
    """int8 / nf4 for a folder transformers saved quantized (its config.json carries `quantization_config`)."""
    cfg = p / "config.json"
    if not (p.is_dir() and cfg.is_file()):
        return None
    try:
        q = json.loads(cfg.read_text(encoding="utf-8")).get("quantization_config") or {}
    except (ValueError, AttributeError):
        return None
    return "int8" if q.get("load_in_8bit") else "nf4" if q.get("load_in_4bit") else None


def describe(d: Detected) -> list[str]:
    """`inspect`'s lines about the metadata: the run name, the quantization block, seed, profile, version."""
    if d.meta is None or d.meta.get("quantization") is None:
        if d.source != "nothing (plain model)":
            return [f"  method {d.method} from its {d.source} (no qlab metadata beside it)"]
        if d.meta is not None:
            return [f"  {META_FILE} without a quantization block (notebook 01's fine-tune): full precision"]
        return []  # nothing to add: the kind of artifact says what it is
    m, q = d.meta, d.meta["quantization"]
    ex = ", ".join(f"{k}={v}" for k, v in sorted((q.get("extras") or {}).items()))
    return [f"  run {m.get('run_name')} ({m.get('artifact')}; study {m.get('study')}, profile {m.get('profile')}, "
            f"seed {m.get('seed')}, qlab {m.get('qlab_version')})",
            f"  quantization: {q['method']}, {q['weights_bits']} bits, head {q.get('lm_head_dtype')}, backend "
            f"{q.get('backend')}" + (f"; {ex}" if ex else ""),
            f"  base {m.get('base_model')}" + (f" ({m['base_model_path']})" if m.get("base_model_path") else "")
            + f", data {m.get('dataset')}"]
