"""Small causal LMs pretrained here, for the roles no package ships real weights for (GPT-2, LLaMA, Qwen2).

Why our own: no installable package carries GPT-2 (or a licensed Qwen2) checkpoint, and nothing can
come from the hub at run time. So qlib trains the true architecture, scaled down, on real text (the
standard library's functions, the CodeSearchNet-Python stand-in), with a byte-level BPE tokenizer
trained on the same training split. Same spec -> same weights: the result is cached under
`cache_dir()/models/<name>-<hash>/` keyed by the spec, the corpus and this file's version.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from qlib.core.device import set_seed
from qlib.core.errors import QlabError
from qlib.core.io import atomic_dir
from qlib.core.paths import cache_dir
from qlib.corpus import load_code_corpus, split_by_module
from qlib.metrics import perplexity

VERSION = 1  # bump when the recipe changes: old caches are then ignored, not reused


@dataclass(frozen=True)
class LMSpec:
    """Architecture and pretraining recipe of one qlib-pretrained causal LM."""

    arch: str                 # gpt2 | llama | qwen2
    vocab_size: int = 4096
    hidden: int = 256         # multiples of 32 (256 for GGUF k-quants / ternary types)
    layers: int = 4
    heads: int = 4
    intermediate: int = 768   # llama/qwen2 MLP width (gpt2 uses 4 x hidden)
    context: int = 128
    steps: int = 500
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    pre_tokenizer: str = "gpt-2"  # gpt-2 | qwen2: the splitting rules transformers applies to this architecture


LM_SPECS: dict[str, LMSpec] = {
    "gpt2-stdlib": LMSpec("gpt2"),
    "llama-stdlib": LMSpec("llama"),
    "qwen2-stdlib": LMSpec("qwen2", pre_tokenizer="qwen2"),
    # smoke-profile sizes: seconds to train, every code path still real
    # 256 wide: llama.cpp's ternary types (TQ1_0/TQ2_0) need rows that are multiples of 256
    "gpt2-stdlib-tiny": LMSpec("gpt2", vocab_size=512, hidden=256, layers=2, heads=4,
                               context=128, steps=30, batch_size=8),
    "llama-stdlib-tiny": LMSpec("llama", vocab_size=512, hidden=64, layers=2, heads=2,
                                intermediate=128, context=64, steps=30, batch_size=8),
    "qwen2-stdlib-tiny": LMSpec("qwen2", vocab_size=512, hidden=64, layers=2, heads=2,
                                intermediate=128, context=64, steps=30, batch_size=8, pre_tokenizer="qwen2"),
}
# transformers 5 picks the tokenizer class from config.json's model_type and applies that class's splitting
# rules whatever tokenizer.json says: a Qwen2 model is read with Qwen2's regex (and NFC), so its BPE is trained
# with those rules, and llama.cpp is told "qwen2"; the three runtimes then agree (tested).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def model_config(spec: LMSpec, vocab_size: int | None = None) -> Any:
    """The transformers config of the true architecture at this spec's size."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    v = vocab_size or spec.vocab_size
    if spec.arch == "gpt2":
        return GPT2Config(vocab_size=v, n_positions=spec.context, n_embd=spec.hidden,
                          n_layer=spec.layers, n_head=spec.heads, bos_token_id=0, eos_token_id=0)
    common = dict(vocab_size=v, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                  num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                  num_key_value_heads=spec.heads, max_position_embeddings=spec.context,
                  bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    if spec.arch == "llama":
        return LlamaConfig(**common)
    if spec.arch == "qwen2":
        return Qwen2Config(**common)
    raise QlabError(f"unknown architecture {spec.arch!r}; valid: gpt2, llama, qwen2")


def train_tokenizer(texts: list[str], vocab_size: int, pre_tokenizer: str = "gpt-2") -> Any:
    """Byte-level BPE on the training texts (GPT-2's scheme at a CPU-sized vocab, split by GPT-2's or Qwen2's
    rules), as a HF fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if pre_tokenizer == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre_tokenizer == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        raise QlabError(f"unknown pre-tokenizer {pre_tokenizer!r}; valid: gpt-2, qwen2")
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def gguf_pre_tokenizer(model_dir: str | Path) -> str | None:
    """llama.cpp's pre-tokenizer name for a qlib-pretrained model's tokenizer (None for any other model: the
    converter recognises real tokenizers by their hash)."""
    meta = Path(model_dir) / "qlab.json"
    if not meta.is_file():
        return None
    spec = json.loads(meta.read_text()).get("spec")
    return spec.get("pre_tokenizer", "gpt-2") if spec else None


def encode_corpus(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """One long stream of token ids, documents separated by the end-of-text token."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for t in texts:
        ids += tokenizer(t)["input_ids"] + [eos]
    return torch.tensor(ids, dtype=torch.long)


def _fingerprint(spec: LMSpec, texts: list[str]) -> str:
    fields = asdict(spec)
    if fields["pre_tokenizer"] == "gpt-2":
        del fields["pre_tokenizer"]  # the original recipe: caches made before the field existed stay valid
    h = hashlib.sha256(json.dumps({"v": VERSION, **fields}, sort_keys=True).encode())
    for t in texts:
        h.update(t.encode())
    return h.hexdigest()[:12]


def _train(model: torch.nn.Module, stream: torch.Tensor, spec: LMSpec, desc: str) -> list[float]:
    """Random contiguous windows, AdamW with cosine decay: a plain nanoGPT-style loop."""
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.steps,
                                                pct_start=0.1, anneal_strategy="cos")
    model.train()
    losses = []
    for _ in (bar := tqdm(range(spec.steps), desc=desc)):
        starts = torch.randint(0, stream.numel() - spec.context - 1, (spec.batch_size,), generator=gen)
        x = torch.stack([stream[s:s + spec.context] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return losses


def pretrained_lm(name: str, cache: Path | None = None) -> Path:
    """Folder of the cached qlib-pretrained LM `name` (trained now, once, if missing)."""
    from transformers import AutoModelForCausalLM

    if name not in LM_SPECS:
        raise QlabError(f"unknown pretrained-here model {name!r}; valid: {', '.join(LM_SPECS)}")
    spec = LM_SPECS[name]
    train_f, eval_f = split_by_module(load_code_corpus())
    texts = [f.code for f in train_f]
    dest = (cache or cache_dir() / "models") / f"{name}-{_fingerprint(spec, texts)}"
    if (dest / "model.safetensors").is_file():
        return dest
    set_seed(spec.seed)
    t0 = time.perf_counter()
    tok = train_tokenizer(texts, spec.vocab_size, spec.pre_tokenizer)
    stream = encode_corpus(tok, texts)
    model = AutoModelForCausalLM.from_config(model_config(spec, len(tok)))
    losses = _train(model, stream, spec, desc=f"pretraining {name} (cached after this run)")
    held = encode_corpus(tok, [f.code for f in eval_f])[: 64 * spec.context]
    ppl = perplexity(model.eval(), held, spec.context, spec.context)
    meta = {"name": name, "spec": asdict(spec), "version": VERSION, "corpus": "python-stdlib-functions",
            "train_functions": len(texts), "train_tokens": stream.numel(), "final_loss": losses[-1],
            "heldout": ppl, "train_time_s": time.perf_counter() - t0, "torch": torch.__version__}
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "qlab.json").write_text(json.dumps(meta, indent=2))
    return dest
