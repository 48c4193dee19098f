"""Study 07's fine-tune launched as two CPU processes (torchrun, gloo): a real data-parallel run, not the same run
twice. Each rank trains its own windows, the adapter equals a one-process run over the same global batches, and
rank 0 alone writes the adapter and the results, with every rank's peak memory."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qlib.core.errors import QlabError
from qlib.pretrain import pretrained_lm

STEPS = 3
ARGS = ["--profile", "smoke", "-p", "finetune_7b", "true", "-p", "device", "cpu", "-p", "dataset_id", "stdlib-code",
        "-p", "finetune_steps", str(STEPS), "-p", "seq", "32", "-p", "lora_dropout", "0"]


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = pretrained_lm("llama-stdlib-tiny")
    cfg = LlamaConfig.from_pretrained(src)
    cfg.tie_word_embeddings = False  # LLaMA-2's layout
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("untied") / "llama-untied"
    LlamaForCausalLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def _launch(root, model, processes, batch):
    env = {**os.environ, "QLAB_ROOT": str(root), "OMP_NUM_THREADS": "1"}
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)] if processes > 1 else []
    cmd = [sys.executable, *launcher, "-m", "qlib.studies.llama_scaling", *ARGS, "-p", "model_id", str(model),
           "-p", "batch", str(batch)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _outputs(root):
    adapters = glob.glob(str(root / "outputs" / "smoke" / "07_llama_scaling" / "*" / "adapter_model.safetensors"))
    results = glob.glob(str(root / "results" / "smoke" / "07_llama_scaling" / "*.json"))
    return adapters, results


def test_two_processes_train_different_batches_and_match_one_process_over_the_same_global_batch(untied, tmp_path):
    out2 = _launch(tmp_path / "two", untied, processes=2, batch=1)
    out1 = _launch(tmp_path / "one", untied, processes=1, batch=2)
    (a2,), (r2,) = _outputs(tmp_path / "two")  # rank 0 alone wrote: one adapter, one results file
    (a1,), (r1,) = _outputs(tmp_path / "one")
    assert out2.count("[qlab] wrote") == 1
    two, one = json.loads(open(r2).read()), json.loads(open(r1).read())
    assert two["world_size"] == 2 and one["world_size"] == 1
    ranks = two["windows_by_rank"]
    assert len(ranks) == 2 and all(len(r) == STEPS for r in ranks)
    for step in range(STEPS):  # different windows on each rank; together, the one-process run's batch
        assert not set(ranks[0][step]) & set(ranks[1][step])
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(one["windows_by_rank"][0][step])
    assert len(two["peak_memory"]["per_rank"]) == 2
    assert all(r["rss_peak_gb"] > 0 for r in two["peak_memory"]["per_rank"])
    w2, w1 = load_file(a2), load_file(a1)
    trained = max(w1[k].abs().max().item() for k in w1 if "lora_B" in k)  # B starts at zero
    assert trained > 1e-5
    assert max((w2[k] - w1[k]).abs().max().item() for k in w1) < 1e-3 * trained  # gloo's sum order only
    assert "[qlab] wrote" in out1


def test_more_processes_than_batches_is_one_line_before_any_step(monkeypatch):
    from qlib.studies import llama_finetune

    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(QlabError, match="4 processes x batch 2 need 8 training windows and the text gives 5: "
                                        "launch fewer processes"):
        llama_finetune.check_launch(5, 2)
    llama_finetune.check_launch(8, 2)
