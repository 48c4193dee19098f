"""qlib-pretrained causal LMs: true architectures, deterministic, cached, exact parameter counts."""
import json

import pytest
import torch
from safetensors.torch import load_file

from qlib import assets, metrics
from qlib.core.errors import QlabError
from qlib.pretrain import LM_SPECS, LMSpec, model_config, pretrained_lm

pytestmark = pytest.mark.slow  # pretraining the stand-ins: `make test-fast` leaves this file out


def test_tiny_gpt2_config_exact_parameter_count():
    from transformers import AutoModelForCausalLM

    spec = LMSpec("gpt2", vocab_size=512, hidden=64, layers=2, heads=2, context=64)
    model = AutoModelForCausalLM.from_config(model_config(spec))
    block = 2 * 2 * 64 + (64 * 192 + 192) + (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64)
    assert metrics.param_counts(model)["total_params"] == 512 * 64 + 64 * 64 + 2 * block + 2 * 64


def test_tiny_llama_config_exact_parameter_count():
    from transformers import AutoModelForCausalLM

    spec = LMSpec("llama", vocab_size=512, hidden=64, layers=2, heads=2, intermediate=128)
    model = AutoModelForCausalLM.from_config(model_config(spec))
    block = 4 * 64 * 64 + 3 * 64 * 128 + 2 * 64  # q,k,v,o + gate,up,down + 2 RMSNorms
    assert metrics.param_counts(model)["total_params"] == 512 * 64 + 2 * block + 64  # tied head


def test_pretraining_is_deterministic_and_cached(tmp_path):
    a = pretrained_lm("gpt2-stdlib-tiny", cache=tmp_path / "a")
    b = pretrained_lm("gpt2-stdlib-tiny", cache=tmp_path / "b")
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    meta = json.loads((a / "qlab.json").read_text())
    assert meta["spec"]["arch"] == "gpt2" and meta["heldout"]["perplexity"] < 512  # beats uniform
    assert pretrained_lm("gpt2-stdlib-tiny", cache=tmp_path / "a") == a  # cache hit


def test_registry_resolves_pretrained_here(monkeypatch, tmp_path):
    r = assets.resolve_model("qwen-arch", "qwen2-stdlib-tiny")
    assert r.source == "pretrained-here" and (r.path and "qwen2-stdlib-tiny" in r.path)
    with pytest.raises(QlabError, match="is a 'causal-lm' asset"):
        assets.resolve_model("encoder", "gpt2-stdlib")
    assert set(LM_SPECS) >= {"gpt2-stdlib", "llama-stdlib", "qwen2-stdlib"}
