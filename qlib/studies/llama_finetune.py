"""Study 07 on a GPU with the hub: a real QLoRA fine-tune of LLaMA-7B (NF4 base, LoRA r=16 on all seven
projections, paged 8-bit AdamW, gradient checkpointing), with transformers' Trainer.

The Trainer is used (not qlib's loop) because it is what `accelerate launch` distributes: on several GPUs,
`accelerate launch -m qlib.studies.llama_finetune --profile t4` runs the same code data-parallel, one NF4
copy per GPU (`device_map={"": local_rank}`), with no distribution code in qlab.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch

from qlib import data, metrics
from qlib.assets import Resolved
from qlib.config import compute_dtype


def qlora_finetune(asset: Resolved, cfg: Any, device: torch.device) -> dict[str, Any]:
    """Peak VRAM, time per step, tokens/s, and held-out perplexity before and after."""
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from qlib.models import add_causal_lora, load_causal_lm

    local = int(os.environ.get("LOCAL_RANK", device.index or 0))
    dev = torch.device("cuda", local)
    tok = AutoTokenizer.from_pretrained(asset.path)
    train_texts, eval_texts, _ = data.load_code_sft("codesearchnet-python")
    chunks = data.lm_chunks(tok, train_texts, cfg.seq, cfg.finetune_steps * cfg.batch * 4)
    eval_ids = data.lm_chunks(tok, eval_texts, cfg.seq, 16 * cfg.seq).reshape(-1)
    model = load_causal_lm(asset.path, "qlora", dev)
    ppl_before = metrics.perplexity(model, eval_ids, cfg.seq, cfg.seq, dev)["perplexity"]
    model = add_causal_lora(model, cfg.lora_rank, kbit=True, gradient_checkpointing=True)
    bf16 = compute_dtype(dev) == torch.bfloat16
    args = TrainingArguments(output_dir=str(cfg_output(cfg)), per_device_train_batch_size=cfg.batch,
                             max_steps=cfg.finetune_steps, learning_rate=2e-4, optim="paged_adamw_8bit",
                             gradient_checkpointing=True, bf16=bf16, fp16=not bf16, logging_steps=5,
                             save_strategy="no", report_to=[], seed=cfg.seed)
    dataset = [{"input_ids": c, "labels": c} for c in chunks]
    torch.cuda.reset_peak_memory_stats(dev)
    out = Trainer(model=model, args=args, train_dataset=dataset).train()
    peak = torch.cuda.max_memory_allocated(dev)
    ppl_after = metrics.perplexity(model, eval_ids, cfg.seq, cfg.seq, dev)["perplexity"]
    step_s = out.metrics["train_runtime"] / cfg.finetune_steps
    return {"model": asset.id, "source": asset.source, "peak_mem_bytes": peak, "step_time_s": step_s,
            "tokens_per_s": cfg.batch * cfg.seq / step_s, "perplexity_before": ppl_before,
            "perplexity_after": ppl_after, "steps": cfg.finetune_steps, "seq": cfg.seq, "batch": cfg.batch,
            "compute_dtype": "bf16" if bf16 else "fp16", "world_size": int(os.environ.get("WORLD_SIZE", 1))}


def cfg_output(cfg: Any) -> Any:
    from qlib.config import outputs_dir

    return outputs_dir("07_llama_scaling", cfg.profile) / "finetune-7b"


def main(argv: list[str] | None = None) -> int:
    """`accelerate launch -m qlib.studies.llama_finetune --profile t4`: the 7B fine-tune alone."""
    from qlib.config import pick_device
    from qlib.studies.llama_scaling import finetune_7b, scaling_config

    ap = argparse.ArgumentParser(prog="python -m qlib.studies.llama_finetune")
    ap.add_argument("--profile", default="t4")
    ap.add_argument("--steps", type=int, default=None)
    a = ap.parse_args(argv)
    cfg = scaling_config(a.profile, finetune_steps=a.steps)
    print(json.dumps(finetune_7b(cfg, pick_device("auto")), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
