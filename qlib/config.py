"""What every study's config stands on: the quantization-method registry (QuantMethod, its QuantSpec, the
bitsandbytes plan), the profiles, and `make_config` (a frozen dataclass per study, a table of profile values,
strict overrides). Run names and metadata: `runmeta`; device, paths, errors: `qlib.core`."""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from qlib.core import dist
from qlib.core.device import compute_dtype, dtype_name, parse_device
from qlib.core.errors import QlabError


class QuantMethod(str, enum.Enum):
    """The compression methods the studies compare (values are the lower-case result names)."""

    FP32 = "fp32"
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
    RTN = "rtn"    # integer weights in groups, rounded to nearest: the control of GPTQ / AWQ / HQQ
    GPTQ = "gptq"
    AWQ = "awq"
    HQQ = "hqq"

    @classmethod
    def parse(cls, value: str | QuantMethod) -> QuantMethod:
        """Accept an enum, its value or its name in any case; name the valid ones otherwise."""
        if isinstance(value, cls):
            return value
        key = str(value).strip()
        for name, m in cls.__members__.items():
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


SPECS: dict[QuantMethod, QuantSpec] = {  # the method registry: what each method does and who runs it
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
    # weight-only integer methods (qlib.methods): bits and group size are the artifact's, the library its extras'
    QuantMethod.RTN: QuantSpec(QuantMethod.RTN, 4, "weight-only", False, None, "fp16",
                               {"rounding": "to nearest, min-max or absmax scale per group"}),
    QuantMethod.GPTQ: QuantSpec(QuantMethod.GPTQ, 4, "weight-only", False, None, "fp16",
                                {"rounding": "column by column, error fed forward through the inverse Hessian"}),
    QuantMethod.AWQ: QuantSpec(QuantMethod.AWQ, 4, "weight-only", False, None, "fp16",
                               {"rounding": "to nearest after activation-aware per-channel scaling"}),
    QuantMethod.HQQ: QuantSpec(QuantMethod.HQQ, 4, "weight-only", False, None, "fp16",
                               {"rounding": "zero point and scale fitted by half-quadratic optimisation, no data"}),
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
                if self.bnb_config.bnb_4bit_quant_storage != torch.uint8:
                    extras["quant_storage"] = dtype_name(self.bnb_config.bnb_4bit_quant_storage)
        return {"quantization": {"method": s.method.value, "weights_bits": s.weights_bits,
                                 "lm_head_dtype": s.lm_head_dtype, "backend": s.backend, "extras": extras}}


def build_quantization_plan(method: str | QuantMethod, device: str | torch.device | None = None,
                            keep_lm_head: bool = True, skip_modules: tuple[str, ...] = (),
                            quant_storage: torch.dtype | None = None) -> QuantizationPlan:
    """Spec + BitsAndBytesConfig for `method`; compute dtype follows the device. bitsandbytes leaves
    `skip_modules` in full precision, and the LM head too unless `keep_lm_head` is False. `quant_storage`: the dtype
    the 4-bit codes are packed in (bitsandbytes' default uint8; FSDP shards only float tensors)."""
    spec = SPECS[QuantMethod.parse(method)]
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
                                     bnb_4bit_quant_storage=quant_storage or torch.uint8,
                                     llm_int8_skip_modules=list(skip))
    return QuantizationPlan(spec, bnb, skip if bnb is not None else ())


def quant_storage_for(device: torch.device, requested: str | None) -> torch.dtype | None:
    """The 4-bit codes' storage dtype: under an FSDP launch the compute dtype (FSDP shards float tensors only,
    and the model's other weights share it), else bitsandbytes' uint8 unless asked otherwise."""
    names = {"uint8": torch.uint8, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if requested is not None and requested not in names:
        raise QlabError(f"quant_storage {requested!r} is not one of {', '.join(names)}")
    if not dist.uses_fsdp():
        return names[requested] if requested else None
    if requested == "uint8":
        raise QlabError("an FSDP launch shards float tensors only: quant_storage uint8 cannot be sharded; leave it "
                        "unset (the compute dtype is used) or launch without FSDP")
    return names[requested] if requested else compute_dtype(device)


# ---------------------------------------------------------------- profiles

PROFILES = ("smoke", "default", "t4", "gpu", "full")
# The `gpu` profile exists only where a study has a random-init path (memory and speed, quality null):
# 02/03 measure CPU INT8 kernels, 06/08 need their pretrained-here models (the default profile runs them on CUDA).
GPU_STUDIES = ("01", "04", "05", "07")
# The `full` profile: the default run with every comparison on the real LM scored on the whole shared evaluation
# set (evalset: 128 windows, 32,640 tokens, 64 modules and articles) instead of its first 16 windows: about 8x the
# scoring, two hours or more on 2 cores, so it is its own run rather than the default's.
FULL_STUDIES = ("05", "06", "08")
PARTIAL_PROFILES = {"gpu": GPU_STUDIES, "full": FULL_STUDIES}  # profiles that cover some notebooks only

C = TypeVar("C")


def parse_params(pairs: list[tuple[str, str]] | list[list[str]]) -> dict[str, Any]:
    """`-p NAME VALUE` pairs, values parsed as YAML scalars like papermill does."""
    import yaml

    return {k: yaml.safe_load(v) for k, v in pairs}


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
    "save_steps", "finetune_steps", "timing_threads", "vocab_size", "roofline_repeats"})
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
    _check_range(name, v)


def _check_range(name: str, v: Any) -> None:
    """The ranges a value of the right type must fall in (by parameter name)."""
    lo = 1 if name in AT_LEAST_1 else 0 if name in AT_LEAST_0 else None
    if lo is not None and v < lo:
        raise QlabError(f"parameter {name} must be at least {lo}, got {v!r}")
    if name == "seed" and v >= 2**32:  # numpy's seeds end there
        raise QlabError(f"parameter seed must be below 2**32, got {v!r}")
    if name == "device" and v != "auto":
        parse_device(v)
    if name in POSITIVE and not v > 0:
        raise QlabError(f"parameter {name} must be greater than 0, got {v!r}")
    if name in FRACTION and not 0 <= v <= 1:
        raise QlabError(f"parameter {name} must be between 0 and 1, got {v!r}")


def _name(cls: type) -> str:
    """'ptq.Config': a study's config class as errors name it (every study calls its class Config)."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def make_config(cls: type[C], table: dict[str, dict[str, Any]], profile: str, **overrides: Any) -> C:
    """Build a study config: profile values from `table`, then papermill-style overrides.

    An override of None keeps the profile's value, so a notebook's parameters cell can leave
    any knob as None; an unknown key is a clear error naming it.
    """
    check_profile(profile)
    if profile not in table:
        covers = PARTIAL_PROFILES.get(profile)
        raise QlabError(f"{_name(cls)} has no {profile!r} profile; it has: {', '.join(table)}"
                        + (f" (the {profile} profile covers notebooks {', '.join(covers)})" if covers else ""))
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise QlabError(f"unknown parameter(s) for {_name(cls)}: {', '.join(unknown)}")
    values = {**table[profile], **{k: _as_tuple(k, v, defaults[k]) for k, v in overrides.items() if v is not None}}
    cfg = cls(profile=profile, **values)  # type: ignore[call-arg]
    check_fields(cfg)
    return cfg
