"""Every study keeps the same contract (DESIGN.md): STUDY, Config, PROFILES, config, run, findings; notebooks build
their config from their parameters in one call; `quant.apply` is the one quantize verb."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from qlib import quant
from qlib.config import PROFILES, QuantMethod
from qlib.core.errors import QlabError
from qlib.studies import STUDIES, notebook_config, study

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.parametrize("stem", STUDIES)
def test_each_study_keeps_the_contract(stem):
    mod = study(stem)
    assert mod.STUDY == stem and study(stem[:2]) is mod
    assert dataclasses.is_dataclass(mod.Config) and callable(mod.run) and callable(mod.findings)
    assert set(mod.PROFILES) <= set(PROFILES) and "smoke" in mod.PROFILES and "default" in mod.PROFILES
    cfg = mod.config("smoke")
    assert isinstance(cfg, mod.Config) and cfg.profile == "smoke"
    with pytest.raises(QlabError, match=f"unknown parameter.*for {mod.__name__.rsplit('.', 1)[-1]}.Config: nope"):
        mod.config("smoke", nope=1)
    fields = {f.name for f in dataclasses.fields(mod.Config)}
    assert isinstance(mod.ASSET_ROLES, dict) and set(mod.ASSET_ROLES) <= fields  # what `-p` checks and fetch gets
    assert callable(mod.gpu_predictions)  # what `python -m qlib plan` and docs/t4.md print


def test_the_gpu_profile_covers_the_studies_that_define_it():
    """`run --profile gpu` runs config.GPU_STUDIES: exactly the studies whose PROFILES have a gpu entry."""
    from qlib.config import GPU_STUDIES

    assert [s[:2] for s in STUDIES if "gpu" in study(s).PROFILES] == list(GPU_STUDIES)


def test_fetch_and_plan_iterate_the_studies_not_a_list(monkeypatch):
    """`assets --fetch --profile t4` asks for every model and dataset the studies' configs name, each once; a study
    that does not use one in a profile (07's hub LLaMA without the 7B fine-tune) is not asked for."""
    from qlib import assets, cli, plans

    asked = []
    monkeypatch.setattr(assets, "resolve_model", lambda role, key: asked.append((role, key)) or _Resolved(key))
    monkeypatch.setattr(assets, "resolve_data", lambda role, key: asked.append((role, key)) or _Resolved(key, "pip"))
    cli.fetch_profile("t4")
    assert ("encoder", "bert-base-uncased") in asked and ("llama-arch", "llama-2-7b") in asked
    assert ("qa", "squad") in asked and ("qwen-arch", "qwen2.5-1.5b-instruct") in asked
    assert len(asked) == len(set(asked))
    asked.clear()
    cli.fetch_profile("default")
    assert ("llama-arch", "llama-2-7b") not in asked
    monkeypatch.setattr(study("02"), "gpu_predictions", lambda profile: ["02's own"])
    assert plans.profile_plans("t4")["02_ptq"] == ["02's own"]  # the table asks the study, not a list of its own


@dataclasses.dataclass
class _Resolved:
    id: str
    source: str = "hub"
    revision: str | None = None


@pytest.mark.parametrize("stem", STUDIES)
def test_notebook_parameters_are_config_fields_and_build_it_in_one_call(stem):
    """The parameters cell names each knob once; notebook_config reads them (None keeps the profile's value)."""
    cells = json.loads((NOTEBOOKS / f"{stem}.ipynb").read_text())["cells"]
    params = next(c for c in cells if "parameters" in c["metadata"].get("tags", []))
    ns: dict = {}
    exec("".join(params["source"]), ns)
    names = {k for k in ns if not k.startswith("__") and k != "os"}
    mod = study(stem)
    fields = {f.name for f in dataclasses.fields(mod.Config)}
    assert names - {"profile"} <= fields, sorted(names - fields)
    ns["profile"] = "smoke"
    assert notebook_config(mod, ns) == mod.config("smoke")
    knob = next(f for f in sorted(names - {"profile", "device"}) if isinstance(getattr(mod.config("smoke"), f), int)
                and not isinstance(getattr(mod.config("smoke"), f), bool))
    ns[knob] = getattr(mod.config("smoke"), knob) + 1  # what papermill's injected cell does
    assert getattr(notebook_config(mod, ns), knob) == getattr(mod.config("smoke"), knob) + 1


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)).eval()


def test_quant_apply_dispatches_each_method_to_its_quantizer():
    from qlib.quant.bitnet import BitLinear
    from qlib.quant.uniform import QuantLinear

    assert {QuantMethod.parse(m) for m in ("fp32", "fp16", "int8", "nf4", "qlora", "bitnet", "qlora_bitnet",
                                           "ptq_int8", "qat_int8", "switchable")} == set(quant.HANDLERS)
    b = quant.apply(_tiny_gpt2(), "bitnet")
    assert sum(isinstance(m, BitLinear) for m in b.modules()) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj per block
    frozen = quant.apply(_tiny_gpt2(), "qlora_bitnet")
    assert not any(p.requires_grad for p in frozen.parameters())
    s = quant.apply(_tiny_gpt2(), "switchable")
    assert sum(isinstance(m, QuantLinear) for m in s.modules()) == 2 * 4
    assert quant.apply(_tiny_gpt2(), "fp16").transformer.wte.weight.dtype == torch.float16
    with pytest.raises(QlabError, match="gguf has no in-memory handler"):
        quant.apply(_tiny_gpt2(), "gguf")
    with pytest.raises(QlabError, match="unknown quantization method 'int3'"):
        quant.apply(_tiny_gpt2(), "int3")


def test_quant_apply_bitsandbytes_equals_loading_the_folder_with_the_plan(tmp_path):
    """The bnb handler is the load path: the same NF4 codes as loading the saved folder with the method."""
    from qlib import models

    from transformers import GPT2LMHeadModel

    _tiny_gpt2().save_pretrained(tmp_path)
    model = GPT2LMHeadModel.from_pretrained(tmp_path)
    a = quant.apply(model, "nf4")
    assert a.name_or_path == str(tmp_path)  # not the handler's temp folder: peft records it as the adapter's base
    b = models.load_causal_lm(tmp_path, "nf4", torch.device("cpu"), dtype=torch.float32)
    wa, wb = a.transformer.h[0].attn.c_attn.weight, b.transformer.h[0].attn.c_attn.weight
    assert type(wa).__name__ == "Params4bit" and torch.equal(wa.data, wb.data)
    ids = torch.arange(10).unsqueeze(0)
    assert torch.equal(a(ids).logits, b(ids).logits)


def test_load_causal_lm_takes_every_method_bitsandbytes_on_load_the_others_through_quant_apply(tmp_path):
    from qlib import models
    from qlib.quant.bitnet import BitLinear

    _tiny_gpt2().save_pretrained(tmp_path)
    cpu = torch.device("cpu")
    b = models.load_causal_lm(tmp_path, "bitnet", cpu)
    assert sum(isinstance(m, BitLinear) for m in b.modules()) == 2 * 4
    assert models.load_causal_lm(tmp_path, "fp16", cpu).transformer.wte.weight.dtype == torch.float16
    q = models.load_causal_lm(tmp_path, "qlora", cpu, keep_lm_head=True)
    assert type(q.transformer.h[0].attn.c_attn.weight).__name__ == "Params4bit"
    with pytest.raises(QlabError, match="gguf has no in-memory handler"):
        models.load_causal_lm(tmp_path, "gguf", cpu)


def test_every_notebook_is_a_registered_study():
    assert sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")) == list(STUDIES)
