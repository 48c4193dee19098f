"""Memory accounting for training transformers (LLaMA, Qwen2, GPT-2, BERT), without allocating them.

Parameters are counted on a model built on the `meta` device (shapes, no storage), so a real 7B config
costs nothing. Bytes per format follow the storage each library uses (bitsandbytes NF4 + double quant:
4 + 8/64 + 32/(64*256) bits per weight; LLM.int8: 1 byte + one fp32 scale per row; ternary packed base-3:
1.6 bits + one fp32 scale per layer). Activation bytes count the tensors autograd saves for backward in
transformers' layers (sdpa attention): per token and layer `a*h + c*i` elements (+ 2 kv for LLaMA-family
k and v) plus per-token statistics; each family's coefficients were measured with `saved_activation_bytes`
on small real models, and the tests measure them again. Nothing here replaces a library: no library gives
these numbers for a model that is not allocated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qlib.core.errors import QlabError

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
    """The architecture with shapes only (meta tensors): any size, no memory. Encoders get the two-way
    sequence-classification head the BERT studies train; everything else is a causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"):
        if getattr(config, "model_type", "") in ENCODER_TYPES:
            return AutoModelForSequenceClassification.from_config(config)
        return AutoModelForCausalLM.from_config(config)


# Which weights of each family are block linears (what bitsandbytes quantizes and LoRA targets), by name.
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "attn.c_proj", "attention.self.query",
              "attention.self.key", "attention.self.value", "attention.output.dense")
_MLP = ("gate_proj", "up_proj", "down_proj", "c_fc", "mlp.c_proj", "intermediate.dense")


def _kind(name: str) -> str:
    if any(t in name for t in ("embed_tokens", "wte", "wpe", "embeddings.word", "embeddings.position",
                               "embeddings.token_type")):
        return "embedding"
    if any(t in name for t in ("lm_head", "classifier", "pooler")):
        return "lm_head"
    if any(t in name for t in ("norm", "ln_", "LayerNorm")):
        return "norm"
    if any(t in name for t in _ATTENTION):
        return "attention"
    if any(t in name for t in _MLP) or (".output.dense" in name and "attention" not in name):
        return "mlp"
    return "other"


def params_by_kind(model: torch.nn.Module) -> dict[str, int]:
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


def _is_linear(m: torch.nn.Module) -> bool:
    return isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"  # GPT-2's transposed linear


def _block_linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for n, m in model.named_modules() if _is_linear(m) and _kind(n) in ("attention", "mlp")]


def _rows(m: torch.nn.Module) -> int:
    return m.out_features if isinstance(m, torch.nn.Linear) else m.nf  # type: ignore[union-attr]


def weight_bytes(model: torch.nn.Module, fmt: str, rest_elem: int = 2) -> int:
    """Bytes of the weights stored as `fmt`: block linears quantized, embeddings/norms/lm_head at
    `rest_elem` bytes (16 bit as stored; peft's prepare_model_for_kbit_training makes them fp32: 4)."""
    c = params_by_kind(model)
    rest = c["total"] - c["block_linears"]
    if fmt == "fp32":
        return 4 * c["total"]
    if fmt == "fp16":
        return 2 * c["total"]
    if fmt == "int8":
        return c["block_linears"] + 4 * sum(_rows(m) for m in _block_linears(model)) + rest_elem * rest
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


def _lora_wrapped(model: torch.nn.Module, targets: tuple[str, ...]) -> list[tuple[int, int]]:
    """(input width, output rows) of every module peft would wrap: names ending in a target, as peft matches them."""
    return [(m.in_features if isinstance(m, torch.nn.Linear) else m.weight.shape[0], _rows(m))
            for name, m in model.named_modules()
            if _is_linear(m) and any(name == t or name.endswith("." + t) for t in targets)]


def lora_tensor_sizes(model: torch.nn.Module, rank: int, targets: tuple[str, ...]) -> list[int]:
    """Elements of every LoRA A (rank x in) and B (out x rank) matrix peft would add: an optimizer's states are
    kept per tensor."""
    return [n for fan_in, rows in _lora_wrapped(model, targets) for n in (rank * fan_in, rows * rank)]


BNB_MIN_8BIT_SIZE, BNB_STATE_BLOCK = 4096, 256  # bitsandbytes' 8-bit optimizers (their min_8bit_size default)


def optimizer_state_bytes(sizes: list[int], bytes_per_param: float) -> int:
    """AdamW's states for tensors of these sizes. At 2 bytes per parameter (8-bit AdamW) as bitsandbytes keeps
    them: a tensor under 4096 elements keeps fp32 states (8 bytes each), the others one byte per state plus an
    fp32 absmax per block of 256; at a tiny LoRA rank most adapters are under 4096 elements."""
    if bytes_per_param != 2:
        return round(sum(sizes) * bytes_per_param)
    return sum(8 * n if n < BNB_MIN_8BIT_SIZE else 2 * n + 8 * -(-n // BNB_STATE_BLOCK) for n in sizes)


def lora_params_of(model: torch.nn.Module, rank: int, targets: tuple[str, ...]) -> tuple[int, int, int]:
    """Any architecture: LoRA parameters, and per layer the number of wrapped modules and their summed input
    width (for dropout), from the modules peft would wrap (names ending in a target, as peft matches them)."""
    wrapped = _lora_wrapped(model, targets)
    n = sum(rank * (fan_in + rows) for fan_in, rows in wrapped)
    widths = sum(fan_in for fan_in, _ in wrapped)
    layers = max(1, arch(model.config).layers)
    return n, len(wrapped) // layers, widths // layers


@dataclass(frozen=True)
class Arch:
    """The dimensions activation memory depends on, whatever a family calls them."""

    family: str          # llama | gpt2 | bert (Qwen2 and Mistral layers count as llama)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv: int              # width of k (= v): hidden / heads * kv_heads
    vocab: int
    causal: bool


# Per layer and token, the fp32 elements autograd saves: a * hidden + c * intermediate (+ 2 * kv for the
# llama family, whose k and v may be narrower), plus per-token statistics (RMSNorm 2, LayerNorm 4) and an
# attention logsumexp per head. Measured on small models of each family (dropout masks included).
_LAYER = {"llama": (8, 4, 2), "gpt2": (12, 5, 4), "bert": (10, 2, 4)}
ENCODER_TYPES = ("bert", "roberta", "distilbert", "albert", "electra", "xlm-roberta", "mpnet")


def arch(config: Any) -> Arch:
    """The Arch of a transformers config (LLaMA, Qwen2, Mistral, GPT-2, BERT family)."""
    t = getattr(config, "model_type", "")
    if t == "gpt2":
        h = config.n_embd
        return Arch("gpt2", h, config.n_inner or 4 * h, config.n_layer, config.n_head, h, config.vocab_size, True)
    if t in ("llama", "qwen2", "mistral"):
        h, heads = config.hidden_size, config.num_attention_heads
        kv = h // heads * (getattr(config, "num_key_value_heads", None) or heads)
        return Arch("llama", h, config.intermediate_size, config.num_hidden_layers, heads, kv, config.vocab_size, True)
    if t in ENCODER_TYPES:
        h = config.hidden_size
        return Arch("bert", h, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads, h,
                    config.vocab_size, False)
    raise QlabError(f"no memory accounting for model type {t!r}; known: llama, qwen2, mistral, gpt2, "
                    + ", ".join(ENCODER_TYPES))


def activation_bytes(config: Any, batch: int, seq: int, elem: int = 4, checkpointing: bool = False,
                     lora_rank: int = 0, lora_dropout: bool = False, lora_targets: int = len(LORA_TARGETS),
                     lora_in_width: int | None = None) -> dict[str, int]:
    """Bytes autograd holds for backward (and, with checkpointing, the one layer recomputed at a time).

    LLaMA per decoder layer (transformers, sdpa): two RMSNorms keep 3 x (b,s,h) and a (b,s) rsqrt each; q, k,
    v and the attention output (b,s,2h + 2kv) plus a (b,heads,s) logsumexp; the SwiGLU MLP 4 x (b,s,i).
    GPT-2 and BERT (LayerNorm, GELU MLP, dropout) count the same way with their own measured coefficients.
    After the layers: the final norm (3 x (b,s,h)) and, for a causal LM, the fp32 log-softmax the loss keeps
    ((b,s,vocab) x 4 bytes: the loss upcasts even under autocast). LoRA adds (b,s,rank) per target, and with
    dropout each target's dropped input + mask (`lora_in_width`: the targets' summed input width per layer).
    """
    a = arch(config)
    b, s, h, i = batch, seq, a.hidden, a.intermediate
    bs, layers = b * s, a.layers
    ca, ci, stats = _LAYER[a.family]
    width = ca * h + ci * i + (2 * a.kv if a.family == "llama" else 0)
    per_layer = elem * bs * width + 4 * bs * stats + 4 * b * a.heads * s
    if lora_rank:
        per_layer += elem * bs * lora_rank * lora_targets
        if lora_dropout:
            per_layer += (elem + 1) * bs * (lora_in_width if lora_in_width is not None else 6 * h + i)
    rope = 2 * 4 * s * (h // a.heads) if a.family == "llama" else 0
    tail = elem * bs * 3 * h + 4 * bs + (4 * bs * a.vocab if a.causal else 0)
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
    optimizer_bytes: float = 8  # AdamW fp32 states per trainable param (2: bitsandbytes' 8-bit AdamW)
    trainable_elem: int = 4     # LoRA adapters train in fp32; full fine-tune in the weights' dtype
    rest_elem: int = 2          # bytes of the unquantized embeddings/norms/lm_head
                                # (4 after prepare_model_for_kbit_training)
    autocast_copy: bool = False # fp32 weights under fp16 autocast: a cast fp16 copy of every linear weight lives
                                # through the forward (autocast's cache; saved for backward without checkpointing)
    lora_targets: tuple[str, ...] = LORA_TARGETS  # module-name suffixes, as peft matches them
    lora_dropout: bool = False


def recipe(method: str, dtype: torch.dtype, optimizer_bytes: float, rank: int = 16,
           targets: tuple[str, ...] = LORA_TARGETS, lora_dropout: bool = False,
           fp32_master: bool | None = None) -> TrainingSetup:
    """What a method holds when it trains with compute `dtype`.

    full: fp32 master weights autocast to the compute dtype (always under fp16: a GradScaler cannot unscale
    fp16 gradients, and transformers' Trainer does the same with `fp16=True`; qlib's own loop always), or
    bf16 weights under bf16 when `fp32_master` is False (study 07's ladder).
    lora: the frozen base in the compute dtype, fp32 adapters. qlora: an NF4 base whose other weights peft's
    `prepare_model_for_kbit_training` upcasts to fp32, fp32 adapters."""
    elem = torch.finfo(dtype).bits // 8
    if method == "full":
        master = dtype in (torch.float32, torch.float16) or bool(fp32_master)
        return TrainingSetup("full", "fp32" if master else "fp16", elem, 0, optimizer_bytes, 4 if master else 2,
                             4 if master else 2, autocast_copy=master and dtype != torch.float32)
    if method == "qlora":
        return TrainingSetup("qlora", "nf4", elem, rank, optimizer_bytes, 4, 4, lora_targets=targets,
                             lora_dropout=lora_dropout)
    if method == "lora":
        return TrainingSetup("lora", "fp32" if elem == 4 else "fp16", elem, rank, optimizer_bytes, 4, elem,
                             lora_targets=targets, lora_dropout=lora_dropout)
    raise QlabError(f"unknown training method {method!r}; valid: full, lora, qlora")


def training_bytes(config: Any, setup: TrainingSetup, batch: int, seq: int, checkpointing: bool,
                   model: torch.nn.Module | None = None) -> dict[str, int]:
    """Predicted peak bytes of one training step: weights + trainable copies + grads + optimizer + activations."""
    """For a causal LM the loss's backward adds, for a moment, two fp32 (b,s,vocab) gradients beside the
    log-softmax it kept (`loss_backward`): at a 50k-150k vocabulary that is often the largest single term."""
    model = model if model is not None else meta_model(config)
    counts = params_by_kind(model)
    base = weight_bytes(model, setup.weight_format, setup.rest_elem)
    targets, lora_in = 0, None
    if setup.method == "full":
        trainable, extra_weights = counts["total"], 0
    elif setup.method in ("lora", "qlora"):
        trainable, targets, lora_in = lora_params_of(model, setup.lora_rank, setup.lora_targets)
        extra_weights = trainable * setup.trainable_elem
    else:
        raise QlabError(f"unknown training method {setup.method!r}; valid: full, lora, qlora")
    grads = trainable * setup.trainable_elem
    sizes = (lora_tensor_sizes(model, setup.lora_rank, setup.lora_targets) if setup.method != "full"
             else [p.numel() for p in model.parameters()])
    optim = optimizer_state_bytes(sizes, setup.optimizer_bytes)
    a = arch(config)
    act = activation_bytes(config, batch, seq, setup.compute_elem, checkpointing,
                           lora_rank=setup.lora_rank if setup.method != "full" else 0, lora_dropout=setup.lora_dropout,
                           lora_targets=targets, lora_in_width=lora_in)
    copies = 2 * (counts["block_linears"] + counts["lm_head"]) if setup.autocast_copy else 0
    loss_bwd = 8 * batch * seq * a.vocab if a.causal else 0
    parts = {"weights": base, "trainable_weights": extra_weights, "gradients": grads, "optimizer": optim,
             "autocast_copies": copies, "activations": act["total"], "loss_backward": loss_bwd,
             "trainable_params": trainable}
    parts["total"] = base + extra_weights + grads + optim + copies + act["total"] + loss_bwd
    return parts


def saved_activation_bytes(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> int:
    """Measure: bytes of the distinct tensors autograd saves in one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=input_ids, labels=input_ids if labels is None else labels)
    return sum(seen.values())
