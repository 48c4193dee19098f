"""Study 08: a LoRA adapter on a LLaMA/Qwen2-architecture model, merged, then shipped as FP16, bitsandbytes
INT8/NF4 and GGUF F16/Q8_0/Q4_1/Q4_0/Q4_K_M/Q3_K_M, each reloaded and measured in its own runtime. The formats are
written and measured by `qlib.formats`, the same code as `python -m qlib formats`; the study adds the adapter, the
base before it in every format (how much of the fine-tune each format keeps) and its bar."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlib import (adapters, assets, budget, data, evalset, formats, hub, merge, metrics, models, ngram, pretrain,
                  results, runmeta)
from qlib.backends import gguf, llama_variants
from qlib.config import build_quantization_plan, make_config
from qlib.core.device import pick_device, set_seed
from qlib.core.errors import QlabError
from qlib.core.paths import outputs_dir
from qlib.studies import StudyResult, staged
from qlib.train import finetune

STUDY = "08_qwen_merge_gguf"
README = results.readme_block(
    published={"gguf_q4_0": "LLaMA-7B Q4_0: perplexity +4.2 % vs F16 (llama.cpp README quantization table, 2023)"})
# The bar, on SmolLM2-135M (llama.cpp, this CPU, one thread, interleaved repeats)
BAR = {"q4_0_decode_speedup_min": 1.8, "q8_0_perplexity_ratio_max": 1.005}
# llama.cpp's own figure for Q4_0 on LLaMA-7B (README "quantization" table, 2023): +4.2 % perplexity vs F16
REFERENCE_Q4_0_PPL_INCREASE = 0.042


# the asset role of each id parameter (`python -m qlib run` resolves a -p id before papermill starts)
ASSET_ROLES = {"model_id": "qwen-arch", "dataset_id": "code"}


@dataclass(frozen=True)
class Config:
    """Notebook 08's parameters."""

    profile: str = "default"
    seed: int = 0
    model_id: str = "smollm2-135m"
    dataset_id: str = "stdlib-code"
    adapter_dir: str | None = None   # a trained adapter to merge instead of training one here
    train_base: str = "fp32"         # fp32: plain LoRA | nf4: QLoRA (dequantize-then-merge)
    lora_rank: int = 16              # lora_r
    lora_alpha: int | None = None    # None: 2 x rank
    lora_targets: str = "attention+mlp"  # preset: attention (q/k/v/o_proj) | attention+mlp (+ gate/up/down_proj)
    lora_lr: float = 1e-3
    keep_lm_head_fp16: bool = True   # False: the NF4 base's head quantized too (untied heads only: refused here)
    optimizer: str = "adamw_torch"   # adamw_torch | paged_adamw_32bit | paged_adamw_8bit (bitsandbytes)
    steps: int = 30
    batch_size: int = 4
    gradient_checkpointing: bool = False  # recompute activations in backward (t4: a 1.5B model at 512 tokens)
    context: int = 256               # training window, and the perplexity window of every row (stride = window)
    train_tokens: int | None = 200_000
    eval_tokens: int = 4_096           # x 2 models x 9 formats: llama.cpp scores ~250 tokens/s here
    gguf_types: tuple[str, ...] = ("q8_0", "q4_1", "q4_0", "q4_k_m", "q3_k_m")  # q4_1: the grid control
    gen_tokens: int = 64
    latency_repeats: int = 3         # llama.cpp decodes interleaved; transformers decodes half as many tokens
    timing_threads: int = 1          # decode timed on one thread: spinning threads collapse on a busy 2-core machine
    llama_build: str = "best"        # llama.cpp's decode: "best" (this CPU's variant), "wheel" (AVX2), or a variant
    device: str = "auto"


PROFILES: dict[str, dict[str, Any]] = {
    "smoke": dict(model_id="qwen2-stdlib-tiny", train_base="nf4", lora_rank=4, steps=3, batch_size=4, context=64,
                  train_tokens=10_000, eval_tokens=1024, gguf_types=("q8_0", "q4_0"), gen_tokens=8,
                  latency_repeats=2, llama_build="wheel"),  # the tests never build the variants
    "default": {},
    # batch 4 x 512 with checkpointing: ~6 GiB predicted (8 x 512 without it: ~19 GiB, past a T4; 152k-token
    # logits alone take 2.3 GiB per fp32 copy at 8 x 512)
    "t4": dict(model_id="qwen2.5-1.5b-instruct", dataset_id="codesearchnet-python", train_base="nf4", steps=300,
               batch_size=4, gradient_checkpointing=True, lora_lr=2e-4, context=512, train_tokens=1_000_000,
               eval_tokens=32_768, llama_build="wheel"),  # no 5-15 min variant build on a Colab CPU
    "full": dict(eval_tokens=32_768),  # the whole shared set (config.FULL_STUDIES)
}


def config(profile: str = "default", **overrides: Any) -> Config:
    cfg = make_config(Config, PROFILES, profile, **overrides)
    knobs(cfg)  # a bad preset or optimizer: one line
    if cfg.train_base not in ("fp32", "nf4"):
        raise QlabError(f"unknown train_base {cfg.train_base!r}; valid: fp32, nf4")
    llama_variants.check_build(cfg.llama_build)
    return cfg


def knobs(cfg: Config) -> runmeta.LoraKnobs:
    """The adapter's recipe (08 always merges it: that is the study)."""
    return runmeta.LoraKnobs(r=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets,
                             keep_lm_head_fp16=cfg.keep_lm_head_fp16, merge_after_train=True,
                             gradient_checkpointing=cfg.gradient_checkpointing, optimizer=cfg.optimizer)


def train_adapter(cfg: Config, base: str, tok: Any, loader: Any, out: Path, device: torch.device,
                  info: runmeta.RunInfo) -> tuple[Path, dict[str, Any]]:
    """LoRA on the preset's projections of the (NF4 or FP32) base; the adapter folder (under its run name, with its
    metadata) and its training cost."""
    set_seed(cfg.seed)
    kbit, k = cfg.train_base == "nf4", knobs(cfg)
    method = "qlora" if kbit else "fp32"
    model = adapters.add_causal_lora(
        models.load_causal_lm(base, method if kbit else None, device, keep_lm_head=cfg.keep_lm_head_fp16),
        cfg.lora_rank, kbit, cfg.lora_targets, cfg.gradient_checkpointing, cfg.lora_alpha)
    with metrics.PeakMemory(device) as mem:
        tr = finetune(model, loader, cfg.steps / len(loader), cfg.lora_lr, device, weight_decay=0.0,
                      desc=f"LoRA r={cfg.lora_rank} on the {cfg.train_base} base", optimizer=cfg.optimizer)
    plan = build_quantization_plan(method, device, keep_lm_head=cfg.keep_lm_head_fp16)
    name = info.name("SFT", k.token(), method, plan.spec.weights_bits, runmeta.head_dtype(model))
    counts = metrics.param_counts(model)
    cost = {"train_time_s": tr.train_time_s, "train_steps": tr.steps, "peak_mem_bytes": mem.peak_bytes,
            "peak_mem_source": mem.source, "trainable_params": counts["trainable_params"],
            "peak_memory": mem.report()}
    path = adapters.save_adapter(model, tok, out / name,
                                 info.meta(name, plan, "adapter", runmeta.head_dtype(model), knobs=k, **cost))
    return path, {"losses": tr.losses, **cost,
                  "adapter_bytes": metrics.size_on_disk(path / "adapter_model.safetensors")}


@dataclass
class QwenMergeResult(StudyResult):
    losses: list[float]
    merge: merge.MergeInfo
    benchmark: dict[str, Any]
    tokenizer: dict[str, Any]


def plan(cfg: Config, model_config: Any, device: torch.device) -> list[budget.Prediction]:
    """The adapter's training run: LoRA on all seven projections of an NF4 (QLoRA) or fp32 base, AdamW."""
    method = "qlora" if cfg.train_base == "nf4" else "lora"
    compute = budget.compute_for(device)
    return [budget.predict(f"08 {method} r={cfg.lora_rank} on {cfg.model_id}, batch {cfg.batch_size} x {cfg.context}"
                           + (", checkpointing" if cfg.gradient_checkpointing else ""), model_config, method,
                           batch=cfg.batch_size, seq=cfg.context, steps=cfg.steps, compute=compute,
                           checkpointing=cfg.gradient_checkpointing, rank=cfg.lora_rank, lora_dropout=True)]


def gpu_predictions(profile: str) -> list[budget.Prediction]:
    """This profile's training runs as a T4 would run them, predicted from the hub's true config
    (the study contract)."""
    cfg = config(profile)
    return plan(cfg, budget.hub_config(cfg.model_id), budget.T4)


@staged(STUDY)
def run(cfg: Config) -> QwenMergeResult:
    """Train (or take) the adapter, merge; write the base and the merged model in every format, reload each in
    its own runtime, measure; decode speed on the merged model's artifacts."""
    device = pick_device(cfg.device)
    set_seed(cfg.seed)
    llama_build = llama_variants.resolve(cfg.llama_build)  # a variant this CPU cannot run: one line, before training
    su = setup(cfg)
    out = outputs_dir(STUDY, cfg.profile)
    info = runmeta.RunInfo(STUDY, cfg.profile, cfg.seed, su.asset.id, str(su.asset.path), su.data_asset.id)
    if not cfg.keep_lm_head_fp16:  # before any training: a tied head cannot be quantized
        models.require_untied_head(su.asset.path)
    sections = metrics.Sections()
    with sections("adapter"):
        adapter_dir, trained_on, train, gpu_plan = get_adapter(cfg, su, out, device, info)
    merged_dir = out / (adapter_dir.name + "_merged")
    with sections("merge"):
        mi = merge.merge_adapter(su.asset.path, adapter_dir, merged_dir, trained_on, su.eval_ids[:16],
                                 merge.merged_meta(adapter_dir, merged_dir.name, info, trained_on, device))
    text = formats.Text.of(su.eval_set, su.tok.eos_token_id, cfg.seed)
    with sections("base and merged in every format"):
        measured = measure_both(cfg, su, mi.path, text, out, device, info)
    merged_only = [m for m in measured if m.method in {method_name("merged")(f) for f in format_names(cfg)}]
    with sections("decode speed"):
        speeds = formats.decode(merged_only, text, device, cfg.gen_tokens, cfg.latency_repeats, cfg.timing_threads,
                                llama_build)
    with sections("count baselines"):
        measured += formats.count_baselines(evalset.training_tokens(su.tok, cfg.context, BASELINE_TOKENS),
                                            su.eval_ids, len(su.tok), cfg.context)
    files = {m.method: m.path for m in merged_only if m.backend == "llama.cpp"}
    tokenizer = gguf.tokenizer_agreement(files["gguf_f16"], su.tok, su.eval_texts[:64])
    rows = formats.rows(measured, speeds, merge.stored_params(mi.path), su.asset.id, evalset.DATASET_ID, cfg.context,
                        cfg.seed, reference=reference_of, fp16="merged_fp16",
                        extra={"merged_fp16": _training_cost(train)}, groups=text.groups)
    bench = benchmark(rows)
    results.write_per_example(STUDY, cfg.profile, "per_token_nll", {
        "token_id": su.eval_ids[ngram.scored_positions(su.eval_ids.numel(), cfg.context)].numpy(),
        "group": text.groups, **{m.method: m.nll for m in measured}})
    path = write_results(cfg, su, rows, measured, device, train, benchmark=bench, tokenizer_agreement=tokenizer,
                         adapter_kept=adapter_kept(measured, cfg, text.groups), eval_set=text.about,
                         gpu_plan=gpu_plan, merge={
                             "trained_on": mi.trained_on, "merge_base": mi.merge_base,
                             "max_abs_logit_diff_fp32": mi.max_abs_logit_diff_fp32,
                             "max_abs_logit_diff_fp16": mi.max_abs_logit_diff_fp16, "adapter": adapter_dir.name,
                             "merged": merged_dir.name}, section_seconds=sections.seconds)
    return QwenMergeResult(rows, results.load_metrics(path), path, train.get("losses", []), mi, bench, tokenizer)


BASELINE_TOKENS = 200_000  # the count baselines' fitting tokens (the shared set's domains' training texts)


@dataclass
class Setup:
    """The base model, its tokenizer, the adapter's training chunks and the scored windows (the shared set's first
    eval_tokens / context: held-out stdlib modules and BBC articles, whatever the training data)."""

    asset: Any
    tok: Any
    data_asset: Any
    eval_texts: list[str]
    eval_set: evalset.EvalSet
    train_chunks: torch.Tensor

    @property
    def eval_ids(self) -> torch.Tensor:
        return self.eval_set.ids.reshape(-1)


def setup(cfg: Config) -> Setup:
    from transformers import AutoTokenizer

    asset = assets.resolve_model("qwen-arch", cfg.model_id)
    merge.require_tokenizer(asset.path)
    tok = AutoTokenizer.from_pretrained(asset.path)
    train_texts, eval_texts, data_asset = data.load_code_sft(cfg.dataset_id)
    eval_set = evalset.scored(tok, cfg.context, cfg.eval_tokens)
    return Setup(asset, tok, data_asset, eval_texts, eval_set,
                 data.lm_chunks(tok, train_texts, cfg.context, cfg.train_tokens))


def get_adapter(cfg: Config, su: Setup, out: Path, device: torch.device, info: runmeta.RunInfo
                ) -> tuple[Path, str, dict[str, Any], Any]:
    """The user's adapter (`adapter_dir`), or one trained here after the memory prediction."""
    if cfg.adapter_dir:
        return Path(cfg.adapter_dir), merge.adapter_trained_on(cfg.adapter_dir, cfg.train_base), {}, None
    gpu_plan = budget.announce(plan(cfg, hub.model_config(su.asset.path), device), device) \
        if budget.wanted(cfg.profile, device) else None
    loader = data.lm_loader(su.train_chunks, cfg.batch_size, seed=cfg.seed)
    adapter_dir, train = train_adapter(cfg, su.asset.path, su.tok, loader, out, device, info)
    return adapter_dir, cfg.train_base, train, gpu_plan


def measure_both(cfg: Config, su: Setup, merged: Path, text: formats.Text, out: Path, device: torch.device,
                 info: runmeta.RunInfo) -> list[formats.Measured]:
    """The base and the merged model in every format, each reloaded in its runtime and scored on the same text."""
    measured, base = [], formats.fp16_model(su.asset.path, out / "base", info, su.tok)  # as `formats` starts
    for stage, src in (("base", base), ("merged", merged)):
        got = formats.measure(src, format_names(cfg), out, text, device, info, name=method_name(stage),
                              peft=knobs(cfg).token() if stage == "merged" else "none",  # the base: not fine-tuned
                              keep_lm_head=cfg.keep_lm_head_fp16,
                              pre_tokenizer=pretrain.gguf_pre_tokenizer(su.asset.path),
                              desc=f"formats ({stage})", stage=stage)
        if got.problems:  # study 08's model is chosen to make every format: a failure is a failure
            raise QlabError("; ".join(got.problems))
        measured += got.measured
    return measured


def write_results(cfg: Config, su: Setup, rows: list[dict[str, Any]], measured: list[formats.Measured],
                  device: torch.device, train: dict[str, Any], **extra: Any) -> Path:
    doc_assets = {"model": {"role": "qwen-arch", **su.asset.provenance()},
                  "data": {**su.data_asset.provenance(), "n_eval_tokens": int(su.eval_ids.numel())}}
    return results.write_metrics(
        STUDY, cfg.profile, cfg.seed, metrics.runtime_env(device), doc_assets, rows, config=asdict(cfg),
        peak_memory={"adapter": train["peak_memory"]} if train else None,
        training={k: v for k, v in train.items() if k not in ("losses", "peak_memory")} or None,
        definitions=DEFINITIONS,
        perplexity_window={"context": cfg.context, "stride": cfg.context, "scored_tokens": int(measured[0].nll.size),
                           "same windows in every row": True}, readme=README, **extra)


def adapter_kept(measured: list[formats.Measured], cfg: Config, groups: np.ndarray | None = None
                 ) -> dict[str, dict[str, Any]]:
    """Per merged format, how much of the adapter survives, each with a 95 % interval over whole units (`groups`,
    else windows): `in_format`, (NLL of the base in that format - NLL of the merged model in it) / (the same at FP16,
    same runtime); `vs_fp16_base`, (NLL of the FP16 base - NLL of the merged format) / (the same for the merged FP16):
    what a user who ships the merged format instead of the unquantized base keeps (1: all, 0: none, below 0: worse
    than no adapter); `ppl_vs_fp16_base`, the merged format's perplexity over the FP16 base's (`_real`: the interval
    excludes 1)."""
    by = {m.method: m for m in measured}
    boot = dict(block=cfg.context - 1, seed=cfg.seed, groups=groups)
    out = {}
    for m in measured:
        base = by.get("base" if m.method == "merged_fp16" else f"base_{m.method}")
        if base is None or m.backend == "counts":
            continue
        ref, ref_base = (by["merged_fp16"], by["base"]) if m.backend == "transformers" else \
            (by["gguf_f16"], by["base_gguf_f16"])
        gain = ref_base.nll - ref.nll
        row = _flat("in_format", metrics.bootstrap_ratio(base.nll - m.nll, gain, **boot))
        row |= _flat("vs_fp16_base", metrics.bootstrap_ratio(ref_base.nll - m.nll, gain, **boot))
        ppl = metrics.perplexity_ratio(ref_base.nll, m.nll, **boot)
        out[m.method] = row | _flat("ppl_vs_fp16_base", ppl) | {"ppl_vs_fp16_base_real": ppl["real"]}
    return out


def _flat(key: str, d: dict[str, Any]) -> dict[str, float]:
    return {key: d["ratio"], f"{key}_lo": d["lo"], f"{key}_hi": d["hi"]}


DEFINITIONS = {**formats.DEFINITIONS,
               "size_bytes": "the whole artifact a user loads: the GGUF file, or the folder's *.safetensors (no "
                             "adapter needed after the merge; tokenizer files excluded)"}


def format_names(cfg: Config) -> tuple[str, ...]:
    """The formats every model of the study is written in (`formats.measure`'s names)."""
    return ("fp16", "bnb_int8", "bnb_nf4", "gguf_f16", *(f"gguf_{t}" for t in cfg.gguf_types))


def method_name(stage: str) -> Callable[[str], str]:
    """A format's row name: the merged model's plain (its FP16 row `merged_fp16`), the base's prefixed `base_` (its
    FP16 row, the model as stored, `base`)."""
    if stage == "merged":
        return lambda f: "merged_fp16" if f == "fp16" else f
    return lambda f: "base" if f == "fp16" else f"base_{f}"


def _training_cost(train: dict[str, Any]) -> dict[str, Any]:
    """The adapter's cost, on the row it produced (the merged model's FP16)."""
    if not train:
        return {}
    return {"trainable_params": train["trainable_params"], "train_time_s": train["train_time_s"],
            "peak_mem_bytes": train["peak_mem_bytes"], "peak_mem_source": train["peak_mem_source"]}


def reference_of(m: formats.Measured) -> str | None:
    """What a row's perplexity is compared with: a format against the FP16 of its own model (base or merged) and
    runtime; each runtime's FP16 against transformers' (do the runtimes agree?); the model before the adapter
    and the count baselines against the merged model (what the adapter, and the network, are worth)."""
    if m.backend == "counts" or m.method == "base":
        return "merged_fp16"
    stage = "base" if m.method.startswith("base") else "merged"
    fp16 = {"base": "base", "merged": "merged_fp16"}[stage]
    if m.backend == "transformers" or m.method.endswith("gguf_f16"):
        return None if m.method == fp16 else fp16
    return "base_gguf_f16" if stage == "base" else "gguf_f16"


def benchmark(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's bar on SmolLM2-135M as shipped (the base): Q4_0 decode at least 1.8x F16 (llama.cpp, one thread),
    Q8_0 perplexity within 0.5 % of F16, the Q4_1 control within noise; the merged model's figures beside them."""
    by = {r["method"]: r for r in rows}
    ci = lambda r: [r["perplexity_ratio"], r["perplexity_ratio_lo"], r["perplexity_ratio_hi"]] if r else None  # noqa: E731
    q4, q8 = by.get("gguf_q4_0"), by.get("base_gguf_q8_0")
    if not (q4 and q8 and q4["decode_vs_fp16_same_runtime"]):
        return {"evaluated": False}
    out = {"evaluated": True, **BAR, "reference_q4_0_ppl_increase_llama7b": REFERENCE_Q4_0_PPL_INCREASE,
           "q4_0_decode_speedup": q4["decode_vs_fp16_same_runtime"],
           "q4_0_decode_speedup_lo": q4.get("decode_vs_fp16_same_runtime_lo"),
           "q4_0_decode_speedup_hi": q4.get("decode_vs_fp16_same_runtime_hi"), "q8_0_perplexity_ratio_base": ci(q8),
           "q8_0_perplexity_ratio_merged": ci(by.get("gguf_q8_0")), "q4_1_control_base": ci(by.get("base_gguf_q4_1")),
           "runtimes_agree_fp16": ci(by.get("base_gguf_f16"))}
    out["decode_ok"] = (out["q4_0_decode_speedup_lo"] or out["q4_0_decode_speedup"]) >= BAR["q4_0_decode_speedup_min"]
    out["q8_0_ok"] = q8["perplexity_ratio"] <= BAR["q8_0_perplexity_ratio_max"]
    q41 = by.get("base_gguf_q4_1")
    out["q4_1_control_within_noise"] = None if q41 is None else not q41["perplexity_ratio_real"]
    return out


def _pct(r: dict[str, Any] | None) -> str:
    if not r or r["perplexity_ratio"] is None:
        return "n/a"
    return (f"{100 * (r['perplexity_ratio'] - 1):+.2f} % [{100 * (r['perplexity_ratio_lo'] - 1):+.2f}, "
            f"{100 * (r['perplexity_ratio_hi'] - 1):+.2f}]" + ("" if r["perplexity_ratio_real"] else " (within noise)"))


def _ci(k: dict[str, Any], key: str, digits: int = 2) -> str:
    return f"{k[key]:.{digits}f} [{k[key + '_lo']:.{digits}f}, {k[key + '_hi']:.{digits}f}]"


def advice(kept: dict[str, dict[str, Any]]) -> list[str]:
    """What the intervals allow a user to conclude, against shipping the unquantized base without the adapter."""
    shipped = {m: k for m, k in kept.items() if m not in ("merged_fp16", "gguf_f16")}
    better = [m for m, k in shipped.items() if k["ppl_vs_fp16_base_hi"] < 1]
    unclear = [m for m, k in shipped.items() if k["ppl_vs_fp16_base_lo"] <= 1 <= k["ppl_vs_fp16_base_hi"]]
    worse = [m for m, k in shipped.items() if k["ppl_vs_fp16_base_lo"] > 1]
    tick = lambda ms: ", ".join(f"`{m}` ({_ci(shipped[m], 'ppl_vs_fp16_base', 3)})" for m in ms)  # noqa: E731
    out = []
    if better:
        out.append(f"- Better than shipping the FP16 base without the adapter (perplexity ratio to it, 95 % CI below "
                   f"1): {tick(better)}.")
    if unclear:
        out.append(f"- Not distinguishable from the FP16 base without the adapter (the interval holds 1): "
                   f"{tick(unclear)}: on these tokens the quantization costs about what the adapter gains.")
    if worse:
        out.append(f"- Worse than the FP16 base without the adapter: {tick(worse)}: ship this fine-tune in a wider "
                   "format than these.")
    return out


def findings(res: QwenMergeResult) -> str:
    """Markdown findings from this run's numbers; a difference is called real only when its interval excludes 0."""
    m, b, t = res.merge, res.benchmark, res.tokenizer
    by = {r["method"]: r for r in res.rows}
    kept = res.doc.get("adapter_kept", {})
    lines = [f"- Merge (`merge_and_unload` into the {m.merge_base} base): largest logit change "
             f"{m.max_abs_logit_diff_fp32:.1e} in FP32 and {m.max_abs_logit_diff_fp16:.1e} after rounding to FP16 "
             "(rounding, not a change of model).",
             f"- Tokenizers: transformers and llama.cpp give identical ids on {t['identical']} of {t['texts']} "
             "held-out texts." + ("" if t["identical"] == t["texts"] else " **They disagree**: llama.cpp users "
                                  "would feed this model other ids than it was fine-tuned and evaluated on."),
             f"- Runtimes agree at FP16: llama.cpp F16 vs transformers, base {_pct(by.get('base_gguf_f16'))}, merged "
             f"{_pct(by.get('gguf_f16'))}.",
             f"- The adapter: perplexity {by['base']['perplexity']:.2f} before, {by['merged_fp16']['perplexity']:.2f} "
             f"after; the model before it is {_pct(by['base'])} against the merged model."]
    if res.doc["merge"].get("adapter"):
        lines.append("- Artifacts under their run names with metadata beside each: "
                     f"adapter `{res.doc['merge']['adapter']}`, "
                     f"merged `{res.doc['merge']['merged']}`; the adapter's training peak: "
                     + results.peak_memory_text((res.doc.get("peak_memory") or {}).get("adapter")) + ".")
    floor = [by[k] for k in ("unigram", "bigram_kn") if k in by]
    if floor:
        lines.append("- Count baselines on the same tokens: " + ", ".join(
            f"{r['method']} {r['perplexity']:.1f}" for r in floor) + ".")
    lines.append("- Each shipped format (merged model): perplexity vs the FP16 of its runtime; the same format "
                 "applied to the base before the adapter; the share of the adapter's gain it keeps inside the format "
                 "and against the unquantized base (what a user shipping it instead of the FP16 base gets); decode:")
    for r in res.rows:
        if r["backend"] == "counts" or r["method"].startswith("base") or r["method"] in ("merged_fp16", "gguf_f16"):
            continue
        k = kept.get(r["method"])
        keep = (f"keeps {_ci(k, 'in_format')} of the adapter's gain inside the format, {_ci(k, 'vs_fp16_base')} "
                "against the FP16 base") if k else ""
        lines.append(f"  - `{r['method']}` ({r['backend']}; {r['size_bytes'] / 2**20:.1f} MiB, "
                     f"{r['bits_per_param']:.2f} "
                     f"bits/param, {r['bits_per_quantized_weight']:.2f} bits/quantized weight): {_pct(r)}; on the base "
                     f"{_pct(by.get('base_' + r['method']))}; {keep}; decode "
                     f"{results.times_interval(r, 'decode_vs_fp16_same_runtime')} FP16.")
    lines += advice(kept)
    if b.get("evaluated"):
        q8, q41 = b["q8_0_perplexity_ratio_base"], b.get("q4_1_control_base")
        q4 = results.times_interval({"x": b["q4_0_decode_speedup"], "x_lo": b.get("q4_0_decode_speedup_lo"),
                                     "x_hi": b.get("q4_0_decode_speedup_hi")}, "x")
        built = ", ".join(sorted({r["llama_build"] for r in res.rows if r.get("llama_build")})) or "unrecorded"
        lines.append(f"- Bar (the base model as loaded): Q4_0 decode {q4} F16 (llama.cpp's {built} build) "
                     f"({'meets' if b['decode_ok'] else 'misses'} 1.8x over the whole interval); "
                     f"Q8_0 perplexity {100 * (q8[0] - 1):+.2f} % "
                     f"[{100 * (q8[1] - 1):+.2f}, {100 * (q8[2] - 1):+.2f}] ({'within' if b['q8_0_ok'] else 'outside'} "
                     "0.5 %)"
                     + (f"; the Q4_1 control {100 * (q41[0] - 1):+.2f} % [{100 * (q41[1] - 1):+.2f}, "
                        f"{100 * (q41[2] - 1):+.2f}] "
                        f"({'within' if b['q4_1_control_within_noise'] else 'outside'} noise)"
                        if q41 else "")
                     + ". llama.cpp reports +4.2 % for Q4_0 on LLaMA-7B (a reference, not this run).")
    return "\n".join(lines)
