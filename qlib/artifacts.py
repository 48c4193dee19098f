"""What `python -m qlib inspect PATH` verifies, per kind of artifact the studies write: a model folder (classifier
or causal LM), a LoRA adapter, a switchable adapter set, a QAT INT8 folder, a GGUF file. Each check loads what a
user would load and refuses a broken artifact with one line naming the problem, so "loads" means whole."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qlib.config import QlabError


def kind(path: Path) -> str:
    """Which artifact a path holds, from the files it has."""
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        raise QlabError(f"{path}: not an artifact qlab knows (a .gguf file, or a folder)")
    if not path.is_dir():
        raise QlabError(f"checkpoint folder not found: {path}")
    for name, k in (("switchable.json", "switchable"), ("adapter_config.json", "adapter"),
                    ("model_int8.pt", "qat_int8"), ("config.json", "model")):
        if (path / name).is_file():
            return k
    raise QlabError(f"{path} is not a model folder: no config.json (nor adapter_config.json, switchable.json, "
                    "model_int8.pt)")


def verify(path: str | Path) -> list[str]:
    """Verify the artifact at `path` and describe it in a few lines."""
    p = Path(path)
    return {"gguf": _gguf, "switchable": _switchable, "adapter": _adapter, "qat_int8": _qat,
            "model": _model}[kind(p)](p)


def _model(p: Path) -> list[str]:
    from qlib.adapters import param_counts  # 4-bit weights counted as the weights they stand for
    from qlib.metrics import size_on_disk
    from qlib.models import check_checkpoint, check_tokenizer, load_causal_lm, load_saved_classifier

    from qlib.models import has_tokenizer_files

    arch = _architectures(p)
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in arch):  # GPT-2 names its LM class GPT2LMHeadModel
        check_checkpoint(p)
        model = load_causal_lm(p, None, torch.device("cpu"), dtype=torch.float32)
        tok = _tokenizer(p) if has_tokenizer_files(p) else None  # a base beside an adapter
        if tok is not None:
            check_tokenizer(p, tok, model.config.vocab_size)
    else:
        model, tok = load_saved_classifier(p)
    n = param_counts(model)["total_params"]
    said = f"tokenizer {len(tok):,} tokens" if tok is not None else "no tokenizer saved in the folder"
    return [f"{p}: {type(model).__name__}, {n:,} params, {size_on_disk(p / 'model.safetensors') / 2**20:.1f} MiB "
            f"safetensors, {said}: loads whole"]


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
    from qlib.adapters import match_adapter, read_adapter

    cfg, shapes = read_adapter(p)
    base = cfg.get("base_model_name_or_path")
    line = (f"{p}: LoRA adapter r={cfg.get('r')}, alpha {cfg.get('lora_alpha')}, targets "
            f"{sorted(cfg.get('target_modules') or [])}, base {base!r}")
    if base and Path(base).is_dir() and (Path(base) / "config.json").is_file():
        match_adapter(_skeleton(Path(base), cfg.get("task_type"), shapes), shapes)
        return [line, "  matches its base (every adapted layer exists with the right shape)"]
    return [line, "  base not on this machine: files verified, the match with the base is not"]


def _skeleton(base: Path, task: str | None, shapes: dict[str, tuple[int, ...]]) -> torch.nn.Module:
    """The base as the adapter was trained on it (peft's task type picks the head), on the meta device: the shapes
    are all the match needs. A classifier gets as many labels as the adapter's saved head has rows."""
    import transformers

    conf = transformers.AutoConfig.from_pretrained(base)
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
    from qlib.adapters import read_adapter
    from qlib.switchable import saved_widths

    sub = saved_widths(p)
    for d in sub.values():
        read_adapter(d)
    return [f"{p}: switchable adapters for widths {', '.join(map(str, sub))}, each whole"]


def _qat(p: Path) -> list[str]:
    from qlib.studies.qat import load_qat

    try:
        model = load_qat(p)
    except QlabError:
        raise
    except Exception as e:
        raise QlabError(f"{p}: the INT8 model does not load: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    from qlib.quant.ptq import count_quantized

    return [f"{p}: torch.ao INT8 model (weights_only load), {count_quantized(model)}"]


def _gguf(p: Path) -> list[str]:
    """Header, tensor count and every tensor's bytes inside the file (a truncated file is named)."""
    from qlib import gguf

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
