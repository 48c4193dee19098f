"""The `t4` profile proven without the hub: all eight notebooks run headless with papermill in the t4
profile against a hub-faithful stand-in (tests/hub_standin.py: the true repo ids and revisions in the
Hugging Face cache layout, true config keys at tiny sizes, real tokenizers, the datasets' true features),
with `HF_HUB_OFFLINE=1`, shrunk only by their parameters. Checks the schema, that every hub asset is
recorded as `source: hub` with its hub id and revision, and that the stand-in itself is faithful."""
import json
from pathlib import Path

import pytest

from qlib import results
from qlib.studies import llama_scaling

# 07's roofline at the smoke profile's size: its default ladder (60M-1B) is minutes of CPU
SMOKE_ROOFLINE = {k: list(v) if isinstance(v, tuple) else v for k, v in llama_scaling.PROFILES["smoke"].items()
                  if k.startswith("roofline_")}  # papermill passes lists, not tuples

pytestmark = pytest.mark.slow  # papermill runs of every notebook

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"

# (notebook, papermill parameters that shrink it, the hub ids its metrics.json must name). 05's ladder and 06's
# block search use the offline SmolLM2 in every profile, not a hub model: here they run on the tiny stand-in LLaMA
# (as in the smoke profile), which keeps this rehearsal of the hub path minutes shorter.
RUNS = [
    ("01_baseline", dict(n_train=64, n_eval=32, epochs=1, batch_size=16, max_length=32),
     {"model": "bert-base-uncased", "data": "stanfordnlp/sst2"}),
    ("02_ptq", dict(calib_sentences=16, latency_repeats=2), {"data": "stanfordnlp/sst2"}),
    ("03_qat", dict(batch_size=16, calib_sentences=16, latency_repeats=2), {"data": "stanfordnlp/sst2"}),
    ("04_qlora_bert", dict(ranks=[8], batch_size=16), {"model": "bert-base-uncased", "data": "stanfordnlp/sst2"}),
    ("05_gpt2_bitnet", dict(steps=2, batch_size=2, context=64, stride=64, train_tokens=4000, eval_tokens=512,
                            gen_tokens=4, latency_repeats=1, ladder_eval_tokens=512, ladder_methods=["gptq_w4"],
                            ladder_ablation=["gptq_w4"], ladder_calib_samples=[8], ladder_calib_length=64,
                            ladder_methods_eval_tokens=512, ladder_model_id="llama-stdlib-tiny", ladder_context=64),
     {"model": "gpt2", "data": "code-search-net/code_search_net"}),
    ("06_switchable_precision", dict(steps=2, batch_size=2, lora_rank=2, max_len=128, n_eval=4, n_calib=2,
                                     max_new_tokens=3, block_qa_questions=8,
                                     block_model_id="llama-stdlib-tiny", block_context=64, block_calib_tokens=256,
                                     block_eval_tokens=512),
     {"model": "gpt2", "data": "rajpurkar/squad"}),
    ("07_llama_scaling", dict(rungs="llama-2m", seq=32, steps=1, finetune_steps=2, device="cpu", **SMOKE_ROOFLINE), {}),
    ("08_qwen_merge_gguf", dict(steps=2, batch_size=2, context=64, train_tokens=4000, eval_tokens=512, gen_tokens=4,
                                latency_repeats=1),
     {"model": "Qwen/Qwen2.5-1.5B-Instruct", "data": "code-search-net/code_search_net"}),
]


def test_every_study_has_a_t4_run_here():
    """A new study is rehearsed in the t4 profile too: forgetting its row here fails."""
    from qlib.studies import STUDIES

    assert [stem for stem, _, _ in RUNS] == list(STUDIES)


@pytest.fixture(scope="module")
def t4_env(standin_hub, tmp_path_factory):
    """One results/outputs root for the eight notebooks (02-04 read what 01 wrote), the stand-in as the hub."""
    root = tmp_path_factory.mktemp("t4-root")
    mp = pytest.MonkeyPatch()
    mp.setenv("QLAB_ROOT", str(root))
    mp.setenv("HF_HUB_CACHE", str(standin_hub))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("CUDA_VISIBLE_DEVICES", "")
    yield root
    mp.undo()


@pytest.mark.parametrize("stem, params, hub_ids", RUNS, ids=[r[0] for r in RUNS])
def test_t4_notebook_runs_against_the_hub_standin(stem, params, hub_ids, t4_env):
    import papermill as pm

    out = t4_env / f"{stem}.ipynb"
    pm.execute_notebook(str(NOTEBOOKS / f"{stem}.ipynb"), str(out), cwd=str(NOTEBOOKS),
                        parameters={"profile": "t4", **params}, kernel_name="python3", progress_bar=False)
    doc = json.loads((t4_env / "results" / "t4" / stem / "metrics.json").read_text())
    results.validate_metrics(doc, stem)
    assert doc["profile"] == "t4"
    for role, hub_id in hub_ids.items():
        asset = doc["assets"][role]
        assert (asset["source"], asset["id"]) == ("hub", hub_id)
        assert asset.get("revision")  # the commit the files came from
    if stem != "02_ptq":  # everything that trains printed its T4 prediction before training
        import nbformat

        printed = "".join(o.get("text", "") for c in nbformat.read(out, as_version=4).cells
                          for o in c.get("outputs", []))
        assert "predicted peak" in printed and "on a T4" in printed
    if stem == "07_llama_scaling":  # the 7B fine-tune's code path, on the stand-in's tiny Llama-2
        ft = doc["finetune_7b"]
        assert (ft["model"], ft["source"]) == ("meta-llama/Llama-2-7b-hf", "hub")
        assert ft["data"]["id"] == "code-search-net/code_search_net" and ft["train_windows"] >= 2
        assert 1 < ft["perplexity_after"] < 2 * 32000 and 1 < ft["perplexity_before"] < 2 * 32000  # random 32k-vocab


def test_standin_tokenizers_reproduce_llama_cpp_test_vectors(standin_hub):
    """The stand-in's tokenizers are the real ones: llama.cpp's own test vectors come out token for token."""
    import hub_standin as hs
    import sentencepiece as spm
    from transformers import AutoTokenizer

    vocab = standin_hub.parent / "vocab"
    for repo, fam in hs.VOCABS.items():
        snap = next((standin_hub / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir())
        gguf = vocab / f"ggml-vocab-{fam}.gguf"
        if fam == "llama-spm":  # the sentencepiece model itself (tokenizer.json is transformers' conversion)
            sp = spm.SentencePieceProcessor(model_file=str(snap / "tokenizer.model"))
            ok, n = hs.check_tokenizer(type("T", (), {"__call__": lambda s, t, **k: {"input_ids": sp.encode(t)}})(),
                                       gguf)
        else:
            ok, n = hs.check_tokenizer(AutoTokenizer.from_pretrained(snap), gguf)
        assert ok == n == 47, (repo, ok, n)


def test_standin_models_keep_the_published_config_keys(standin_hub):
    import hub_standin as hs

    from qlib.hub import HUB_MODEL_CONFIGS

    for repo, published in HUB_MODEL_CONFIGS.items():
        snap = next((standin_hub / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir())
        cfg = json.loads((snap / "config.json").read_text())
        assert set(cfg) == set(published)
        assert {k: v for k, v in cfg.items() if k not in hs.TINY[repo]} == \
            {k: v for k, v in published.items() if k not in hs.TINY[repo]}
        assert all(v % 64 == 0 for k, v in hs.TINY[repo].items() if k in ("hidden_size", "n_embd", "intermediate_size"))
