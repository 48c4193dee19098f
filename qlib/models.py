"""Build, save and load the studies' models: safetensors only, atomic folders, clear errors."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from qlib import quant, vocab
from qlib.assets import Resolved, minilm_dir
from qlib.config import build_quantization_plan
from qlib.core import dist
from qlib.core.device import compute_dtype, device_map
from qlib.core.errors import QlabError
from qlib.core.io import atomic_dir

# The true bert-base architecture, for the `gpu` profile's random-init rows (no weights travel).
BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)


def load_tokenizer(asset: Resolved) -> Any:
    """The asset's tokenizer (random-init rows use the packaged MiniLM one: the BERT uncased vocab)."""
    from transformers import AutoTokenizer

    if asset.path is None:
        return AutoTokenizer.from_pretrained(minilm_dir())
    return AutoTokenizer.from_pretrained(asset.path)


def load_classifier(asset: Resolved, num_labels: int, seed: int = 0) -> torch.nn.Module:
    """A sequence classifier on the asset's encoder (fresh head), or the true bert-base random-init."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification
    from transformers.utils import logging

    torch.manual_seed(seed)  # the new head's init is part of the run's seed
    if asset.source == "random-init":
        return BertForSequenceClassification(BertConfig(**BERT_BASE, num_labels=num_labels))
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the "classifier.* newly initialised" report is expected here
    try:
        return AutoModelForSequenceClassification.from_pretrained(asset.path, num_labels=num_labels,
                                                                  dtype=torch.float32)
    finally:
        logging.set_verbosity(verbosity)


def save_model(model: torch.nn.Module, tokenizer: Any, path: str | Path,
               metadata: dict[str, Any] | None = None) -> Path:
    """save_pretrained (model.safetensors + config.json) and tokenizer files, all-or-nothing."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if metadata is not None:
            tok = vocab.fingerprint(tmp)
            (tmp / "qlab.json").write_text(json.dumps({**metadata, **({"tokenizer_sha256": tok} if tok else {})},
                                                      indent=2, sort_keys=True))
    return Path(path)


def check_weights(path: str | Path) -> list[Path]:
    """A model folder's safetensors weights (model.safetensors, or the shards its index names), each readable to
    the end of its header: a truncated file or a decoy is one line, and pickle weights (pytorch_model.bin) are
    never a fallback."""
    from safetensors import safe_open

    p = Path(path)
    index = p / "model.safetensors.index.json"
    try:
        files = sorted({p / f for f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()}) \
            if index.is_file() else [p / "model.safetensors"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise QlabError(f"corrupt {index}: {type(e).__name__}") from None
    for f in files:
        if not f.is_file():
            pickle = [q.name for q in p.glob("*.bin")]
            raise QlabError(f"{p}: {f.name} is missing" + (f" (qlab loads safetensors only, not the pickle "
                                                           f"{pickle[0]}: convert it)" if pickle else ""))
        try:
            with safe_open(f, framework="pt") as st:
                list(st.keys())
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for every kind of damage
            raise QlabError(f"corrupt weights {f}: {str(e).splitlines()[0][:200]} (truncated or not safetensors)") \
                from None
    return files


def check_checkpoint(path: str | Path) -> Path:
    """A saved model folder must hold a config.json that parses and readable safetensors weights (`check_weights`:
    one file or the shards of its index)."""
    p = Path(path)
    if not p.is_dir():
        raise QlabError(f"checkpoint folder not found: {p} (run notebook 01 first to create it)")
    if not (p / "config.json").is_file():
        raise QlabError(f"checkpoint {p} is incomplete: config.json is missing")
    try:
        json.loads((p / "config.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise QlabError(f"corrupt checkpoint {p}: config.json is not JSON ({e})") from None
    try:
        check_weights(p)
    except QlabError as e:
        raise QlabError(f"checkpoint {p}: {e}") from None
    return p


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model")  # any one of them


def has_tokenizer_files(p: Path) -> bool:
    """A saved folder holds tokenizer files (any of `TOKENIZER_FILES`)."""
    return any((p / f).is_file() for f in TOKENIZER_FILES)


def check_loading(p: Path, info: dict[str, list[Any]]) -> None:
    """transformers' loading report must be clean: a missing weight would be silently random, an unexpected or
    mis-shaped one means the file is for another architecture."""
    problems = {k: [x if isinstance(x, str) else x[0] for x in info.get(k) or []]
                for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    bad = {k.split("_")[0]: v for k, v in problems.items() if v}
    if bad:
        raise QlabError(f"checkpoint {p} does not match its config.json: " + "; ".join(
            f"{k} weights {', '.join(v[:3])}{' …' if len(v) > 3 else ''} ({len(v)})" for k, v in bad.items()))


def check_tokenizer(p: Path, tok: Any, vocab_size: int) -> None:
    """The tokenizer files are there and the tokenizer fits the model's embedding table (a truncated vocabulary
    loads without complaint and maps every text to a handful of ids)."""
    n = len(tok)
    if n > vocab_size or vocab_size - n > max(1024, vocab_size // 100):
        raise QlabError(f"checkpoint {p}: the tokenizer has {n:,} tokens for a model with {vocab_size:,} embeddings "
                        "(tokenizer files from another model, or truncated)")


def load_saved_classifier(path: str | Path) -> tuple[torch.nn.Module, Any]:
    """Load a checkpoint written by `save_model`, verified: files, weights against the config, tokenizer against
    the embeddings."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    p = check_checkpoint(path)
    if not has_tokenizer_files(p):
        raise QlabError(f"checkpoint {p} is incomplete: no tokenizer file ({' or '.join(TOKENIZER_FILES)})")
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(p, dtype=torch.float32,
                                                                         output_loading_info=True)
        tok = AutoTokenizer.from_pretrained(p)
    except Exception as e:
        raise QlabError(f"cannot load checkpoint {p}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    check_loading(p, info)
    check_tokenizer(p, tok, model.config.vocab_size)
    return model.eval(), tok


# ---------------------------------------------------------------- causal LMs (studies 05-08)

def load_causal_lm(path: str | Path, method: str | None, device: torch.device,
                   dtype: torch.dtype | None = None, keep_lm_head: bool = True,
                   quant_storage: torch.dtype | None = None) -> torch.nn.Module:
    """A causal LM as stored (`method` None) or with any QuantMethod: bitsandbytes' (int8 | nf4 | qlora) quantize
    while loading, the others load as stored and then go through `quant.apply`. Placed on `device`; unquantized
    weights in `dtype` (default: fp32 on CPU, the device's compute dtype on CUDA). `keep_lm_head=False` lets
    bitsandbytes quantize an untied LM head too. Under an FSDP launch the 4-bit codes and every other weight share
    `quant_storage` and FSDP, not a device map, places the model."""
    from transformers import AutoModelForCausalLM

    plan = build_quantization_plan(method, device, keep_lm_head=keep_lm_head, quant_storage=quant_storage) \
        if method else None
    on_load = plan is not None and plan.bnb_config is not None
    sharded = dist.uses_fsdp() and quant_storage is not None
    dtype = quant_storage if sharded else dtype
    kwargs: dict[str, Any] = {"dtype": dtype or (torch.float32 if device.type == "cpu" else compute_dtype(device)),
                              "device_map": None if sharded else
                              device_map(device) if on_load or device.type == "cuda" else None}
    if on_load:
        if not keep_lm_head:
            require_untied_head(path)
        kwargs["quantization_config"] = plan.bnb_config
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True, use_safetensors=True,
                                                           **kwargs)
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: a mis-shaped tensor
        first = str(e).splitlines()[0][:300]
        if "ignore_mismatched_sizes" in first:
            first = "a weight's shape differs from what config.json declares (weights of another size or model)"
        raise QlabError(f"cannot load a causal LM from {path}: {first}") from None
    if on_load:  # bitsandbytes renames what it quantizes on load; a plain load must be complete
        return model
    check_loading(Path(path), info)
    return quant.apply(model, method, keep_lm_head=keep_lm_head) if method else model


def require_untied_head(path: str | Path) -> None:
    """A tied LM head is the input embedding: quantizing it is not an option bitsandbytes has."""
    from transformers import AutoConfig

    if getattr(AutoConfig.from_pretrained(str(path)), "tie_word_embeddings", False):
        raise QlabError(f"keep_lm_head_fp16=False: {path} ties its LM head to the input embeddings, which stay "
                        "16/32-bit; only an untied head (e.g. LLaMA-2) can be quantized")


def save_random_init(path: str | Path, build: Callable[[], torch.nn.Module], seed: int) -> Path:
    """A randomly initialised model, built with `seed` and saved once (bitsandbytes quantizes on load from a
    folder); the `gpu` profile's stand-in for weights that cannot travel."""
    p = Path(path)
    if not (p / "config.json").is_file():
        torch.manual_seed(seed)
        with atomic_dir(p) as tmp:
            build().save_pretrained(tmp)
    return p


LAYER_KINDS = ("Conv1D", "Linear", "Linear8bitLt", "Linear4bit", "BitLinear", "TernaryLinear")


def layer_kinds(model: torch.nn.Module) -> dict[str, int]:
    """How many base weight layers of each kind the model holds (LoRA's own A/B layers not counted)."""
    counts = {k: 0 for k in LAYER_KINDS}
    for path, m in model.named_modules():
        name = type(m).__name__
        if name in counts and not hasattr(m, "base_layer") and ".lora_" not in path:
            counts[name] += 1
    return {k: v for k, v in counts.items() if v}
