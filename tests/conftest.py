"""Tests run offline and in the smoke profile; nbval's kernels inherit this environment."""
import os

import pytest

os.environ["QLAB_PROFILE"] = "smoke"
os.environ["QLAB_HEADLESS"] = "1"  # nbval's kernels: text progress bars, as in `python -m qlib run`
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def standin_hub(tmp_path_factory):
    """The t4 profile's hub repos, faithful at tiny sizes, in a Hugging Face cache (tests/hub_standin.py)."""
    import hub_standin

    return hub_standin.build_standin(tmp_path_factory.mktemp("hub-standin"))


@pytest.fixture(scope="session")
def untied(tmp_path_factory):
    """A tiny LLaMA with an untied LM head (LLaMA-2's layout), saved with its tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlib.pretrain import pretrained_lm

    src = pretrained_lm("llama-stdlib-tiny")
    cfg = LlamaConfig.from_pretrained(src)
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("untied") / "llama-untied"
    LlamaForCausalLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out
