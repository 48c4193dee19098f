"""What a hub stand-in cannot show: which repo, revision and files each t4 loader asks for, the errors a
real hub gives (gated, missing, offline), local folders of the wrong kind, and the t4 sizes against a T4."""
import json
import re
from pathlib import Path

import pytest
import torch

from qlib import assets, budget, data, hub, plans, qa
from qlib.core.errors import QlabError

T4_DATA = [("classification", "sst2", "stanfordnlp/sst2", ("sentence", "label")),
           ("code", "codesearchnet-python", "code-search-net/code_search_net",
            ("func_code_string", "func_documentation_string")),
           ("qa", "squad", "rajpurkar/squad", ("context", "question", "answers"))]


@pytest.mark.parametrize("role, key, repo, columns", T4_DATA, ids=[d[1] for d in T4_DATA])
def test_t4_datasets_are_parquet_files_never_a_loading_script(role, key, repo, columns, monkeypatch, tmp_path):
    """Every t4 dataset is read as the pinned parquet files of a repo through huggingface_hub, then datasets'
    parquet builder: `datasets.load_dataset(repo)` (which runs or refuses scripts) is never called."""
    spec = hub.HUB_DATASETS[repo]
    assert all(f.endswith(".parquet") for fs in spec.files.values() for f in fs)
    assert {"train", "validation"} <= set(spec.files) and set(columns) <= set(spec.columns)
    if repo != "rajpurkar/squad":  # SQuAD's parquet layout is main's (no sha at hand; said in the spec's note)
        assert re.fullmatch(r"[0-9a-f]{40}", spec.revision)
    asked, built = [], []

    def fake_snapshot(repo_id, **kw):
        asked.append((repo_id, kw["repo_type"], kw["revision"], sorted(kw["patterns"])))
        for f in kw["patterns"]:
            (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / f).write_bytes(b"")
        return tmp_path

    def fake_load(builder, **kw):
        built.append((builder, kw))
        raise QlabError("stop here")

    import datasets

    monkeypatch.setattr(hub, "snapshot", fake_snapshot)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    with pytest.raises(QlabError, match="stop here"):
        assets.dataset_for(assets.resolve_data(role, key))
    assert asked == [(repo, "dataset", spec.revision, sorted(f for fs in spec.files.values() for f in fs))]
    assert built[0][0] == "parquet" and set(built[0][1]["data_files"]) == set(spec.files)


def test_codesearchnet_is_its_own_parquet_conversion():
    spec = hub.HUB_DATASETS["code-search-net/code_search_net"]
    assert spec.revision == "4ba6f7a48afb0ae5a8713c7d214561dff8a11c57"  # parquet-converter commit of the repo
    assert spec.files["train"] == ("python/code_search_net-train-00000-of-00004.parquet",)
    assert assets.REGISTRY["codesearchnet-python"].hub_id == spec.repo_id


def _raise(exc):
    def f(*a, **k):
        raise exc
    return f


def test_gated_missing_and_offline_repos_are_one_line_each(monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    class Resp:
        status_code, headers, url, request = 403, {}, "https://huggingface.co/x", None

    monkeypatch.setattr(hub, "offline", lambda: False)
    gated = errors.GatedRepoError("403 gated", response=Resp())
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _raise(gated))
    with pytest.raises(QlabError) as e:
        assets.resolve_model("llama-arch", "llama-2-7b")
    msg = str(e.value)
    assert "gated" in msg and "HF_TOKEN" in msg and "meta-llama/Llama-2-7b-hf" in msg and "\n" not in msg
    assert "cannot be reached" not in msg  # a gated repo is not a network problem
    missing = errors.RepositoryNotFoundError("404", response=Resp())
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _raise(missing))
    with pytest.raises(QlabError, match="'no-org/no-model' was not found on the hub"):
        assets.resolve_model("causal-lm", "no-org/no-model")
    monkeypatch.setattr(hub, "offline", lambda: True)
    with pytest.raises(QlabError, match=r"offline.*model_id='llama-stdlib'"):
        assets.resolve_model("llama-arch", "llama-2-7b")
    with pytest.raises(QlabError, match=r"offline.*dataset_id='stdlib-code'"):
        assets.dataset_for(assets.resolve_data("code", "codesearchnet-python"))


def test_the_offline_hint_names_a_parameter_the_notebook_has():
    """07's message once suggested a model_id its notebook did not take: every hint's parameter exists."""
    import nbformat

    cells = {p.stem: next(c.source for c in nbformat.read(p, as_version=4).cells
                          if "parameters" in c.metadata.get("tags", []))
             for p in sorted((Path(__file__).parent.parent / "notebooks").glob("0*.ipynb"))}
    uses = {"07_llama_scaling": "llama-arch", "08_qwen_merge_gguf": "qwen-arch", "05_gpt2_bitnet": "causal-lm",
            "06_switchable_precision": "causal-lm", "01_baseline": "encoder", "04_qlora_bert": "encoder"}
    for stem, role in uses.items():
        param = re.search(r"pass (\w+)=", assets._offline_hint(role)).group(1)
        assert re.search(rf"^{param} = None", cells[stem], re.M), (stem, param)
    for stem in ("05_gpt2_bitnet", "06_switchable_precision", "07_llama_scaling", "08_qwen_merge_gguf",
                 "04_qlora_bert"):
        assert re.search(r"^dataset_id = None", cells[stem], re.M), stem


def test_local_model_folder_of_the_wrong_kind_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(QlabError, match="holds a 'llama' model; role 'encoder' needs one of: bert"):
        assets.resolve_model("encoder", str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(QlabError, match="no weights"):
        assets.resolve_model("encoder", str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(QlabError, match="no tokenizer files"):
        assets.resolve_model("encoder", str(tmp_path))
    with pytest.raises(QlabError, match="not a Hugging Face model folder"):
        assets.resolve_model("encoder", str(tmp_path.parent))
    with pytest.raises(QlabError, match="model folder not found"):
        assets.resolve_model("encoder", "/kaggle/input/no-such-model")


def test_local_dataset_folders(tmp_path):
    """Kaggle's attached inputs: split files by name (parquet, jsonl, csv) or a saved DatasetDict; anything
    else is one line naming what is missing."""
    import datasets

    rows = {"text": ["good film", "bad film", "fine", "awful"], "label": [1, 0, 1, 0]}
    (tmp_path / "csv").mkdir()
    for split in ("train", "dev"):
        datasets.Dataset.from_dict(rows).to_csv(str(tmp_path / "csv" / f"{split}.csv"), index=False)
    ds = data.load_classification(str(tmp_path / "csv"))
    assert ds.train_texts == rows["text"] and ds.eval_labels == rows["label"] and ds.asset.source == "folder"
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                               "validation": datasets.Dataset.from_dict(rows)})
    dd.save_to_disk(str(tmp_path / "saved"))
    assert data.load_classification(str(tmp_path / "saved")).eval_texts == rows["text"]
    (tmp_path / "onlytrain").mkdir()
    datasets.Dataset.from_dict(rows).to_json(str(tmp_path / "onlytrain" / "train.jsonl"))
    with pytest.raises(QlabError, match="needs train and validation split files.*found splits: train"):
        data.load_classification(str(tmp_path / "onlytrain"))
    with pytest.raises(QlabError,
                       match=r"split '\w+' lacks column\(s\) id, context, question, answers \(has text, label\)"):
        qa.load_qa(str(tmp_path / "csv"))
    with pytest.raises(QlabError, match="dataset folder not found"):
        data.load_classification("./no/such/folder")


def test_finetune_text_budget_fills_every_step():
    """07's 7B fine-tune once asked for steps*batch*4 tokens (120): not one 512-token window."""
    from qlib.studies.llama_finetune import token_budget

    class Chars:  # one token per character: the budget arithmetic, not a vocabulary
        eos_token_id = 0

        def __call__(self, t):
            return {"input_ids": [ord(c) % 250 + 1 for c in t]}

    texts = [f"def f{i}(x):\n    return x * {i}\n" * 20 for i in range(2000)]
    for steps, batch, seq in ((30, 1, 512), (300, 4, 512), (2, 1, 32)):
        chunks = data.lm_chunks(Chars(), texts, seq, token_budget(steps, batch, seq))
        assert chunks.shape[0] >= steps * batch and chunks.shape[1] == seq


def test_predicted_oom_stops_with_one_line(monkeypatch):
    p = budget.Prediction("08 qlora on a big model", "qlora", 13 * budget.GIB, {"weights": 13 * budget.GIB}, 10, 512,
                          60.0, "float16")
    monkeypatch.setattr(budget, "device_bytes", lambda d: 15 * budget.GIB)  # a T4's share
    with pytest.raises(QlabError, match=r"predicted out of memory: 08 qlora on a big model needs about 13.0 GiB "
                                        r"and this GPU gives 15.0 GiB"):
        budget.announce([p], torch.device("cuda"))
    monkeypatch.setattr(budget, "device_bytes", lambda d: 40 * budget.GIB)
    assert budget.announce([p], torch.device("cuda"))[0]["peak_bytes"] == 13 * budget.GIB


def test_t4_profile_fits_a_t4_and_a_colab_session():
    """Every training run of the t4 profile, predicted on the true hub configs, stays under 85 % of a T4's
    15 GiB, and each notebook's predicted training time under 1.5 h."""
    got = plans.profile_plans("t4")
    assert set(got) == {f"{s}" for s in ("01_baseline", "02_ptq", "03_qat", "04_qlora_bert", "05_gpt2_bitnet",
                                        "06_switchable_precision", "07_llama_scaling", "08_qwen_merge_gguf")}
    for stem, preds in got.items():
        assert all(plans.fits(p) for p in preds), [(p.what, p.peak_bytes / budget.GIB) for p in preds]
        assert sum(p.time_s for p in preds) < budget.SESSION_S, stem
    qlora = got["04_qlora_bert"][0]  # named "QLoRA": the NF4 slowdown is in its time and said in its line
    assert qlora.method == "qlora" and f"x{budget.QLORA_SLOWDOWN:g} for NF4" in qlora.line()
    assert "for NF4" not in got["01_baseline"][0].line()
    qwen = got["08_qwen_merge_gguf"][0]
    assert "checkpointing" in qwen.what and qwen.parts["loss_backward"] > 2 * budget.GIB  # 152k-vocab logits
    from qlib.hub import model_config
    from qlib.studies import qwen_merge

    old = qwen_merge.config("t4", batch_size=8, gradient_checkpointing=False)  # the old t4 setting
    assert not plans.fits(qwen_merge.plan(old, model_config("Qwen/Qwen2.5-1.5B-Instruct"), torch.device("cpu"))[0])


def test_a_script_dataset_is_named_as_such(monkeypatch, tmp_path):
    (tmp_path / "code_search_net.py").write_text("import datasets\n")
    (tmp_path / "README.md").write_text("a script repo\n")
    monkeypatch.setattr(hub, "snapshot", lambda repo_id, **kw: tmp_path)
    with pytest.raises(QlabError, match=r"'someone/scripted' is a loading-script dataset \(code_search_net.py\).*"
                                        "refs/convert/parquet"):
        data.load_code_sft("someone/scripted")


def test_a_partial_cache_is_completed_from_the_hub(monkeypatch, tmp_path):
    """A cache holding only a config.json (another tool fetched it) is not taken for the model."""
    import huggingface_hub

    part, whole = tmp_path / "part", tmp_path / "whole"
    part.mkdir(), whole.mkdir()
    (part / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    for f, text in (("config.json", json.dumps({"model_type": "gpt2"})), ("model.safetensors", ""),
                    ("tokenizer.json", "{}")):
        (whole / f).write_text(text)
    calls = []

    def fake(repo_id, local_files_only=False, **kw):
        calls.append(local_files_only)
        return str(part if local_files_only else whole)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setattr(hub, "offline", lambda: False)
    assert hub.model_snapshot("gpt2", "causal-lm") == whole and calls == [True, False]
    monkeypatch.setattr(hub, "offline", lambda: True)
    with pytest.raises(QlabError, match="'gpt2' is not in the local Hugging Face cache"):
        hub.model_snapshot("gpt2", "causal-lm")
