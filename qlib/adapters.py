"""LoRA / QLoRA through peft + bitsandbytes, every LoRA helper in one place: target presets per architecture, the
classifier and causal-LM set-ups, NF4 classifier plans, saving, and reading an adapter against its base."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qlib import runmeta
from qlib.config import QuantizationPlan, build_quantization_plan
from qlib.core.device import device_map
from qlib.core.errors import QlabError
from qlib.core.io import atomic_dir

ATTENTION = ["query", "key", "value"]
MLP = ["attention.output.dense", "intermediate.dense", "output.dense"]
_LLAMA_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# LoRA target presets per architecture (module-name suffixes, as peft matches them)
TARGET_PRESETS: dict[str, dict[str, list[str]]] = {
    "bert": {"attention": ATTENTION, "attention+mlp": ATTENTION + MLP},
    "gpt2": {"attention": ["c_attn", "attn.c_proj"], "attention+mlp": ["c_attn", "c_proj", "c_fc"]},
    "llama": {"attention": _LLAMA_ATTENTION, "attention+mlp": _LLAMA_ATTENTION + ["gate_proj", "up_proj", "down_proj"]},
}
TARGET_PRESETS["qwen2"] = TARGET_PRESETS["llama"]
CLASSIFIER_SKIP = ("classifier", "pooler.dense")  # stay full precision in an NF4 classifier (trained)


def target_modules(model_type: str, preset: str) -> list[str]:
    """The LoRA targets of a preset (attention | attention+mlp) for an architecture; unknown ones named."""
    family = TARGET_PRESETS.get(model_type)
    if family is None:
        raise QlabError(f"no LoRA target presets for architecture {model_type!r}; known: {', '.join(TARGET_PRESETS)}")
    if preset not in family:
        raise QlabError(f"unknown LoRA target preset {preset!r}; valid: {', '.join(family)}")
    return list(family[preset])


def nf4_classifier_plan(device: torch.device, skip: tuple[str, ...] = CLASSIFIER_SKIP) -> QuantizationPlan:
    """QLoRA's NF4 + double quant for an encoder classifier: every linear but `skip` (no LM head to keep)."""
    return build_quantization_plan("qlora", device, keep_lm_head=False, skip_modules=tuple(skip))


def save_adapter(model: Any, tokenizer: Any, out: str | Path, meta: dict[str, Any],
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """An adapter folder with its tokenizer and its run metadata (`runmeta`), all-or-nothing; `state_dict`: the
    whole model's, gathered (FSDP), for peft to take the adapter from."""
    with atomic_dir(out) as tmp:
        if state_dict is None:
            model.save_pretrained(tmp)
        else:
            save_gathered(model, state_dict, tmp)
        check_saved_adapter(tmp, model)
        tokenizer.save_pretrained(tmp)
        runmeta.write_meta(tmp, meta)
    return Path(out)


def save_gathered(model: Any, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
    """The LoRA tensors gathered from FSDP's shards, written as peft writes an adapter (keys without the adapter's
    name, its config in inference mode). Not peft's save_pretrained: peft 0.21 finds the adapter's keys from the
    model's module names, and FSDP's nested units rename them (it strips only a leading `_fsdp_wrapped_module.`), so
    it wrote an empty file (the H200 run and tests/test_data_parallel.py found it)."""
    import copy

    from safetensors.torch import save_file

    name = model.active_adapter
    tensors = {k.replace(f".{name}.", "."): v.detach().cpu().contiguous() for k, v in state_dict.items()
               if ".lora_A." in k or ".lora_B." in k}
    save_file(tensors, str(Path(folder) / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = copy.copy(model.peft_config[name])
    config.inference_mode = True
    config.save_pretrained(str(folder))


def check_saved_adapter(folder: Path, model: Any) -> None:
    """An adapter file must hold a tensor for every LoRA matrix the model has (a sharded model saved without
    gathering gives an empty file, which loads without complaint as an untrained adapter)."""
    from safetensors import safe_open

    def lora(names: Any) -> int:  # the adapter's own matrices (a classifier head saved beside them is not one)
        return sum(1 for n in names if ".lora_A." in n or ".lora_B." in n)

    expected = lora(n for n, _ in model.named_parameters())
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        saved = lora(f.keys())
    if expected and saved != expected:
        raise QlabError(f"the adapter came out with {saved} of its {expected} LoRA tensors (sharded weights saved "
                        "without gathering them?); nothing was written")


def load_nf4_classifier(path: str | Path, num_labels: int, device: torch.device,
                        skip: tuple[str, ...] = CLASSIFIER_SKIP) -> torch.nn.Module:
    """The encoder with every linear but `skip` (the new head, the pooler) in NF4 + double quant (bitsandbytes)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    # the fresh head and the pooler train in full precision: sentence-embedding encoders (MiniLM) were
    # trained with mean pooling, so their frozen CLS pooler gives a new head almost nothing to learn from
    bnb = nf4_classifier_plan(device, skip).bnb_config
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "classifier newly initialised" is expected
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, quantization_config=bnb, dtype=torch.float32,
            device_map=device_map(device))
    finally:
        logging.set_verbosity(verbosity)


def add_causal_lora(model: torch.nn.Module, rank: int, kbit: bool, targets: list[str] | str | None = None,
                    gradient_checkpointing: bool = False, alpha: int | None = None, dropout: float = 0.05,
                    sharded: bool = False) -> Any:
    """The QLoRA recipe's LoRA (alpha default 2r, dropout default 0.05; targets: a preset name or module names,
    default every projection of the architecture); `kbit` prepares a 4-/8-bit base first (peft upcasts what is not
    quantized to fp32). `sharded` (FSDP-QLoRA): no upcast, since an FSDP unit holds one dtype, and re-entrant
    checkpointing, as answer.ai and peft's FSDP-QLoRA recipe run it."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    ckpt = {"use_reentrant": sharded}
    if kbit and not sharded:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs=ckpt)
    elif gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt)
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
    if targets is None or isinstance(targets, str):
        targets = target_modules(model.config.model_type, targets or "attention+mlp")
    # bnb layers, BitLinear and QuantLinear are nn.Linear-shaped; GPT-2's own Conv1D stores the weight transposed
    cfg = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, task_type="CAUSAL_LM",
                     target_modules=list(targets), fan_in_fan_out=_conv1d_targets(model, targets))
    return get_peft_model(model, cfg)


def _conv1d_targets(model: torch.nn.Module, targets: Any) -> bool:
    """Whether the targeted layers are GPT-2's Conv1D (weight stored in x out): LoRA must know, else peft fixes it
    with a warning per model."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for n, m in model.named_modules() if any(n.endswith(t) for t in targets))


def add_lora(model: torch.nn.Module, rank: int, targets: str = "attention", alpha: int | None = None,
             dropout: float = 0.1, gradient_checkpointing: bool = False) -> Any:
    """prepare_model_for_kbit_training + LoRA (alpha default 2r) on a target preset of the encoder's projections."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, task_type="SEQ_CLS",
                     target_modules=target_modules("bert", targets), modules_to_save=["pooler"])
    return get_peft_model(model, cfg)


def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """An adapter folder's config and the shape of every tensor it stores; a missing or corrupt file is one clear
    error."""
    from safetensors import safe_open

    d = Path(adapter_dir)
    cfg_path, weights = d / "adapter_config.json", d / "adapter_model.safetensors"
    for f in (cfg_path, weights):
        if not f.is_file():
            raise QlabError(f"adapter folder {d} is incomplete: {f.name} is missing")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        with safe_open(weights, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise QlabError(f"corrupt adapter in {d}: {type(e).__name__}: {e}") from None
    _check_adapter_config(cfg_path, cfg)
    return cfg, shapes


def _check_adapter_config(path: Path, cfg: Any) -> None:
    """The adapter_config.json fields qlab reads have the types peft writes (a hand-edited file is one line)."""
    if not isinstance(cfg, dict):
        raise QlabError(f"corrupt {path}: a JSON object is expected, got {type(cfg).__name__}")
    targets = cfg.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise QlabError(f"corrupt {path}: target_modules must be a list of module names (or a regex), got {targets!r}")
    for key, kind in (("r", int), ("lora_alpha", (int, float))):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, kind) or v <= 0):
            raise QlabError(f"corrupt {path}: {key} must be a positive number, got {v!r}")
    for key in ("base_model_name_or_path", "task_type"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            raise QlabError(f"corrupt {path}: {key} must be a string, got {cfg[key]!r}")


def check_adapter(base: torch.nn.Module, adapter_dir: str | Path) -> dict[str, Any]:
    """Refuse an adapter made for another base: name the first missing layer or mismatched shape."""
    cfg, shapes = read_adapter(adapter_dir)
    match_adapter(base, shapes)
    return cfg


def match_adapter(base: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every tensor of an adapter (`read_adapter`'s shapes) lands on a layer of `base` with the right shape."""
    modules = dict(base.named_modules())
    for key, shape in shapes.items():
        name = key.replace("base_model.model.", "", 1).rsplit(".", 1)[0]
        for tag in (".lora_A", ".lora_B", ".modules_to_save"):
            name = name.split(tag)[0]
        mod = modules.get(name)
        if mod is None:
            n_layers = getattr(getattr(base, "config", None), "num_hidden_layers", "?")
            raise QlabError(f"adapter/base mismatch: adapter has weights for {name!r}, which the base "
                            f"does not have (base has {n_layers} layers)")
        if ".lora_A." in key or ".lora_B." in key:
            _check_lora_shape(name, mod, key, shape)
            continue
        attr = key.rsplit(".", 1)[1]  # a fully saved module (modules_to_save, e.g. the head)
        param = getattr(mod, attr, None)
        if param is not None and tuple(param.shape) != shape:
            what = " (number of labels differs)" if "classifier" in name or "score" in name else ""
            raise QlabError(f"adapter/base mismatch at {name}.{attr}: adapter has shape {shape}, "
                            f"base has {tuple(param.shape)}{what}; "
                            f"base num_labels={getattr(base.config, 'num_labels', '?')}")


def _check_lora_shape(name: str, mod: torch.nn.Module, key: str, shape: tuple[int, ...]) -> None:
    in_f, out_f = getattr(mod, "in_features", None), getattr(mod, "out_features", None)
    if ".lora_A." in key and in_f is not None and shape[1] != in_f:
        raise QlabError(f"adapter/base mismatch at {name}: adapter expects input size {shape[1]}, "
                        f"base layer has {in_f} (hidden size differs)")
    if ".lora_B." in key and out_f is not None and shape[0] != out_f:
        raise QlabError(f"adapter/base mismatch at {name}: adapter outputs {shape[0]}, base layer has {out_f}")


def load_adapter(base: torch.nn.Module, adapter_dir: str | Path) -> Any:
    """Plain `peft.PeftModel.from_pretrained`, after checking the adapter fits this base."""
    from peft import PeftModel

    check_adapter(base, adapter_dir)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()
