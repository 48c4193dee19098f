"""What `python -m qlib inspect PATH` verifies, per kind of artifact the studies write: a model folder (classifier
or causal LM), a LoRA adapter, a switchable adapter set, a QAT INT8 folder, a packed ternary model, a GGUF file.
Each check loads what a user would load and refuses a broken artifact with one line naming the problem, so
"loads" means whole; the run metadata beside it (`runmeta`) is printed and held against the run name.

`load(PATH)` is the flag-free loader: it detects the method from the metadata (or the run name) and rebuilds the
quantization config it was made with (NF4 base of a QLoRA adapter, bitsandbytes on load, the ternary skeleton)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qlib import adapters, models, quant, runmeta, vocab
from qlib.adapters import match_adapter, read_adapter
from qlib.backends import gguf
from qlib.core.errors import QlabError
from qlib.metrics import param_counts, size_on_disk
from qlib.models import check_checkpoint, check_tokenizer, has_tokenizer_files, load_causal_lm, load_saved_classifier
from qlib.quant import bitnet
from qlib.quant.bitnet import TernaryLinear
from qlib.quant.ptq import count_quantized
from qlib.quant.qat import load_qat
from qlib.switchable import saved_widths


def kind(path: Path) -> str:
    """Which artifact a path holds, from the files it has."""
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        raise QlabError(f"{path}: not an artifact qlab knows (a .gguf file, or a folder)")
    if not path.is_dir():
        raise QlabError(f"checkpoint folder not found: {path}")
    for name, k in (("switchable.json", "switchable"), ("adapter_config.json", "adapter"),
                    ("model_int8.pt", "qat_int8"), (TERNARY_FILE, "ternary"), ("config.json", "model")):
        if (path / name).is_file():
            return k
    raise QlabError(f"{path} is not a model folder: no config.json (nor adapter_config.json, switchable.json, "
                    "model_int8.pt)")


TERNARY_FILE = "model-ternary.safetensors"  # study 05's packed BitNet (config.json beside it)


def verify(path: str | Path) -> list[str]:
    """Verify the artifact at `path` and describe it in a few lines, its run metadata included."""
    p = Path(path)
    k = kind(p)
    detected = runmeta.detect(p)  # a corrupt metadata file or a name that contradicts it: one line, first
    lines = {"gguf": _gguf, "switchable": _switchable, "adapter": _adapter, "qat_int8": _qat,
             "ternary": _ternary, "model": _model}[k](p)
    return lines + runmeta.describe(detected)


def load(path: str | Path, device: str | torch.device = "cpu", dequantize: bool = False
         ) -> tuple[torch.nn.Module, runmeta.Detected]:
    """The artifact as a model on `device`, quantized as it was made: no flags, the method read from its metadata
    or run name (`dequantize`: an adapter's 4-/8-bit base dequantized to fp32 first, the start of a merge).
    A GGUF file, a switchable set or a QAT folder have their own runtimes: named, not loaded."""
    p, dev = Path(path), torch.device(device)
    k, d = kind(p), runmeta.detect(p)
    if k == "adapter":
        return _load_adapter(p, d, dev, dequantize), d
    if k == "ternary":
        return _load_ternary(p), d
    if k == "model":
        return _load_model(p, d, dev), d
    where = {"gguf": "llama.cpp (qlib.backends.gguf)", "switchable": "qlib.switchable.SwitchableModel.load",
             "qat_int8": "qlib.quant.qat.load_qat"}[k]
    raise QlabError(f"{p} is a {k} artifact: it loads with {where}, not as a transformers model")


def _base_path(p: Path, d: runmeta.Detected, fallback: str | None) -> str:
    """Where an adapter's base is: the metadata's local path, else its id, else the adapter config's."""
    m = d.meta or {}
    local = m.get("base_model_path")
    base = local if local and Path(local).is_dir() else m.get("base_model") or fallback
    if not base:
        raise QlabError(f"{p}: no base model named in its metadata or adapter_config.json")
    return str(base)


def _load_adapter(p: Path, d: runmeta.Detected, dev: torch.device, dequantize: bool = False) -> torch.nn.Module:
    """LoRA on a plain base, QLoRA on the NF4 base it was trained on (the recorded quant type, double quant and
    skipped modules, this device's compute dtype), LoRA on a ternary base; then plain peft."""
    cfg, shapes = adapters.read_adapter(p)
    base = _base_path(p, d, cfg.get("base_model_name_or_path"))
    if cfg.get("task_type") == "SEQ_CLS":
        labels = [s[0] for k, s in shapes.items() if k.endswith(("classifier.weight", "score.weight"))]
        if d.method not in ("qlora", "nf4"):
            raise QlabError(f"{p}: a classifier adapter on a {d.method} base is not a kind qlab writes")
        skip = tuple(d.extras.get("skip_modules", adapters.CLASSIFIER_SKIP))  # as it was quantized
        model = adapters.load_nf4_classifier(base, labels[0] if labels else 2, dev, skip)
    else:  # a ternary base quantizes on the fly, as it trained
        method = "bitnet" if d.method in ("bitnet", "qlora_bitnet") else \
            d.method if d.method in ("qlora", "nf4", "int8") else None
        model = models.load_causal_lm(base, method, dev, torch.float32,
                                      keep_lm_head=d.extras.get("keep_lm_head_fp16", True))
    if dequantize and d.method in ("qlora", "nf4", "int8"):
        model = model.dequantize().to(torch.float32)
    return adapters.load_adapter(model, p)


def _load_ternary(p: Path) -> torch.nn.Module:
    """The packed BitNet: the architecture from config.json, frozen to ternary form, codes unpacked into it."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    if not (p / "config.json").is_file():
        raise QlabError(f"{p}: the packed ternary model has no config.json beside it")
    model = AutoModelForCausalLM.from_config(_config(p))
    quant.apply(model, "bitnet")
    bitnet.freeze_ternary(model)
    try:
        bitnet.load_ternary_state(model, load_file(p / TERNARY_FILE))
    except Exception as e:
        raise QlabError(f"{p}: the packed ternary weights do not load: {type(e).__name__}: {str(e)[:200]}") from None
    return model.eval()


def _load_model(p: Path, d: runmeta.Detected, dev: torch.device) -> torch.nn.Module:
    """A folder saved quantized loads as saved (its config.json must agree with the metadata); a full-precision
    folder whose run says int8/nf4 is quantized on load with that plan; merged and plain folders load as stored."""
    saved = runmeta.saved_bnb_method(p)
    wanted = "nf4" if d.method == "qlora" else d.method
    if saved and d.source == "metadata" and d.part is None and wanted != saved:
        raise QlabError(f"{p}: config.json holds a bitsandbytes {saved} model but its metadata says {d.method}")
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in _architectures(p)):
        return models.load_saved_classifier(p)[0].to(dev)
    quantize = wanted in ("int8", "nf4") and not saved and d.part not in runmeta.PARTS
    return models.load_causal_lm(p, wanted if quantize else None, dev,  # the device's default dtype
                                 keep_lm_head=d.extras.get("keep_lm_head_fp16", True)).eval()


def _model(p: Path) -> list[str]:
    arch = _architectures(p)
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in arch):  # GPT-2 names its LM class GPT2LMHeadModel
        check_checkpoint(p)
        model = load_causal_lm(p, None, torch.device("cpu"), dtype=torch.float32)
        tok = _tokenizer(p) if has_tokenizer_files(p) else None  # a base beside an adapter
        if tok is not None:
            check_tokenizer(p, tok, model.config.vocab_size)
    else:
        model, tok = load_saved_classifier(p)
    check_finite(p, model)
    check_own_tokenizer(p)
    n = param_counts(model)["total_params"]
    said = f"tokenizer {len(tok):,} tokens" if tok is not None else "no tokenizer saved in the folder"
    return [f"{p}: {type(model).__name__}, {n:,} params, {size_on_disk(p / 'model.safetensors') / 2**20:.1f} MiB "
            f"safetensors, {said}: loads whole"]


def _config(p: Path) -> Any:
    """A folder's config.json as transformers reads it; a corrupt or unknown one is one line naming the folder."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(p)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QlabError(f"corrupt {p / 'config.json'}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


def check_own_tokenizer(p: Path) -> None:
    """The tokenizer files are the ones saved with the model, where its metadata fingerprinted them: a foreign
    tokenizer of the same size loads, and maps every text to ids that mean other words."""
    said = (runmeta.read_meta(p) or {}).get("tokenizer_sha256")
    if said and vocab.fingerprint(p) not in (None, said):
        raise QlabError(f"{p}: its tokenizer files are not the ones saved with the model (their vocabulary differs "
                        f"from the fingerprint in {runmeta.META_FILE}): a foreign tokenizer")


def check_finite(p: Path, model: torch.nn.Module) -> None:
    """Every floating-point weight is finite: a NaN or Inf loads without complaint and poisons every output."""
    bad = [k for k, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise QlabError(f"{p}: {len(bad)} weight tensor(s) hold NaN or Inf (first: {bad[0]}); it loads, but not whole")


def _architectures(p: Path) -> list[str]:
    try:
        return list(json.loads((p / "config.json").read_text(encoding="utf-8")).get("architectures") or [])
    except (ValueError, AttributeError) as e:
        raise QlabError(f"corrupt checkpoint {p}: config.json: {type(e).__name__}") from None


def _tokenizer(p: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(p)
    except Exception as e:
        raise QlabError(f"{p}: the tokenizer does not load: {type(e).__name__}") from None


def _adapter(p: Path) -> list[str]:
    """The adapter's files; against its base where the base is a local folder (adapter/base match)."""
    cfg, shapes = read_adapter(p)
    base = cfg.get("base_model_name_or_path")
    targets = cfg.get("target_modules") or []
    line = (f"{p}: LoRA adapter r={cfg.get('r')}, alpha {cfg.get('lora_alpha')}, targets "
            f"{targets if isinstance(targets, str) else sorted(targets)}, base {base!r}")
    if base and Path(base).is_dir() and (Path(base) / "config.json").is_file():
        match_adapter(_skeleton(Path(base), cfg.get("task_type"), shapes), shapes)
        return [line, "  matches its base (every adapted layer exists with the right shape)"]
    return [line, "  base not on this machine: files verified, the match with the base is not"]


def _skeleton(base: Path, task: str | None, shapes: dict[str, tuple[int, ...]]) -> torch.nn.Module:
    """The base as the adapter was trained on it (peft's task type picks the head), on the meta device: the shapes
    are all the match needs. A classifier gets as many labels as the adapter's saved head has rows."""
    import transformers

    conf = _config(base)
    auto = {"SEQ_CLS": transformers.AutoModelForSequenceClassification,
            "CAUSAL_LM": transformers.AutoModelForCausalLM}.get(task or "")
    if auto is transformers.AutoModelForSequenceClassification:
        heads = [shape[0] for k, shape in shapes.items()
                 if k.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight"))]
        conf.num_labels = heads[0] if heads else conf.num_labels
    cls = getattr(transformers, (conf.architectures or [""])[0], None)
    with torch.device("meta"):
        if auto is not None:
            return auto.from_config(conf)
        return cls(conf) if cls is not None else transformers.AutoModel.from_config(conf)


def _switchable(p: Path) -> list[str]:
    sub = saved_widths(p)
    for d in sub.values():
        read_adapter(d)
    return [f"{p}: switchable adapters for widths {', '.join(map(str, sub))}, each whole"]


def _qat(p: Path) -> list[str]:
    try:
        model = load_qat(p)
    except QlabError:
        raise
    except Exception as e:
        raise QlabError(f"{p}: the INT8 model does not load: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None

    return [f"{p}: torch.ao INT8 model (weights_only load), {count_quantized(model)}"]


def _ternary(p: Path) -> list[str]:
    model = _load_ternary(p)
    n = sum(isinstance(m, TernaryLinear) for m in model.modules())
    return [f"{p}: packed ternary {type(model).__name__}, {n} ternary layers, "
            f"{param_counts(model)['total_params']:,} params: loads whole"]


def _gguf(p: Path) -> list[str]:
    """Header, tensor count and every tensor's bytes inside the file (a truncated file is named)."""
    reader = gguf._reader(p)
    size = p.stat().st_size
    header = reader.fields.get("GGUF.tensor_count")
    declared = int(header.parts[header.data[0]][0]) if header is not None else len(reader.tensors)
    if declared != len(reader.tensors):
        raise QlabError(f"{p}: the header declares {declared} tensors, {len(reader.tensors)} were read")
    short = [t.name for t in reader.tensors if t.data_offset + t.n_bytes > size]
    if short:
        raise QlabError(f"{p} is truncated: tensor {short[0]} ends past the end of the file")
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return [f"{p}: GGUF, {len(reader.tensors)} tensors ({', '.join(f'{k} {v}' for k, v in sorted(types.items()))}), "
            f"{size / 2**20:.1f} MiB: header and tensors whole"]
