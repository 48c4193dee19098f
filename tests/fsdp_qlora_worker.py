"""One rank of an FSDP-QLoRA run on CPU processes (torch.distributed.run, gloo), for tests/test_data_parallel.py.

accelerate will not shard on CPUs, so this wraps the model with torch's FSDP itself, as accelerate's FSDP plugin
does on GPUs: qlib's load under an FSDP launch (NF4 codes stored in the compute dtype), qlib's LoRA for a sharded
model, peft's wrap policy, use_orig_params off; SGD steps over each rank's share of the global batch; qlib's
gathered save. Rank 0 then trains the same model in one process without FSDP and writes both adapters.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_qlora_worker.py MODEL OUT STEPS GLOBAL_BATCH
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def build(src: str) -> torch.nn.Module:
    from qlib.adapters import add_causal_lora
    from qlib.models import load_causal_lm

    model = load_causal_lm(src, "qlora", torch.device("cpu"), quant_storage=torch.float32)
    torch.manual_seed(1)  # the adapter's initialisation, the same on every rank and in the reference
    # train mode: in eval mode bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel on the first forward,
    # in place, and FSDP's flat parameter points the weight back at the unpacked bytes (wrong from the second forward)
    return add_causal_lora(model, 4, True, "attention", dropout=0.0, sharded=True).train()


def train(model: torch.nn.Module, batches: list[torch.Tensor], rank: int, world: int) -> None:
    # plain SGD: an update proportional to the gradient, so ranks' gradients summed instead of averaged would show
    # (AdamW's update is nearly scale-free and would hide it)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for x in batches:
        share = x.chunk(world)[rank]
        model(input_ids=share, labels=share).loss.backward()
        opt.step()
        opt.zero_grad()


def main(src: str, out: str, steps: int, global_batch: int) -> None:
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel
    from transformers import AutoTokenizer

    from qlib.adapters import save_adapter
    from qlib.studies.llama_finetune import full_weights

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tok = AutoTokenizer.from_pretrained(src)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, len(tok), (global_batch, 32), generator=g) for _ in range(steps)]
    model = build(src)
    wrapped = FullyShardedDataParallel(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=False,
                                       device_id=torch.device("cpu"))
    shard = sum(p.numel() for p in wrapped.parameters())
    train(wrapped, batches, rank, world)
    with full_weights(wrapped) as state:
        if rank == 0:
            save_adapter(model, tok, Path(out) / "fsdp", {"artifact": "adapter"}, state_dict=state)
    shards = [None] * world
    dist.all_gather_object(shards, shard)
    if rank == 0:
        ref = build(src)
        train(ref, batches, 0, 1)
        save_adapter(ref, tok, Path(out) / "one", {"artifact": "adapter"})
        whole = sum(p.numel() for p in ref.parameters())
        (Path(out) / "run.json").write_text(json.dumps({"world": world, "shard_numel": shards, "numel": whole}))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ["ACCELERATE_USE_FSDP"] = "true"  # what `accelerate launch --config_file fsdp_qlora.yaml` sets
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
