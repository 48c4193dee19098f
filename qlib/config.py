"""Configs every study shares: quantization methods and plans, profiles, paths, device (run names and the
metadata beside each artifact: `runmeta`)."""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, TypeVar

import torch


class QlabError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""


class QuantMethod(str, enum.Enum):
    """The compression methods the studies compare (values are the lower-case result names)."""

    FP32 = "fp32"
    NONE = "fp32"  # alias: no quantization
    FP16 = "fp16"
    INT8 = "int8"
    NF4 = "nf4"
    QLORA = "qlora"
    BITNET = "bitnet"
    QLORA_BITNET = "qlora_bitnet"
    PTQ_INT8 = "ptq_int8"
    QAT_INT8 = "qat_int8"
    SWITCHABLE = "switchable"
    GGUF = "gguf"  # a llama.cpp file: its tensor types say the rest

    @classmethod
    def parse(cls, value: str | QuantMethod) -> QuantMethod:
        """Accept an enum, its value or its name in any case; name the valid ones otherwise."""
        if isinstance(value, cls):
            return value
        key = str(value).strip()
        for name, m in cls.__members__.items():  # includes the NONE alias
            if key.lower() in (m.value, name.lower()):
                return m
        valid = ", ".join(sorted({m.value for m in cls}))
        raise QlabError(f"unknown quantization method {value!r}; valid: {valid}")


@dataclass(frozen=True)
class QuantSpec:
    """What a method does to the weights: bits, where it runs, whether the base trains."""

    method: QuantMethod
    weights_bits: float
    backend: str
    base_trainable: bool
    peft: str | None
    lm_head_dtype: str
    extras: dict[str, Any] = field(default_factory=dict)


_SPECS: dict[QuantMethod, QuantSpec] = {
    QuantMethod.FP32: QuantSpec(QuantMethod.FP32, 32, "torch", True, None, "fp32"),
    QuantMethod.FP16: QuantSpec(QuantMethod.FP16, 16, "torch", True, None, "fp16"),
    QuantMethod.INT8: QuantSpec(QuantMethod.INT8, 8, "bitsandbytes", False, None, "fp32",
                                {"llm_int8_threshold": 6.0}),
    QuantMethod.NF4: QuantSpec(QuantMethod.NF4, 4, "bitsandbytes", False, None, "fp32",
                               {"base_quant_type": "nf4", "double_quant": False}),
    QuantMethod.QLORA: QuantSpec(QuantMethod.QLORA, 4, "bitsandbytes", False, "lora", "fp32",
                                 {"base_quant_type": "nf4", "double_quant": True}),
    QuantMethod.BITNET: QuantSpec(QuantMethod.BITNET, 1.58, "qlib.quant.bitnet", True, None, "fp32",
                                  {"weights": "absmean ternary", "activations": "absmax int8"}),
    QuantMethod.QLORA_BITNET: QuantSpec(QuantMethod.QLORA_BITNET, 1.58, "qlib.quant.bitnet", False,
                                        "lora", "fp32", {"weights": "absmean ternary, frozen"}),
    QuantMethod.PTQ_INT8: QuantSpec(QuantMethod.PTQ_INT8, 8, "torch.ao", False, None, "fp32",
                                    {"calibration": "representative batches"}),
    QuantMethod.QAT_INT8: QuantSpec(QuantMethod.QAT_INT8, 8, "torch.ao", True, None, "fp32",
                                    {"fake_quant": "observers + STE"}),
    QuantMethod.SWITCHABLE: QuantSpec(QuantMethod.SWITCHABLE, 8, "qlib.quant.uniform", False,
                                      "lora-per-bit", "fp32", {"bit_widths": [2, 4, 8]}),
    QuantMethod.GGUF: QuantSpec(QuantMethod.GGUF, 16, "llama.cpp", False, None, "f16"),  # bits: the file's type
}


@dataclass(frozen=True)
class QuantizationPlan:
    """A method's spec plus the transformers `BitsAndBytesConfig` when bitsandbytes loads it."""

    spec: QuantSpec
    bnb_config: Any | None  # transformers.BitsAndBytesConfig
    skip_modules: tuple[str, ...] = ()  # left in full precision by bitsandbytes (the LM head unless asked)

    def metadata(self) -> dict[str, Any]:
        """The `quantization` block of the run metadata JSON (the QLoRA method's keys)."""
        s, extras = self.spec, dict(self.spec.extras)
        if self.bnb_config is not None:
            extras["skip_modules"] = list(self.skip_modules)
            if self.bnb_config.load_in_4bit:
                extras["compute_dtype"] = dtype_name(self.bnb_config.bnb_4bit_compute_dtype)
        return {"quantization": {"method": s.method.value, "weights_bits": s.weights_bits,
                                 "lm_head_dtype": s.lm_head_dtype, "backend": s.backend, "extras": extras}}


_FORCED_CUDA_DTYPE: list[torch.dtype] = []  # set by `t4_conditions` to act like a T4 on a newer GPU
_MEMORY_FRACTION: list[float] = []          # the allocator cap `t4_conditions` set, if any


def memory_fraction() -> float:
    """The share of the GPU this process may allocate (1.0 unless `t4_conditions` capped it)."""
    return _MEMORY_FRACTION[-1] if _MEMORY_FRACTION else 1.0


def compute_dtype_name(device: str | torch.device | None = None) -> str:
    """The compute dtype as rows record it: float32, bfloat16 or float16."""
    return str(compute_dtype(device)).removeprefix("torch.")


def compute_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """fp32 on CPU (bf16 is 4-6x slower on AVX2); on CUDA bf16 from compute capability 8.0 (Ampere) up, else
    fp16 (a T4 is 7.5). `torch.cuda.is_bf16_supported()` is not the test: by default it counts emulation and
    says True on a T4, where bf16 runs emulated and slow."""
    dev = torch.device(device) if device is not None else pick_device()
    if dev.type != "cuda":
        return torch.float32
    if _FORCED_CUDA_DTYPE:
        return _FORCED_CUDA_DTYPE[-1]
    major, _ = torch.cuda.get_device_capability(dev)
    return torch.bfloat16 if major >= 8 else torch.float16


@contextlib.contextmanager
def t4_conditions(device: str | torch.device, memory_gib: float = 15.0) -> Iterator[float]:
    """On a bigger GPU, behave like a 16 GB T4: fp16 compute and the allocator capped at `memory_gib`
    (`torch.cuda.set_per_process_memory_fraction`); yields the fraction. CUDA only: a clear error elsewhere."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise QlabError(f"the T4 memory cap is a CUDA-only option (it caps the GPU allocator); this run is on {dev.type}")
    total = torch.cuda.get_device_properties(dev).total_memory
    fraction = min(1.0, memory_gib * 2**30 / total)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(fraction, dev)
    _FORCED_CUDA_DTYPE.append(torch.float16)
    _MEMORY_FRACTION.append(fraction)
    try:
        yield fraction
    finally:
        _FORCED_CUDA_DTYPE.pop()
        _MEMORY_FRACTION.pop()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, dev)


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bf16' (the short names run names and metadata use)."""
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def build_quantization_plan(method: str | QuantMethod, device: str | torch.device | None = None,
                            keep_lm_head: bool = True, skip_modules: tuple[str, ...] = ()) -> QuantizationPlan:
    """Spec + BitsAndBytesConfig for `method`; compute dtype follows the device. bitsandbytes leaves
    `skip_modules` in full precision, and the LM head too unless `keep_lm_head` is False."""
    spec = _SPECS[QuantMethod.parse(method)]
    bnb, skip = None, tuple(skip_modules) + (("lm_head",) if keep_lm_head else ())
    if spec.backend == "bitsandbytes":
        from transformers import BitsAndBytesConfig

        if spec.weights_bits == 8:
            bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=spec.extras["llm_int8_threshold"],
                                     llm_int8_skip_modules=list(skip))
        else:
            bnb = BitsAndBytesConfig(load_in_4bit=True,
                                     bnb_4bit_quant_type=spec.extras["base_quant_type"],
                                     bnb_4bit_use_double_quant=spec.extras["double_quant"],
                                     bnb_4bit_compute_dtype=compute_dtype(device),
                                     llm_int8_skip_modules=list(skip))
    return QuantizationPlan(spec, bnb, skip if bnb is not None else ())


# ---------------------------------------------------------------- device and paths

def pick_device(prefer: str = "auto", profile: str | None = None) -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' on a CPU machine is a clear error, and so is the `gpu`
    profile left on 'auto' there (its full sizes would run for hours on a CPU; device='cpu' rehearses it)."""
    if prefer == "auto":
        if profile == "gpu" and not torch.cuda.is_available():
            raise QlabError("the gpu profile measures a CUDA GPU and none is visible on this machine; "
                            "to rehearse it on the CPU, pass device=cpu and small sizes (tests/test_gpu_profile.py)")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(prefer)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QlabError("device 'cuda' was asked for but no CUDA GPU is visible on this machine")
    return dev


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
    import shutil

    if (study, profile) in _STAGING:  # already staged by an outer call
        yield {k: (v, v) for k, v in _STAGING[(study, profile)].items()}
        return
    finals = {"results": results_dir(study, profile), "outputs": outputs_dir(study, profile)}
    stages = {k: p.with_name(f".{p.name}.staging") for k, p in finals.items()}
    for d in stages.values():
        shutil.rmtree(d, ignore_errors=True)  # what a killed run left
        d.mkdir(parents=True)
    _STAGING[(study, profile)] = stages
    try:
        yield {k: (stages[k], finals[k]) for k in finals}
    except BaseException:
        for d in stages.values():
            shutil.rmtree(d, ignore_errors=True)
        raise
    finally:
        _STAGING.pop((study, profile), None)
    olds = {k: p.with_name(f".{p.name}.old") for k, p in finals.items()}
    for k, final in finals.items():
        shutil.rmtree(olds[k], ignore_errors=True)
        if final.exists():
            os.replace(final, olds[k])
        os.replace(stages[k], final)
    for old in olds.values():
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- profiles

PROFILES = ("smoke", "default", "t4", "gpu")
# The `gpu` profile exists only where a study has a random-init path (memory and speed, quality null):
# 02/03 measure CPU INT8 kernels, 06/08 need their pretrained-here models (the default profile runs them on CUDA).
GPU_STUDIES = ("01", "04", "05", "07")

C = TypeVar("C")


def check_profile(profile: str) -> str:
    """Return the profile name, or a clear error listing the valid ones."""
    if profile not in PROFILES:
        raise QlabError(f"unknown profile {profile!r}; valid: {', '.join(PROFILES)}")
    return profile


def _as_tuple(name: str, value: Any, default: Any) -> Any:
    """A tuple-valued knob as papermill or the CLI passes it: a list, or one comma-separated string
    (`-p rungs llama-60m,llama-7b`); elements become ints where the default's are."""
    if not isinstance(default, tuple) or not isinstance(value, (list, tuple, str)):
        return value
    items = [x.strip() for x in value.split(",") if x.strip()] if isinstance(value, str) else list(value)
    if not (default and isinstance(default[0], int)):
        return tuple(items)
    try:
        return tuple(int(x) for x in items)
    except (TypeError, ValueError):
        raise QlabError(f"parameter {name} must be a list of integers, got {value!r}") from None


# Ranges of the knobs several studies share, by name; any other field is checked for its annotated type only.
AT_LEAST_1 = frozenset({
    "steps", "batch_size", "batch", "n_seeds", "latency_repeats", "lora_rank", "main_rank", "ranks", "context",
    "stride", "max_length", "max_len", "seq", "seq_len", "projection_seq", "gen_tokens", "n_calib",
    "max_new_tokens", "bench_steps", "calib_sentences", "n_train", "n_eval", "train_tokens", "eval_tokens",
    "ladder_context", "ladder_eval_tokens", "block_context", "block_calib_tokens", "block_eval_tokens",
    "save_steps", "finetune_steps", "timing_threads", "vocab_size"})
AT_LEAST_0 = frozenset({"seed", "block_qa_questions", "low_bits"})
POSITIVE = frozenset({"epochs", "lr", "bitnet_lr", "lora_lr", "kd_temperature"})
FRACTION = frozenset({"budget", "block_budget", "weight_decay", "warmup_ratio"})
_KINDS = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}


def check_fields(cfg: Any) -> None:
    """Every field of a study config has its annotated type and, for the shared knobs, a sane range: the
    library refuses what the command line refuses (e.g. `epochs -1`, `lr abc`, `budget nan`)."""
    import typing

    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        _check_value(f.name, getattr(cfg, f.name), hints[f.name])


def _check_value(name: str, v: Any, hint: Any) -> None:
    import math
    import typing

    args = typing.get_args(hint)
    if type(None) in args:
        if v is None:
            return
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is tuple:
        if not isinstance(v, tuple) or not v:
            raise QlabError(f"parameter {name} must be a non-empty list, got {v!r}")
        for x in v:
            _check_value(name, x, typing.get_args(hint)[0])
        return
    ok = {int: isinstance(v, int) and not isinstance(v, bool),
          float: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          bool: isinstance(v, bool), str: isinstance(v, str)}.get(hint, True)
    if not ok:
        raise QlabError(f"parameter {name} must be {_KINDS[hint]}, got {v!r}")
    lo = 1 if name in AT_LEAST_1 else 0 if name in AT_LEAST_0 else None
    if lo is not None and v < lo:
        raise QlabError(f"parameter {name} must be at least {lo}, got {v!r}")
    if name in POSITIVE and not v > 0:
        raise QlabError(f"parameter {name} must be greater than 0, got {v!r}")
    if name in FRACTION and not 0 <= v <= 1:
        raise QlabError(f"parameter {name} must be between 0 and 1, got {v!r}")


def make_config(cls: type[C], table: dict[str, dict[str, Any]], profile: str, **overrides: Any) -> C:
    """Build a study config: profile values from `table`, then papermill-style overrides.

    An override of None keeps the profile's value, so a notebook's parameters cell can leave
    any knob as None; an unknown key is a clear error naming it.
    """
    check_profile(profile)
    if profile not in table:
        raise QlabError(f"{cls.__name__} has no {profile!r} profile; it has: {', '.join(table)}"
                        + (f" (the gpu profile covers notebooks {', '.join(GPU_STUDIES)})" if profile == "gpu" else ""))
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise QlabError(f"unknown parameter(s) for {cls.__name__}: {', '.join(unknown)}")
    values = {**table[profile], **{k: _as_tuple(k, v, defaults[k]) for k, v in overrides.items() if v is not None}}
    cfg = cls(profile=profile, **values)  # type: ignore[call-arg]
    check_fields(cfg)
    return cfg


@dataclass(frozen=True)
class BaselineConfig:
    """Notebook 01: full-precision fine-tune of the BERT-family encoder (one field per parameter)."""

    profile: str = "default"
    seed: int = 0
    model_id: str = "minilm"          # registry key or hub id
    dataset_id: str = "mr-polarity"   # registry key or hub id
    max_length: int = 64
    n_train: int | None = None        # None: the whole training split
    n_eval: int | None = None
    epochs: float = 2.0
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    n_seeds: int = 3                  # fine-tunes from seeds seed, seed+1, ...: accuracy mean ± sd (04 compares)
    latency_repeats: int = 30
    device: str = "auto"
    random_init: bool = False         # `gpu` profile: true architecture, random weights


BASELINE_PROFILES: dict[str, dict[str, Any]] = {
    "smoke": dict(n_train=64, n_eval=64, epochs=1, batch_size=16, max_length=32,
                  latency_repeats=3, n_seeds=2),
    "default": dict(),
    "t4": dict(model_id="bert-base-uncased", dataset_id="sst2", max_length=128, epochs=3,
               lr=2e-5),
    "gpu": dict(model_id="bert-base-uncased", random_init=True, max_length=128, epochs=1,
                n_train=2048, n_eval=512, latency_repeats=50),
}


def baseline_config(profile: str = "default", **overrides: Any) -> BaselineConfig:
    """The notebook-01 config for a profile, with overrides."""
    return make_config(BaselineConfig, BASELINE_PROFILES, profile, **overrides)
