"""A hub-faithful stand-in for the `t4` profile's Hugging Face repos, built offline in seconds.

What a Colab user's `t4` run downloads, at tiny sizes, where `huggingface_hub` looks for it:
- the Hugging Face cache layout (`models--org--name/refs/main`, `snapshots/<revision>/...`; datasets under
  `datasets--org--name`, at the revision qlab pins);
- each model's true config.json (`qlib.hub.HUB_MODEL_CONFIGS`) with only the sizes shrunk (hidden 64, two
  layers: multiples of 64, which bitsandbytes' CPU 4-bit path needs), the real vocabulary size, random
  weights in the repo's dtype (Llama-2 sharded with an index, as published);
- each family's real tokenizer, rebuilt from llama.cpp's vocabulary files (`models/ggml-vocab-*.gguf` in the
  llama-cpp-python source archive the set-up downloads) and checked against their test vectors;
- the datasets' files with their true features, config folders and split names, a few hundred rows each of
  real text (the MR sentences for SST-2, stdlib functions for CodeSearchNet, stdlib cloze questions for SQuAD).
Nothing here is a result: the stand-in proves the t4 code path, not the numbers of a t4 run.
"""
from __future__ import annotations

import hashlib
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

VOCABS = {"bert-base-uncased": "bert-bge", "gpt2": "gpt-2", "meta-llama/Llama-2-7b-hf": "llama-spm",
          "Qwen/Qwen2.5-1.5B-Instruct": "qwen2"}
TINY = {  # size keys only; every other key is the published config's
    "bert-base-uncased": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=2),
    "meta-llama/Llama-2-7b-hf": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, max_window_layers=2),
}
TEST_MARK = "\n__ggml_vocab_test__\n"
# Qwen2.5 added these after Qwen2's three (llama.cpp's qwen2 vocabulary predates them): 151,665 tokens in all
QWEN25_SPECIAL = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                  "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                  "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                  "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]


def _rev(name: str) -> str:
    """A stable fake commit sha per repo (the real ones are unknown offline, and nothing depends on them)."""
    return hashlib.sha1(f"qlab-standin:{name}".encode()).hexdigest()


def vocab_files(dest: Path) -> Path:
    """The four ggml-vocab files (+ test vectors) out of the llama-cpp-python sdist, once."""
    from qlib.backends.gguf import sdist

    dest.mkdir(parents=True, exist_ok=True)
    if all((dest / f"ggml-vocab-{v}.gguf").is_file() for v in VOCABS.values()):
        return dest
    with tarfile.open(sdist()) as tar:
        for m in tar.getmembers():
            name = Path(m.name).name
            if any(name.startswith(f"ggml-vocab-{v}.gguf") for v in VOCABS.values()):
                (dest / name).write_bytes(tar.extractfile(m).read())  # type: ignore[union-attr]
    return dest


def _reader(path: Path) -> Any:
    from qlib.backends.gguf import tools_dir

    sys.path.insert(0, str(tools_dir() / "gguf-py"))
    from gguf import GGUFReader

    return GGUFReader(str(path))


def _field(r: Any, key: str) -> Any:
    f = r.fields.get(key)
    if f is None:
        return None
    if len(f.data) == 1 and f.types[-1].name != "STRING":
        return f.parts[f.data[0]].tolist()[0]
    if f.types[0].name == "ARRAY":
        if f.types[-1].name == "STRING":
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    return bytes(f.parts[f.data[0]]).decode("utf-8")


def build_tokenizer(family: str, gguf_path: Path, out: Path) -> Any:
    """The family's Hugging Face tokenizer from llama.cpp's vocabulary file, saved into `out`."""
    r = _reader(gguf_path)
    tokens, types = _field(r, "tokenizer.ggml.tokens"), _field(r, "tokenizer.ggml.token_type")
    out.mkdir(parents=True, exist_ok=True)
    if family == "bert-bge":
        from transformers import BertTokenizer

        # llama.cpp stores WordPiece with a phantom space: "▁word" starts a word, a bare piece continues one
        vocab = [t if ty == 3 else (t[1:] if t.startswith("\u2581") else "##" + t) for t, ty in zip(tokens, types)]
        (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        tok = BertTokenizer.from_pretrained(out, do_lower_case=True, model_max_length=512)
    elif family in ("gpt-2", "qwen2"):
        from transformers import GPT2Tokenizer, Qwen2Tokenizer

        merges = _field(r, "tokenizer.ggml.merges")
        normal = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 1}
        (out / "vocab.json").write_text(json.dumps(normal, ensure_ascii=False), encoding="utf-8")
        (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        # the control tokens after the BPE vocabulary, without llama.cpp's [PADn] fillers up to the embedding size
        special = [t for t, ty in zip(tokens, types) if ty != 1 and not t.startswith("[PAD")]
        if family == "gpt-2":
            tok = GPT2Tokenizer.from_pretrained(out, model_max_length=1024)
        else:
            tok = Qwen2Tokenizer.from_pretrained(out, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                                                 pad_token="<|endoftext|>", model_max_length=131072)
            known = tok.get_vocab()
            tok.add_special_tokens({"additional_special_tokens":
                                    [t for t in special + QWEN25_SPECIAL if t not in known]})
    elif family == "llama-spm":
        tok = _llama_tokenizer(tokens, _field(r, "tokenizer.ggml.scores"), types, out)
    else:
        raise ValueError(family)
    tok.save_pretrained(out)
    return tok


def _llama_tokenizer(tokens: list[str], scores: list[float], types: list[int], out: Path) -> Any:
    """LLaMA-2's sentencepiece model (BPE, byte fallback, dummy prefix) rebuilt from its pieces and scores."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import LlamaTokenizer

    m = pb.ModelProto()
    for t, s, ty in zip(tokens, scores, types):
        p = m.pieces.add()
        p.piece, p.score, p.type = t, s, ty
    ts = m.trainer_spec
    ts.model_type, ts.vocab_size, ts.byte_fallback, ts.split_digits = pb.TrainerSpec.BPE, len(tokens), True, True
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = 0, 1, 2, -1
    ns = m.normalizer_spec
    ns.name, ns.add_dummy_prefix, ns.remove_extra_whitespaces, ns.escape_whitespaces = "identity", True, False, True
    (out / "tokenizer.model").write_bytes(m.SerializeToString())
    tok = LlamaTokenizer.from_pretrained(out, legacy=True, add_bos_token=True)
    # the published tokenizer.json's normalizer (sentencepiece's dummy prefix, spaces as ▁), no pre-tokenizer
    from tokenizers import normalizers

    tok.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                                             normalizers.Replace(" ", "\u2581")])
    tok.backend_tokenizer.pre_tokenizer = None
    return tok


def check_tokenizer(tok: Any, gguf_path: Path) -> tuple[int, int]:
    """How many of llama.cpp's test vectors (text -> ids) the tokenizer reproduces, of how many."""
    texts = gguf_path.with_suffix(".gguf.inp").read_text(encoding="utf-8").split(TEST_MARK)
    ids = gguf_path.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
    ok = sum(tok(t, add_special_tokens=False)["input_ids"] == [int(x) for x in o.split()]
             for t, o in zip(texts, ids))
    return ok, len(texts)


# ---------------------------------------------------------------- models

def _snapshot_dir(cache: Path, kind: str, repo: str, revision: str, ref: str | None = "main") -> Path:
    """`{kind}s--org--name/snapshots/<revision>/` (and refs/<ref> naming it), as huggingface_hub lays it out."""
    root = cache / f"{kind}s--{repo.replace('/', '--')}"
    if ref:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(revision)
    snap = root / "snapshots" / revision
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def build_model(repo: str, snap: Path, vocab_dir: Path, seed: int = 0) -> None:
    """The repo's true config with tiny sizes, random weights in its dtype (sharded like Llama-2), its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, BertForMaskedLM

    from qlib.hub import HUB_MODEL_CONFIGS

    doc = {**HUB_MODEL_CONFIGS[repo], **TINY[repo]}
    config = AutoConfig.for_model(doc["model_type"], **{k: v for k, v in doc.items() if k != "model_type"})
    torch.manual_seed(seed)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(doc.get("torch_dtype"), torch.float32)
    model = BertForMaskedLM(config) if doc["model_type"] == "bert" else AutoModelForCausalLM.from_config(config)
    shard = "2MB" if repo.startswith("meta-llama/") else "10GB"  # Llama-2 is published sharded, with an index
    model.to(dtype).save_pretrained(snap, max_shard_size=shard)
    (snap / "config.json").write_text(json.dumps(doc, indent=2))  # the published keys, not a re-serialisation
    fam = VOCABS[repo]
    build_tokenizer(fam, vocab_dir / f"ggml-vocab-{fam}.gguf", snap)


# ---------------------------------------------------------------- datasets

def _sst2(rows: int = 300) -> dict[str, Any]:
    """SST-2's features and splits over real movie-review sentences (MR, the corpus SST-2 was built from)."""
    import datasets

    from qlib.assets import mr_polarity_csv
    from qlib.data import read_mr_polarity

    rows_ = read_mr_polarity(mr_polarity_csv())
    pos, neg = [r for r in rows_ if r[1] == 1], [r for r in rows_ if r[1] == 0]
    mr = [r for pair in zip(pos, neg) for r in pair]  # both classes in every split (the csv is grouped by label)
    feats = datasets.Features({"idx": datasets.Value("int32"), "sentence": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["negative", "positive"])})
    parts = {"train": mr[:rows], "validation": mr[rows: rows + 100], "test": mr[rows + 100: rows + 150]}
    return {split: datasets.Dataset.from_dict(
        {"idx": list(range(len(p))), "sentence": [t for t, _ in p],
         "label": [y if split != "test" else -1 for _, y in p]},  # SST-2 hides its test labels
        features=feats if split != "test" else datasets.Features({**feats, "label": datasets.Value("int64")}))
        for split, p in parts.items()}


def _code_search_net(rows: int = 300) -> dict[str, Any]:
    """CodeSearchNet's python features over real stdlib functions (split by module, as CSN splits by repo)."""
    import datasets

    from qlib.corpus import load_code_corpus, split_by_module

    train, held = split_by_module(load_code_corpus())
    seq = datasets.Sequence(datasets.Value("string"))
    feats = datasets.Features({k: datasets.Value("string") for k in (
        "repository_name", "func_path_in_repository", "func_name", "whole_func_string", "language",
        "func_code_string")} | {"func_code_tokens": seq, "func_documentation_string": datasets.Value("string"),
                                "func_documentation_tokens": seq, "split_name": datasets.Value("string"),
                                "func_code_url": datasets.Value("string")})

    def table(funcs: list, split: str) -> Any:
        return datasets.Dataset.from_dict({
            "repository_name": ["python/cpython"] * len(funcs),
            "func_path_in_repository": [f"Lib/{f.module.replace('.', '/')}.py" for f in funcs],
            "func_name": [f.name for f in funcs], "whole_func_string": [f.code for f in funcs],
            "language": ["python"] * len(funcs), "func_code_string": [f.code for f in funcs],
            "func_code_tokens": [f.code.split()[:64] for f in funcs],
            "func_documentation_string": [f.docstring for f in funcs],
            "func_documentation_tokens": [f.docstring.split()[:32] for f in funcs], "split_name": [split] * len(funcs),
            "func_code_url": [f"https://github.com/python/cpython/blob/main/Lib/{f.module}.py" for f in funcs]},
            features=feats)
    return {"train": table(train[:rows], "train"), "validation": table(held[:100], "valid"),
            "test": table(held[100:150], "test")}


def _squad(rows: int = 300) -> dict[str, Any]:
    """SQuAD's plain_text features (answers as text + answer_start lists) over the stdlib cloze questions."""
    import datasets

    from qlib.qa import load_stdlib_cloze

    train, held = load_stdlib_cloze()
    feats = datasets.Features({"id": datasets.Value("string"), "title": datasets.Value("string"),
                               "context": datasets.Value("string"), "question": datasets.Value("string"),
                               "answers": datasets.Sequence({"text": datasets.Value("string"),
                                                             "answer_start": datasets.Value("int32")})})

    def table(exs: list) -> Any:
        return datasets.Dataset.from_dict({
            "id": [e.id for e in exs], "title": [e.id.rsplit(".", 1)[0] for e in exs],
            "context": [e.context for e in exs], "question": [e.question for e in exs],
            "answers": [{"text": [e.answer], "answer_start": [e.context.find(e.answer)]} for e in exs]},
            features=feats)
    return {"train": table(train[:rows]), "validation": table(held[:100])}


DATASETS = {"stanfordnlp/sst2": _sst2, "code-search-net/code_search_net": _code_search_net,
            "rajpurkar/squad": _squad}


def build_dataset(repo: str, cache: Path) -> None:
    """The split tables written where qlib's pinned spec says they are, at its revision."""
    from qlib.hub import HUB_DATASETS

    spec = HUB_DATASETS[repo]
    ref = spec.revision if len(spec.revision) != 40 else None  # a pinned sha needs no ref
    snap = _snapshot_dir(cache, "dataset", repo, spec.revision if ref is None else _rev(repo), ref)
    for split, table in DATASETS[repo]().items():
        for rel in spec.files.get(split, ()) or [_other_split_path(spec, split)]:
            (snap / rel).parent.mkdir(parents=True, exist_ok=True)
            table.to_parquet(str(snap / rel))


def _other_split_path(spec: Any, split: str) -> str:
    """Where a split qlib does not read (test) sits, beside the validation file, named like it."""
    val = spec.files["validation"][0]
    return val.replace("validation", split)


# ---------------------------------------------------------------- the whole stand-in

def build_standin(root: Path, seed: int = 0) -> Path:
    """Every t4 repo (four models, three datasets) in a Hugging Face cache under `root`; returns the cache
    folder to point HF_HUB_CACHE at. Built once per `root` (a marker file names what was built)."""
    cache = root / "hub"
    marker = root / "standin.json"
    if marker.is_file():
        return cache
    vocab = vocab_files(root / "vocab")
    for repo in VOCABS:
        build_model(repo, _snapshot_dir(cache, "model", repo, _rev(repo)), vocab, seed)
    for repo in DATASETS:
        build_dataset(repo, cache)
    marker.write_text(json.dumps({"models": list(VOCABS), "datasets": list(DATASETS)}))
    return cache
