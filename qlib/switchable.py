"""One GPT-2 that runs each block at 2, 4, 8 or full-precision bits, chosen at run time, with one LoRA
adapter per (block, bit width): peft's multi-adapter LoRA, switched block by block; and its training
(`train_switchable`: spnet, cyclic, instantnet, single).

A "layer" of a bitmap is a transformer block (`transformer.h.<i>`): its attention and MLP projections
share one width. Bitmaps: an int (all blocks), a comma list ("8,4,8,4", one entry per block), or a dict
{block index or "h.<i>": bits} (blocks not named keep their current width).
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from qlib import quant
from qlib.adapters import check_adapter, target_modules
from qlib.core.errors import QlabError
from qlib.core.io import atomic_dir
from qlib.quant.uniform import WIDTHS, QuantLinear, check_width
from qlib.train import TrainResult

Bitmap = int | str | dict[Any, int] | list[int] | tuple[int, ...]


def adapter_name(bits: int) -> str:
    return f"w{bits}"


def _width(value: Any, where: str) -> int:
    try:
        bits = int(str(value).strip())
    except ValueError:
        raise QlabError(f"bad bitmap: {value!r} at {where} is not a bit width; valid: "
                        f"{', '.join(map(str, WIDTHS))}") from None
    if bits not in WIDTHS:
        raise QlabError(f"bad bitmap: unsupported bit width {bits} at {where}; valid: {', '.join(map(str, WIDTHS))}")
    return bits


def parse_bitmap(bitmap: Bitmap, n_layers: int, current: list[int] | None = None,
                 allowed: tuple[int, ...] | None = None) -> list[int]:
    """Any accepted bitmap form -> one width per block; one clear error for anything else."""
    widths = list(current) if current is not None else [32] * n_layers
    if isinstance(bitmap, bool):
        raise QlabError(f"bad bitmap: {bitmap!r} (expected an int, a comma list or a dict)")
    if isinstance(bitmap, str) and not bitmap.strip():
        raise QlabError(f"bad bitmap: empty (give one width for all blocks, e.g. 8, or one per block, e.g. "
                        f"{','.join(['8'] * n_layers)})")
    if isinstance(bitmap, int) or (isinstance(bitmap, str) and "," not in bitmap):
        widths = [_width(bitmap, "all blocks")] * n_layers
    elif isinstance(bitmap, (str, list, tuple)):
        items = bitmap.split(",") if isinstance(bitmap, str) else list(bitmap)
        if len(items) != n_layers:
            raise QlabError(f"bad bitmap: {len(items)} entries for a model with {n_layers} blocks "
                            f"(give one width per block, e.g. {','.join(['8'] * n_layers)})")
        widths = [_width(v, f"block {i}") for i, v in enumerate(items)]
    elif isinstance(bitmap, dict):
        widths = _widths_by_layer(bitmap, widths, n_layers)
    else:
        raise QlabError(f"bad bitmap: {type(bitmap).__name__} {bitmap!r} (expected an int, a comma list or a dict)")
    if allowed is not None:
        missing = sorted({w for w in widths if w not in allowed})
        if missing:
            raise QlabError(f"bad bitmap: no adapter was trained for width(s) {missing}; this model has "
                            f"{', '.join(map(str, allowed))}")
    return widths


def _widths_by_layer(bitmap: dict[Any, Any], widths: list[int], n_layers: int) -> list[int]:
    """A {layer: width} bitmap (keys 0, "h.0" or "transformer.h.0") over the current widths."""
    widths = list(widths)
    for key, v in bitmap.items():
        m = re.fullmatch(r"(?:transformer\.)?(?:h\.)?(\d+)", str(key).strip())
        if m is None or int(m.group(1)) >= n_layers:
            raise QlabError(f"bad bitmap: unknown layer {key!r}; valid: 0..{n_layers - 1} or h.0..h.{n_layers - 1}")
        widths[int(m.group(1))] = _width(v, f"layer {key!r}")
    return widths


def bitmap_str(widths: list[int]) -> str:
    return ",".join(map(str, widths))


class SwitchableQuantLoRAModel(torch.nn.Module):
    """A peft-wrapped GPT-2 whose blocks are QuantLinear + one LoRA adapter per width."""

    def __init__(self, peft_model: Any, widths: tuple[int, ...]):
        super().__init__()
        self.model = peft_model
        self.widths = tuple(sorted(widths))
        self.blocks = list(peft_model.base_model.model.transformer.h)
        self.config_widths = [max(self.widths)] * len(self.blocks)
        self.set_config(self.config_widths)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def set_config(self, bitmap: Bitmap) -> list[int]:
        """Each block: its QuantLinears at that width and its LoRA layers on that width's adapter."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        widths = parse_bitmap(bitmap, self.n_layers, self.config_widths, self.widths)
        for block, bits in zip(self.blocks, widths):
            for m in block.modules():
                if isinstance(m, QuantLinear):
                    m.set_bit_width(bits)
                if isinstance(m, BaseTunerLayer):
                    m.set_adapter(adapter_name(bits))
        self.config_widths = widths
        return widths

    def active(self) -> list[tuple[int, str]]:
        """(bit width, active adapter) of each block, read back from the layers themselves."""
        out = []
        for block in self.blocks:
            q = next(m for m in block.modules() if isinstance(m, QuantLinear))
            lora = next(m for m in block.modules() if hasattr(m, "active_adapters") and hasattr(m, "lora_A"))
            out.append((q.bit_width, lora.active_adapters[0]))
        return out

    def block_params(self) -> list[int]:
        """Base (non-LoRA) parameters of each block: the weights for average bits."""
        return [sum(p.numel() for n, p in b.named_parameters() if "lora_" not in n) for b in self.blocks]

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if "lora_" in n]

    def forward(self, **kwargs: Any) -> Any:
        return self.model(**kwargs)

    def save(self, path: str | Path) -> Path:
        """All adapters (peft writes one subfolder per adapter) plus the widths."""
        import json

        with atomic_dir(Path(path)) as tmp:
            self.model.save_pretrained(tmp, selected_adapters=[adapter_name(b) for b in self.widths])
            (tmp / "switchable.json").write_text(json.dumps({"widths": list(self.widths)}))
        return Path(path)


def load_base(base_dir: str | Path) -> torch.nn.Module:
    """The GPT-2 base in fp32. GPT-2's tanh-approximated GELU (`gelu_new`, which transformers writes out in five
    Python-level tensor ops) is computed by torch's fused kernel of the same formula (`gelu_pytorch_tanh`): the
    same function to float rounding, fewer passes over the activations."""
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.from_pretrained(str(base_dir))
    fused = ({"activation_function": "gelu_pytorch_tanh"}
             if getattr(conf, "activation_function", "") == "gelu_new" else {})
    return AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, **fused)


def build(base_dir: str | Path, widths: tuple[int, ...], rank: int, device: torch.device) -> SwitchableQuantLoRAModel:
    """Base GPT-2 (frozen) -> QuantLinear everywhere -> one LoRA adapter per width."""
    from peft import LoraConfig, get_peft_model

    for b in widths:
        check_width(b)
    base = load_base(base_dir)
    quant.apply(base, "switchable")
    for p in base.parameters():
        p.requires_grad_(False)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=target_modules("gpt2", "attention+mlp"))
    first, *rest = sorted(widths)
    model = get_peft_model(base, cfg, adapter_name=adapter_name(first))
    for b in rest:
        model.add_adapter(adapter_name(b), cfg)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return SwitchableQuantLoRAModel(model.to(device), tuple(widths))


def saved_widths(adapters_dir: str | Path) -> dict[int, Path]:
    """Each width a saved switchable folder lists (switchable.json) and its adapter folder, all verified present."""
    import json

    d = Path(adapters_dir)
    meta = d / "switchable.json"
    if not meta.is_file():
        raise QlabError(f"{d} is not a switchable adapter folder (switchable.json is missing)")
    try:
        widths = tuple(check_width(b) for b in json.loads(meta.read_text(encoding="utf-8"))["widths"])
    except (ValueError, KeyError, TypeError, QlabError) as e:
        raise QlabError(f"corrupt {meta} (expected {{\"widths\": [2, 4, 8, 32]}}): {type(e).__name__}") from None
    if not widths:
        raise QlabError(f"corrupt {meta}: no widths")
    sub = {b: d / adapter_name(b) if (d / adapter_name(b)).is_dir() or len(widths) > 1 else d for b in widths}
    gone = [f"{adapter_name(b)}/" for b in widths if not (sub[b] / "adapter_config.json").is_file()]
    if gone:
        raise QlabError(f"{d} is incomplete: the adapter of width(s) {', '.join(gone)} is missing "
                        f"(switchable.json lists {', '.join(map(str, widths))})")
    return sub


def load(base_dir: str | Path, adapters_dir: str | Path, device: torch.device) -> SwitchableQuantLoRAModel:
    """A saved switchable model: the base, patched, and every width's adapter."""
    from peft import PeftModel

    sub = saved_widths(adapters_dir)
    widths = tuple(sub)
    base = load_base(base_dir)
    quant.apply(base, "switchable")
    first, *rest = widths

    for b in widths:
        check_adapter(base, sub[b])
    model = PeftModel.from_pretrained(base, str(sub[first]), adapter_name=adapter_name(first))
    for b in rest:
        model.load_adapter(str(sub[b]), adapter_name=adapter_name(b))
    return SwitchableQuantLoRAModel(model.to(device).eval(), widths)


# ---------------------------------------------------------------- training it (spnet, cyclic, instantnet)

STYLES = ("spnet", "cyclic", "instantnet", "single")


def style_bitmaps(style: str, widths: tuple[int, ...], n_layers: int) -> list[list[int]]:
    """The bitmaps one optimizer step of `style` visits (cyclic: the whole cycle, one per step)."""
    ws = sorted(widths)
    if style == "single":
        if len(ws) != 1:
            raise ValueError(f"style 'single' trains one width; got {ws}")
        return [[ws[0]] * n_layers]
    if style == "cyclic":  # up and back down between the bounds: 2,4,8,32,8,4,...
        cycle = ws + ws[-2:0:-1]
        return [[w] * n_layers for w in cycle]
    if style in ("spnet", "instantnet"):
        maps = [[w] * n_layers for w in reversed(ws)]  # highest first: instantnet's teacher
        if 8 in ws and 4 in ws:
            maps.append([8 if i % 2 == 0 else 4 for i in range(n_layers)])
        return maps
    raise ValueError(f"unknown training style {style!r}; valid: {', '.join(STYLES)}")


def _kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, t: float) -> torch.Tensor:
    """KL(teacher || student) on the predicted (answer) positions, temperature-scaled."""
    mask = labels[:, 1:] != -100
    s = torch.log_softmax(student[:, :-1][mask] / t, -1)
    q = torch.log_softmax(teacher[:, :-1][mask] / t, -1)
    return torch.nn.functional.kl_div(s, q, log_target=True, reduction="batchmean") * t * t


def train_switchable(model: torch.nn.Module, loader: DataLoader, style: str, steps: int, lr: float,
                     device: torch.device, kd_temperature: float = 1.0, desc: str = "") -> TrainResult:
    """spnet: sum of the losses of every bitmap, one step; cyclic: one bitmap per step, cycling the width;
    instantnet: spnet + distillation of each lower width from the highest width's outputs (CE + KL);
    single: one width. `model` is a `SwitchableQuantLoRAModel`; only LoRA parameters train."""
    maps = style_bitmaps(style, model.widths, model.n_layers)
    params = model.lora_parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)))
    model.to(device).train()
    res, t0, batches = TrainResult(), time.perf_counter(), iter(())
    for step in (bar := tqdm(range(steps), desc=desc or f"{style} training")):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        batch = {k: v.to(device) for k, v in batch.items()}
        visit = [maps[step % len(maps)]] if style == "cyclic" else maps
        total, teacher = 0.0, None
        for i, bitmap in enumerate(visit):
            model.set_config(bitmap)
            out = model(**batch)
            loss = out.loss
            if style == "instantnet":
                if i == 0:
                    teacher = out.logits.detach()
                else:
                    loss = loss + _kd_loss(out.logits, teacher, batch["labels"], kd_temperature)
            loss.backward()  # per bitmap: frees each graph before the next (same gradient as the sum)
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        res.losses.append(total / len(visit))
        res.steps += 1
        bar.set_postfix(loss=f"{res.losses[-1]:.3f}")
    res.train_time_s = time.perf_counter() - t0
    model.eval()
    return res
