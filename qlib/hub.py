"""The Hugging Face hub and local folders: model snapshots, dataset files, and one clear line when they fail.

Datasets are read as files, never through a loading script: each hub dataset qlab uses is pinned here as
(repo, revision, the parquet files of each split, the columns the studies read), fetched with
`huggingface_hub.snapshot_download` (the cache first, so a Kaggle/offline copy in the cache works) and
read with `datasets`' parquet builder. `datasets` >= 4 refuses script repos ("Dataset scripts are no
longer supported"), and `datasets.load_dataset(repo)` cannot read the hub cache offline at all, so qlab
names the files itself. Any role also takes a local folder: a Hugging Face model folder, or a folder of
parquet/jsonl/csv split files or a saved `DatasetDict` (Kaggle's attached inputs).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from qlib.core.errors import QlabError

HUB = "https://huggingface.co"


@dataclass(frozen=True)
class HubDataset:
    """A hub dataset as qlab reads it: which files of which revision, and the columns it needs."""

    repo_id: str
    revision: str                        # a commit sha where one is pinned
    files: dict[str, tuple[str, ...]]    # split -> paths in the repo (parquet)
    columns: tuple[str, ...]
    note: str = ""

    @property
    def format(self) -> str:
        return "parquet"


HUB_DATASETS: dict[str, HubDataset] = {d.repo_id: d for d in [
    # GLUE SST-2 as parquet: the commit that converted the repo from its script ("Convert dataset to Parquet")
    HubDataset("stanfordnlp/sst2", "f817a2b0170bf1822262d6198427436189c07d04",
               {"train": ("data/train-00000-of-00001.parquet",),
                "validation": ("data/validation-00000-of-00001.parquet",)},
               ("idx", "sentence", "label")),
    # CodeSearchNet's own repo is a loading script; its parquet-converter commit holds the python config as
    # parquet with the original features. One of the four train shards (~100k functions) is more than any
    # study trains on, and is a quarter of the download.
    HubDataset("code-search-net/code_search_net", "4ba6f7a48afb0ae5a8713c7d214561dff8a11c57",
               {"train": ("python/code_search_net-train-00000-of-00004.parquet",),
                "validation": ("python/code_search_net-validation.parquet",)},
               ("func_name", "func_code_string", "func_documentation_string"),
               note="parquet-converter commit of the script repo (refs/convert/parquet); train shard 1 of 4"),
    HubDataset("rajpurkar/squad", "main",
               {"train": ("plain_text/train-00000-of-00001.parquet",),
                "validation": ("plain_text/validation-00000-of-00001.parquet",)},
               ("id", "context", "question", "answers"),
               note="not pinned: no commit sha of the parquet layout was at hand; `main` since 2024"),
]}


# ---------------------------------------------------------------- snapshots and their errors

def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def snapshot(repo_id: str, *, repo_type: str = "model", revision: str | None = None,
             patterns: list[str] | None = None, offline_hint: str = "",
             complete: Callable[[Path], bool] | None = None) -> Path:
    """A local snapshot of a hub repo: the cache first (if `complete` says it is whole), then the network;
    every failure is one QlabError naming its cause (gated, missing, revision, offline) and the fix."""
    from huggingface_hub import snapshot_download

    kwargs: dict[str, Any] = dict(repo_type=repo_type, revision=revision, allow_patterns=patterns)
    try:
        path = Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
        if _has_all(path, patterns) and (complete is None or complete(path)):
            return path
    except Exception:
        pass
    if offline():
        raise QlabError(offline_message(repo_id, revision, offline_hint))
    try:
        return Path(snapshot_download(repo_id, **kwargs))
    except Exception as e:
        raise QlabError(hub_error_message(e, repo_id, repo_type, revision, offline_hint)) from None


def _has_all(path: Path, patterns: list[str] | None) -> bool:
    """Exact file names among the patterns must all be in the cached snapshot (globs need only match)."""
    exact = [p for p in patterns or [] if not any(c in p for c in "*?[")]
    return all((path / p).is_file() for p in exact) and any(path.iterdir())


def _url(repo_id: str, repo_type: str) -> str:
    return f"{HUB}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"


def offline_message(repo_id: str, revision: str | None = None, hint: str = "") -> str:
    rev = f" (revision {revision})" if revision and revision != "main" else ""
    return (f"{repo_id!r}{rev} is not in the local Hugging Face cache and the hub cannot be reached (offline)"
            + (f"; {hint}" if hint else ""))


def hub_error_message(e: Exception, repo_id: str, repo_type: str, revision: str | None, hint: str = "") -> str:
    """One line for what went wrong with a hub repo, most specific cause first."""
    from huggingface_hub import errors

    url = _url(repo_id, repo_type)
    if isinstance(e, errors.GatedRepoError):
        return (f"{repo_id!r} is a gated repo and this session has no access: accept its licence at {url} with "
                "your account, then log in here (`huggingface-cli login`, or an HF_TOKEN secret on Colab/Kaggle); "
                "on Kaggle offline, attach the model as an input and pass its folder instead")
    if isinstance(e, errors.RevisionNotFoundError):
        return f"revision {revision!r} of {repo_id!r} does not exist on the hub ({url})"
    if isinstance(e, errors.RepositoryNotFoundError):
        return (f"{repo_id!r} was not found on the hub ({url}): misspelt, or private and this session is not "
                "logged in (`huggingface-cli login` / HF_TOKEN)")
    if isinstance(e, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, OSError, ConnectionError)) \
            or "connect" in str(e).lower():
        return offline_message(repo_id, revision, hint)
    return f"cannot fetch {repo_id!r} from the hub: {type(e).__name__}: {str(e).splitlines()[0][:200]}"


# ---------------------------------------------------------------- datasets as files

def load_hub_dataset(spec: HubDataset, offline_hint: str = "") -> Any:
    """The spec's splits as a `datasets.DatasetDict`, read from its parquet files (no script, any version)."""
    patterns = [f for files in spec.files.values() for f in files]
    root = snapshot(spec.repo_id, repo_type="dataset", revision=spec.revision, patterns=patterns,
                    offline_hint=offline_hint)
    missing = [f for f in patterns if not (root / f).is_file()]
    if missing:
        raise QlabError(f"{spec.repo_id}@{spec.revision[:12]} lacks {', '.join(missing)}: the repo's layout "
                        "changed; pass a local folder of the data as dataset_id")
    ds = _read_files("parquet", {s: [str(root / f) for f in fs] for s, fs in spec.files.items()})
    return require_columns(ds, spec.columns, f"{spec.repo_id}@{spec.revision[:12]}")


def refuse_script_repo(root: Path, repo_id: str) -> None:
    """A repo holding only a loading script: one line on why and what to use instead (datasets >= 4 refuses
    scripts, datasets 3 would run code from the hub)."""
    data = [f for ext in _BUILDERS for f in root.rglob(f"*{ext}")]
    scripts = sorted(f.name for f in root.glob("*.py"))
    if scripts and not data:
        raise QlabError(f"{repo_id!r} is a loading-script dataset ({scripts[0]}) with no data files: `datasets` >= 4 "
                        "refuses scripts. Use its parquet conversion (the hub's refs/convert/parquet revision), a "
                        "script-free copy, or a local folder of its files as dataset_id")


_SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "dev", "val"), "test": ("test",)}
_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def load_local_dataset(folder: str | Path, columns: tuple[str, ...] = ()) -> Any:
    """A local dataset folder: a saved DatasetDict, or parquet/jsonl/csv files whose path names a split
    (`train.parquet`, `data/train-00000-of-00001.parquet`, `validation/0000.parquet`, `dev.jsonl` ...)."""
    import datasets

    p = Path(folder)
    if not p.is_dir():
        raise QlabError(f"dataset folder not found: {p}")
    if (p / "dataset_dict.json").is_file():
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:
            raise QlabError(f"cannot read the saved DatasetDict in {p}: {type(e).__name__}: {e}") from None
        return require_columns(ds, columns, str(p))
    found: dict[str, list[Path]] = {}
    for f in sorted(p.rglob("*")):
        if f.suffix in _BUILDERS and f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts):
            split = _split_of(f.relative_to(p).as_posix())
            if split:
                found.setdefault(split, []).append(f)
    if "train" not in found or "validation" not in found:
        raise QlabError(f"{p} is not a dataset folder qlab can read: it needs train and validation split files "
                        f"(parquet, jsonl or csv named train* / validation*, valid*, dev*) or a saved DatasetDict; "
                        f"found splits: {', '.join(sorted(found)) or 'none'}")
    kinds = {_BUILDERS[f.suffix] for fs in found.values() for f in fs}
    if len(kinds) > 1:
        raise QlabError(f"{p} mixes file formats ({', '.join(sorted(kinds))}): keep one per folder")
    ds = _read_files(kinds.pop(), {s: [str(f) for f in fs] for s, fs in found.items()})
    return require_columns(ds, columns, str(p))


def _split_of(rel: str) -> str | None:
    for split, names in _SPLIT_ALIASES.items():
        if any(re.search(rf"(^|[/_.-]){n}([/_.-]|$)", rel.lower()) for n in names):
            return split
    return None


def _read_files(builder: str, data_files: dict[str, list[str]]) -> Any:
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=data_files)
    except Exception as e:
        raise QlabError(f"cannot read {builder} files {sorted(data_files)}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}") from None


def require_columns(ds: Any, columns: tuple[str, ...], source: str) -> Any:
    """Every split holds the columns a study reads, or one error naming the missing ones."""
    for split, d in ds.items():
        missing = [c for c in columns if c not in d.column_names]
        if missing:
            raise QlabError(f"{source}: split {split!r} lacks column(s) {', '.join(missing)} "
                            f"(has {', '.join(d.column_names)})")
    return ds


# ---------------------------------------------------------------- model folders

# The model types each role's studies are written for (a folder of another kind is one clear error).
ROLE_MODEL_TYPES = {
    "encoder": ("bert", "roberta", "distilbert", "albert", "electra", "xlm-roberta", "mpnet", "deberta",
                "deberta-v2"),
    "causal-lm": ("gpt2",),
    "llama-arch": ("llama",),
    "qwen-arch": ("qwen2", "llama"),
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json")


def check_model_folder(path: str | Path, role: str) -> Path:
    """A Hugging Face model folder of the kind `role` needs: config.json of a known type, weights, a tokenizer."""
    p = Path(path)
    cfg = p / "config.json"
    if not cfg.is_file():
        raise QlabError(f"{p} is not a Hugging Face model folder (no config.json)")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise QlabError(f"{cfg} is not valid JSON: {e}") from None
    allowed = ROLE_MODEL_TYPES.get(role)
    if allowed and model_type not in allowed:
        raise QlabError(f"{p} holds a {model_type!r} model; role {role!r} needs one of: {', '.join(allowed)}")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise QlabError(f"{p} has a config.json but no weights (*.safetensors)")
    if not any((p / f).is_file() for f in _TOKENIZER_FILES):
        raise QlabError(f"{p} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    return p


MODEL_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]


def _whole_model(p: Path) -> bool:
    """A cached snapshot with config, weights and tokenizer (not just a config.json another tool fetched)."""
    return (p / "config.json").is_file() and any(p.glob("*.safetensors")) and \
        any((p / f).is_file() for f in _TOKENIZER_FILES)


def model_snapshot(repo_id: str, role: str, offline_hint: str = "") -> Path:
    """A hub model's files (weights as safetensors, config, tokenizer), checked to be of the role's kind."""
    path = snapshot(repo_id, patterns=MODEL_PATTERNS, offline_hint=offline_hint, complete=_whole_model)
    return check_model_folder(path, role)


# ---------------------------------------------------------------- the hub models' true configs

# config.json of each hub model the `t4` profile uses, as published (the keys transformers reads). The memory
# predictions use them before anything is downloaded, and the tests' hub stand-in shrinks them.
HUB_MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "bert-base-uncased": {
        "architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1, "gradient_checkpointing": False,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02,
        "intermediate_size": 3072, "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert",
        "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0, "position_embedding_type": "absolute",
        "transformers_version": "4.6.0.dev0", "type_vocab_size": 2, "use_cache": True, "vocab_size": 30522},
    "gpt2": {
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
        "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": None,
        "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
        "summary_use_proj": True, "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
        "vocab_size": 50257},
    "meta-llama/Llama-2-7b-hf": {
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
        "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000},
    "Qwen/Qwen2.5-1.5B-Instruct": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
        "intermediate_size": 8960, "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2",
        "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936},
}

# config.json of the larger LLaMA-2s as published, for `plan --gpus` sizing only (no study loads them).
SIZING_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-2-13b-hf": {
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 5120, "initializer_range": 0.02, "intermediate_size": 13824, "max_position_embeddings": 4096,
        "model_type": "llama", "num_attention_heads": 40, "num_hidden_layers": 40, "num_key_value_heads": 40,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
        "torch_dtype": "float16", "transformers_version": "4.32.0.dev0", "use_cache": True, "vocab_size": 32000},
    "meta-llama/Llama-2-70b-hf": {
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 8192, "initializer_range": 0.02, "intermediate_size": 28672, "max_position_embeddings": 4096,
        "model_type": "llama", "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
        "torch_dtype": "float16", "transformers_version": "4.32.0.dev0", "use_cache": True, "vocab_size": 32000},
}


def model_config(repo_or_path: str) -> Any:
    """A transformers config: the true one of a known hub model (no download), or a local folder's."""
    from transformers import AutoConfig

    known = HUB_MODEL_CONFIGS | SIZING_CONFIGS
    if repo_or_path in known:
        doc = dict(known[repo_or_path])
        return AutoConfig.for_model(doc.pop("model_type"), **doc)
    return AutoConfig.from_pretrained(repo_or_path)
