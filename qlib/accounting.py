"""Exact memory accounting for LLaMA-architecture models, without allocating them.

Parameters are counted on a model built on the `meta` device (shapes, no storage), so a real 7B config
costs nothing. Bytes per format follow the storage each library uses (bitsandbytes NF4 + double quant:
4 + 8/64 + 32/(64*256) bits per weight; LLM.int8: 1 byte + one fp32 scale per row; ternary packed base-3:
1.6 bits + one fp32 scale per layer). Activation bytes count the tensors autograd saves for backward in transformers' LLaMA layer
(sdpa attention); `saved_activation_bytes` measures the same thing on a real model, for the tests.
Nothing here replaces a library: no library gives these numbers for a model that is not allocated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qlib.config import QlabError

LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                tie_word_embeddings=False)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_DQ_BITS = 4 + 8 / 64 + 32 / (64 * 256)   # codes + 8-bit absmax per 64 + fp32 per 256 absmax
TERNARY_BITS = 8 / 5                          # 5 trits per byte (qlib.quant.bitnet packing)
FORMATS = ("fp32", "fp16", "int8", "nf4", "ternary")


def llama_config(**overrides: Any) -> Any:
    """A transformers LlamaConfig: LLaMA-7B's shape unless overridden."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**LLAMA_7B, **overrides})


def meta_model(config: Any) -> torch.nn.Module:
    """The architecture with shapes only (meta tensors): any size, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _kind(name: str) -> str:
    if "embed_tokens" in name:
        return "embedding"
    if "lm_head" in name:
        return "lm_head"
    if "norm" in name:
        return "norm"
    if any(t in name for t in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return "attention"
    if any(t in name for t in ("gate_proj", "up_proj", "down_proj")):
        return "mlp"
    return "other"


def param_counts(model: torch.nn.Module) -> dict[str, int]:
    """Total parameters and per kind (embedding, attention, mlp, norm, lm_head); tied weights once."""
    counts = {"embedding": 0, "attention": 0, "mlp": 0, "norm": 0, "lm_head": 0, "other": 0}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        counts[_kind(name)] += p.numel()
    counts["total"] = sum(counts.values())
    counts["block_linears"] = counts["attention"] + counts["mlp"]
    return counts


def _block_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and _kind(n) in ("attention", "mlp")]


def weight_bytes(model: torch.nn.Module, fmt: str, rest_elem: int = 2) -> int:
    """Bytes of the weights stored as `fmt`: block linears quantized, embeddings/norms/lm_head at
    `rest_elem` bytes (16 bit as stored; peft's prepare_model_for_kbit_training makes them fp32: 4)."""
    c = param_counts(model)
    rest = c["total"] - c["block_linears"]
    if fmt == "fp32":
        return 4 * c["total"]
    if fmt == "fp16":
        return 2 * c["total"]
    if fmt == "int8":
        return c["block_linears"] + 4 * sum(m.out_features for m in _block_linears(model)) + rest_elem * rest
    if fmt == "nf4":
        return round(c["block_linears"] * NF4_DQ_BITS / 8) + rest_elem * rest
    if fmt == "ternary":
        return round(c["block_linears"] * TERNARY_BITS / 8) + 4 * len(_block_linears(model)) + rest_elem * rest
    raise QlabError(f"unknown weight format {fmt!r}; valid: {', '.join(FORMATS)}")


def lora_params(config: Any, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """Trainable LoRA parameters: rank x (in + out) for each target projection of every layer."""
    h, i = config.hidden_size, config.intermediate_size
    kv = h * config.num_key_value_heads // config.num_attention_heads
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    unknown = set(targets) - set(shapes)
    if unknown:
        raise QlabError(f"unknown LoRA target(s) {sorted(unknown)}; valid: {', '.join(shapes)}")
    return config.num_hidden_layers * sum(rank * sum(shapes[t]) for t in targets)


def activation_bytes(config: Any, batch: int, seq: int, elem: int = 4, checkpointing: bool = False,
                     lora_rank: int = 0, lora_dropout: bool = False) -> dict[str, int]:
    """Bytes autograd holds for backward (and, with checkpointing, the one layer recomputed at a time).

    Per decoder layer (counted from transformers' LLaMA with sdpa): two RMSNorms keep 3 x (b,s,h) and a
    (b,s) rsqrt each; q, k, v and the attention output 4 x (b,s,h) plus a (b,heads,s) logsumexp; the
    SwiGLU MLP 4 x (b,s,intermediate). After the layers: the final norm (3 x (b,s,h)) and the logits
    (b,s,vocab). LoRA adds (b,s,rank) per target, and with dropout each target's dropped input + mask.
    """
    b, s, h, i = batch, seq, config.hidden_size, config.intermediate_size
    bs, layers = b * s, config.num_hidden_layers
    per_layer = elem * bs * (10 * h + 4 * i) + 4 * bs * 2 + 4 * b * config.num_attention_heads * s
    if lora_rank:
        per_layer += elem * bs * lora_rank * len(LORA_TARGETS)
        if lora_dropout:
            per_layer += (elem + 1) * bs * (6 * h + i)  # q/k/v/o/gate/up see width h, down sees i
    head_dim = h // config.num_attention_heads
    rope = 2 * 4 * s * head_dim
    tail = elem * bs * 3 * h + 4 * bs + elem * bs * config.vocab_size
    if checkpointing:
        saved = layers * elem * bs * h + tail + rope
        return {"saved": saved, "recompute_peak": per_layer, "total": saved + per_layer}
    saved = layers * per_layer + tail + rope
    return {"saved": saved, "recompute_peak": 0, "total": saved}


@dataclass(frozen=True)
class TrainingSetup:
    """One fine-tuning method's memory-relevant choices."""

    method: str                 # full | lora | qlora
    weight_format: str          # fp32 | fp16 | nf4 (base weights as stored)
    compute_elem: int           # bytes per activation element (4 fp32, 2 fp16/bf16)
    lora_rank: int = 16
    optimizer_bytes: float = 8  # AdamW fp32 states per trainable param (8-bit AdamW: 2)
    trainable_elem: int = 4     # LoRA adapters train in fp32; full fine-tune in the weights' dtype
    rest_elem: int = 2          # bytes of the unquantized embeddings/norms/lm_head (4 after prepare_model_for_kbit_training)


def training_bytes(config: Any, setup: TrainingSetup, batch: int, seq: int, checkpointing: bool,
                   model: torch.nn.Module | None = None) -> dict[str, int]:
    """Predicted peak bytes of one training step: weights + trainable copies + grads + optimizer + activations."""
    model = model if model is not None else meta_model(config)
    base = weight_bytes(model, setup.weight_format, setup.rest_elem)
    if setup.method == "full":
        trainable, extra_weights = param_counts(model)["total"], 0
    elif setup.method in ("lora", "qlora"):
        trainable = lora_params(config, setup.lora_rank)
        extra_weights = trainable * setup.trainable_elem
    else:
        raise QlabError(f"unknown training method {setup.method!r}; valid: full, lora, qlora")
    grads = trainable * setup.trainable_elem
    optim = round(trainable * setup.optimizer_bytes)
    act = activation_bytes(config, batch, seq, setup.compute_elem, checkpointing,
                           lora_rank=setup.lora_rank if setup.method != "full" else 0)
    parts = {"weights": base, "trainable_weights": extra_weights, "gradients": grads, "optimizer": optim,
             "activations": act["total"], "trainable_params": trainable}
    parts["total"] = base + extra_weights + grads + optim + act["total"]
    return parts


def saved_activation_bytes(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    """Measure: bytes of the distinct tensors autograd saves in one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=input_ids, labels=input_ids)
    return sum(seen.values())
