"""Study 07 on a GPU with the hub: a real QLoRA fine-tune of LLaMA-7B (NF4 base, LoRA r=16 on all seven
projections, paged 8-bit AdamW, gradient checkpointing: each a knob of the config), with transformers' Trainer.
The adapter is saved under its run name with its metadata and the peak-memory report. (No merge here: merging
7B in fp32 needs 28 GB of host memory, more than Colab's; study 08 is the merge study.)

The Trainer is used (not qlib's loop) because it is what `accelerate launch` distributes: on several GPUs,
`accelerate launch -m qlib.studies.llama_scaling --profile t4` runs the same code data-parallel, one NF4
copy per GPU (`device_map={"": local_rank}`), with no distribution code in qlab. With `device=cpu` the same
code path runs on the CPU in fp32 with torch's AdamW: a rehearsal for small models (the tests), not a 7B run.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from qlib import adapters, assets, budget, data, hub, metrics, runmeta
from qlib.adapters import add_causal_lora
from qlib.assets import Resolved
from qlib.config import build_quantization_plan, quant_storage_for
from qlib.core import dist
from qlib.core.device import compute_dtype, compute_dtype_name, set_seed
from qlib.core.errors import QlabError
from qlib.core.paths import outputs_dir
from qlib.models import load_causal_lm, require_untied_head

EVAL_WINDOWS = 16


def token_budget(steps: int, batch: int, seq: int) -> int:
    """Training tokens to tokenize: one `seq`-token window per sequence of every step (Trainer cycles the
    windows if the text runs out, but needs one batch at least)."""
    return steps * batch * seq + seq


def plan(cfg: Any, model_config: Any, device: torch.device) -> list[budget.Prediction]:
    """The 7B QLoRA fine-tune's peak and time as a GPU runs it (paged 8-bit AdamW, checkpointing)."""
    return [budget.predict(f"07 QLoRA fine-tune of {cfg.model_id}, batch {cfg.batch} x {cfg.seq}", model_config,
                           "qlora", batch=cfg.batch, seq=cfg.seq, steps=cfg.finetune_steps,
                           compute=budget.compute_for(device),
                           optimizer_bytes=2 if cfg.optimizer == "paged_adamw_8bit" else 8,
                           checkpointing=cfg.checkpointing, rank=cfg.lora_rank, lora_dropout=cfg.lora_dropout > 0)]


def knobs(cfg: Any) -> runmeta.LoraKnobs:
    return runmeta.LoraKnobs(r=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets,
                             keep_lm_head_fp16=cfg.keep_lm_head_fp16, gradient_checkpointing=cfg.checkpointing,
                             optimizer=cfg.optimizer)


def qlora_finetune(asset: Resolved, cfg: Any, device: torch.device) -> dict[str, Any]:
    """Peak memory (predicted first), time per step, tokens/s, and held-out perplexity before and after. Under a
    launch of several processes each trains its own batches (data parallel); rank 0 writes the adapter and gathers
    every rank's peak memory and the windows each trained on."""
    from transformers import AutoTokenizer, Trainer

    dev = torch.device("cuda", dist.local_rank() if dist.world_size() > 1 else (device.index or 0)) \
        if device.type == "cuda" else device
    predicted = budget.announce(plan(cfg, hub.model_config(asset.path), dev), dev)
    tok = AutoTokenizer.from_pretrained(asset.path)
    train_texts, eval_texts, data_asset = data.load_code_sft(cfg.dataset_id)
    global_batch = dist.world_size() * cfg.batch  # each step takes a batch on every process
    chunks = data.lm_chunks(tok, train_texts, cfg.seq, token_budget(cfg.finetune_steps, global_batch, cfg.seq))
    check_launch(chunks.shape[0], cfg.batch)
    eval_ids = data.lm_chunks(tok, eval_texts, cfg.seq, EVAL_WINDOWS * cfg.seq).reshape(-1)
    if not cfg.keep_lm_head_fp16:
        require_untied_head(asset.path)
    storage = quant_storage_for(dev, cfg.quant_storage)
    model = load_causal_lm(asset.path, "qlora", dev, keep_lm_head=cfg.keep_lm_head_fp16, quant_storage=storage)
    ppl_before = metrics.perplexity(model, eval_ids, cfg.seq, cfg.seq, dev)["perplexity"]
    set_seed(cfg.seed)  # the adapter's initialisation: the same in every process and every run
    model = add_causal_lora(model, cfg.lora_rank, True, cfg.lora_targets, cfg.checkpointing, cfg.lora_alpha,
                            cfg.lora_dropout, sharded=dist.uses_fsdp())
    seen = SeenWindows()
    dataset = [{"input_ids": c, "labels": c, "window": i} for i, c in enumerate(chunks)]
    trainer = Trainer(model=model, args=training_args(cfg, dev), train_dataset=dataset, data_collator=seen)
    fsdp = fsdp_wrap_adapters(trainer)
    with metrics.PeakMemory(dev) as mem:
        out = trainer.train()
    ppl_after = metrics.perplexity(trainer.model if fsdp else model, eval_ids, cfg.seq, cfg.seq,
                                   dev)["perplexity"]  # FSDP: through its wrapper, which gathers the weights
    step_s = out.metrics["train_runtime"] / cfg.finetune_steps
    report = {**mem.report(), "per_rank": dist.gather(mem.report())}
    windows = dist.gather(seen.windows[: cfg.finetune_steps])  # the loader fetches one batch ahead
    with full_weights(trainer.model if fsdp else None) as state:
        adapter = save_adapter(model, tok, asset, data_asset.id, cfg, dev, state_dict=state, peak_memory=report,
                               perplexity_before=ppl_before, perplexity_after=ppl_after) if dist.is_main() else None
    return {"adapter": adapter.name if adapter else None, "peak_memory": report, "model": asset.id,
            "source": asset.source, "revision": asset.revision, "data": data_asset.provenance(),
            "peak_mem_bytes": mem.peak_bytes, "peak_mem_source": mem.source,
            "predicted_peak_mem_bytes": predicted[0]["peak_bytes"], "step_time_s": step_s,
            "tokens_per_s": dist.world_size() * cfg.batch * cfg.seq / step_s, "perplexity_before": ppl_before,
            "perplexity_after": ppl_after, "train_windows": int(chunks.shape[0]), "steps": cfg.finetune_steps,
            "seq": cfg.seq, "batch": cfg.batch, "compute_dtype": compute_dtype_name(dev), "device": dev.type,
            "world_size": dist.world_size(), "windows_by_rank": windows, "fsdp": fsdp,
            "distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1],
            "quant_storage": str(storage or torch.uint8).removeprefix("torch.")}


def training_args(cfg: Any, dev: torch.device) -> Any:
    """The Trainer's arguments: the device's half precision, no checkpoints saved mid-run, the config's seed."""
    from transformers import TrainingArguments

    half = compute_dtype(dev)
    return TrainingArguments(output_dir=str(cfg_output(cfg) / ".trainer"), per_device_train_batch_size=cfg.batch,
                             max_steps=cfg.finetune_steps, learning_rate=2e-4,
                             optim=cfg.optimizer, gradient_checkpointing=cfg.checkpointing,
                             bf16=half == torch.bfloat16, fp16=half == torch.float16, use_cpu=dev.type != "cuda",
                             logging_steps=5, save_strategy="no", report_to=[], seed=cfg.seed,
                             remove_unused_columns=False)  # SeenWindows takes the window index out itself


@contextlib.contextmanager
def full_weights(wrapped: Any) -> Iterator[dict[str, torch.Tensor] | None]:
    """Under FSDP (`wrapped`: the FSDP model), every rank enters; on rank 0 the adapters' full tensors, named as
    peft names them, while FSDP holds the weights gathered. None without FSDP: the model saves itself."""
    if wrapped is None:
        yield None
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrappers = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")  # the names FSDP's units add
    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False, rank0_only=True):
        inner = getattr(wrapped, "module", wrapped)
        yield {_strip(n, wrappers): p.detach().cpu().clone() for n, p in inner.named_parameters()
               if ".lora_A." in n or ".lora_B." in n}


def _strip(name: str, parts: tuple[str, ...]) -> str:
    for p in parts:
        name = name.replace(p, "")
    return name


def fsdp_wrap_adapters(trainer: Any) -> bool:
    """Under FSDP, peft's wrap policy (the adapters in units of their own: with use_orig_params false a unit holds
    one dtype and one requires_grad); whether FSDP is on."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is None or not trainer.is_fsdp_enabled:
        return False
    from peft.utils.other import fsdp_auto_wrap_policy

    plugin.auto_wrap_policy = fsdp_auto_wrap_policy(trainer.model)
    return True


class SeenWindows:
    """Trainer's collator that also notes which training windows each batch held: the proof that the ranks of a
    data-parallel run train on different batches."""

    def __init__(self) -> None:
        self.windows: list[list[int]] = []

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        from transformers import default_data_collator

        self.windows.append([int(f["window"]) for f in features])
        return default_data_collator([{k: v for k, v in f.items() if k != "window"} for f in features])


def check_launch(windows: int, batch: int) -> None:
    """Before any step: every process needs a batch of its own."""
    n = dist.world_size()
    if windows < n * batch:
        raise QlabError(f"{n} processes x batch {batch} need {n * batch} training windows and the text gives "
                        f"{windows}: launch fewer processes (--num_processes) or raise finetune_steps")


def cfg_output(cfg: Any) -> Any:
    return outputs_dir("07_llama_scaling", cfg.profile)


def save_adapter(model: Any, tok: Any, asset: Resolved, dataset: str, cfg: Any, device: torch.device,
                 state_dict: dict[str, torch.Tensor] | None = None, **extra: Any) -> Any:
    """The fine-tune's adapter under its run name, with the metadata (plan, knobs, seed, profile, peak memory)."""
    k = knobs(cfg)
    plan = build_quantization_plan("qlora", device, keep_lm_head=cfg.keep_lm_head_fp16,
                                   quant_storage=quant_storage_for(device, cfg.quant_storage))
    info = runmeta.RunInfo("07_llama_scaling", cfg.profile, cfg.seed, asset.id, str(asset.path), dataset)
    head = runmeta.head_dtype(model)
    name = info.name("SFT", k.token(), "qlora", plan.spec.weights_bits, head)
    return adapters.save_adapter(model, tok, cfg_output(cfg) / name,
                                 info.meta(name, plan, "adapter", head, knobs=k, train_steps=cfg.finetune_steps,
                                           **extra), state_dict=state_dict)


def check_finetune_device(cfg: Any, device: torch.device) -> None:
    """The 7B fine-tune needs CUDA; device='cpu' rehearses its code path on a small model (the tests)."""
    if device.type != "cuda" and cfg.device != "cpu":
        raise QlabError("finetune_7b needs a CUDA GPU (a T4 or larger) and none is visible: run the t4 profile "
                        "on a GPU, or pass finetune_7b=False (the ladder and the 7B accounting run anywhere); "
                        "device=cpu rehearses the fine-tune on a small model")


def finetune_7b(cfg: Any, device: torch.device, asset: assets.Resolved | None = None) -> dict[str, Any]:
    """t4: a real QLoRA fine-tune of the hub LLaMA-7B (CUDA + hub), its peak predicted and checked first."""
    check_finetune_device(cfg, device)
    if asset is None:
        asset = assets.resolve_model("llama-arch", cfg.model_id)  # offline / gated: one clear line
    return qlora_finetune(asset, cfg, device)
