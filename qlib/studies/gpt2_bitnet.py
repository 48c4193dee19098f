"""Study 05: GPT-2 fine-tuned on Python code under six regimes (FP32, 8-bit, 4-bit, QLoRA, BitNet, QLoRA+BitNet)
and their controls (LoRA on the FP32 base beside QLoRA; the FP32 fine-tune rounded to ternary with no training
beside BitNet), every perplexity paired per token with an interval."""
from __future__ import annotations

import contextlib
import copy
import gc
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import save

from qlib import accounting, adapters, assets, budget, data, hub, methods, metrics, models, results, runmeta
from qlib.artifacts import TERNARY_FILE
from qlib.backends import bnb, gguf, llama_variants
from qlib.config import build_quantization_plan, make_config
from qlib.core.device import compute_dtype_name, pick_device, set_seed
from qlib.core.errors import QlabError
from qlib.core.io import atomic_dir, atomic_write_bytes
from qlib.core.paths import outputs_dir
from qlib.pretrain import LM_SPECS, model_config
from qlib.quant import bitnet, ladder
from qlib.studies import StudyResult, ptq_ladder, ptq_methods, staged
from qlib.train import TrainResult, finetune, seed_column, seeds

STUDY = "05_gpt2_bitnet"
GPT2_TARGETS = tuple(adapters.target_modules("gpt2", "attention+mlp"))  # every projection of a block
README = results.readme_block(
    published={"bitnet": "not comparable: Ma et al. 2024 train b1.58 from scratch and match FP16 perplexity from 3B "
                          "parameters up; this row fine-tunes a small model ternary for a few hundred steps"},
    gpu_pairs=[("qlora", "fp32"), ("bitnet", "fp32"), ("qlora_bitnet", "fp32")])


@dataclass(frozen=True)
class RegimeSpec:
    """How a regime is made: the method it loads with (`models.load_causal_lm`), from the pretrained base (task SFT:
    trained in this format) or from the FP32 fine-tune (PTQ: quantized after training), LoRA or not, its
    learning-rate knob ("" when it only quantizes), and the note its row carries."""

    method: str
    task: str = "SFT"
    lora: bool = False
    lr: str = "lr"
    note: str = ""


_FROZEN = ("evaluated only: bitsandbytes stores the quantized weights as frozen integer buffers, so full-parameter "
           "training of an 8-/4-bit base is impossible; this row is the FP32 fine-tune quantized after training")
REGIMES: dict[str, RegimeSpec] = {
    "fp32": RegimeSpec("fp32"),
    "int8": RegimeSpec("int8", "PTQ", lr="", note=_FROZEN),
    "nf4": RegimeSpec("nf4", "PTQ", lr="", note=_FROZEN),
    "lora": RegimeSpec("fp32", lora=True, lr="lora_lr"),
    "qlora": RegimeSpec("qlora", lora=True, lr="lora_lr"),
    "bitnet_ptq": RegimeSpec("bitnet", "PTQ", lr="", note="bitnet_ptq: the FP32 fine-tune rounded to ternary "
                             "(BitLinear: absmean weights, 8-bit activations) with no training, the control of "
                             "BitNet's training"),
    "bitnet": RegimeSpec("bitnet", lr="bitnet_lr"),
    "qlora_bitnet": RegimeSpec("qlora_bitnet", lora=True, lr="lora_lr"),
}
# each regime's control: the same training on a full-precision base, or the same format with no training
CONTROLS = {"qlora": "lora", "bitnet": "bitnet_ptq", "int8": "fp32", "nf4": "fp32"}


# the asset role of each id parameter (`python -m qlib run` resolves a -p id before papermill starts)
ASSET_ROLES = {"model_id": "causal-lm", "ladder_model_id": "llama-arch", "dataset_id": "code"}


@dataclass(frozen=True)
class Config:
    """Notebook 05's parameters."""

    profile: str = "default"
    seed: int = 0
    model_id: str = "gpt2-stdlib"
    dataset_id: str = "stdlib-code"
    regimes: tuple[str, ...] = tuple(REGIMES)
    context: int = 128
    stride: int = 64
    train_tokens: int | None = 400_000
    eval_tokens: int = 16_384
    steps: int = 100
    batch_size: int = 8
    lr: float = 3e-4             # full fine-tunes (fp32)
    bitnet_lr: float = 1e-3      # ternary training wants a larger step (BitNet b1.58 recipe)
    lora_rank: int = 16          # lora_r of the lora, qlora and qlora_bitnet regimes
    lora_alpha: int | None = None        # None: 2 x rank
    lora_targets: str = "attention+mlp"  # preset: attention (c_attn, attn.c_proj) | attention+mlp (+ c_fc, mlp.c_proj)
    lora_lr: float = 2e-3
    keep_lm_head_fp16: bool = True       # False: bitsandbytes quantizes the head too (GPT-2 ties it: refused)
    gradient_checkpointing: bool = False  # LoRA regimes
    optimizer: str = "adamw_torch"       # every trained regime: adamw_torch | paged_adamw_32bit | paged_adamw_8bit
    n_seeds: int = 3             # the trained regimes (and their controls) from seeds seed, seed+1, ...: mean ± sd
    gen_tokens: int = 32
    latency_repeats: int = 5
    gguf: bool = True            # export the BitNet model to GGUF (F32, TQ2_0, TQ1_0) and run it in llama.cpp
    llama_build: str = "best"    # llama.cpp's decode: "best" (this CPU's variant), "wheel" (AVX2), or a variant
    random_init: bool = False    # gpu profile: the true architecture, random weights, random tokens; quality null
    ladder_model_id: str | None = "smollm2-135m"  # post-training ladder on a real model (None: skip it)
    ladder_rungs: tuple[str, ...] = tuple(ladder.RUNGS)
    ladder_context: int = 256
    ladder_eval_tokens: int = 4_096    # the shared set's first 16 windows: the same as 06, 08 and `formats` score
    # registry methods on the ladder's model, each beside its round-to-nearest control (skipped with the ladder), and
    # the calibrated ones again per calibration setting: the main source at each other count of ladder_calib_samples,
    # and each other source of ladder_calib_sources at the main count
    # (3 bits too: GPTQ is the one method that helps there; 2 bits destroys a 135M model by every method, see the
    # `formats` methods run in docs/formats.md, so w2 is a `ladder_methods` away)
    ladder_methods: tuple[str, ...] = ("rtn_w4", "gptq_w4", "hqq_w4", "gguf_q4_0_imat", "gptq_w3", "hqq_w3")
    ladder_ablation: tuple[str, ...] = ("gguf_q4_0_imat", "gptq_w4")
    ladder_calib_samples: tuple[int, ...] = (128, 16)   # the first: the main setting's
    # calibration text, the first the main setting's: mixed (code and prose as the evaluation set mixes them, 3 : 1),
    # code (the stdlib train split) or prose (BBC News), always disjoint from the evaluated modules and articles
    ladder_calib_sources: tuple[str, ...] = ("mixed", "code", "prose")
    ladder_calib_length: int = 128
    ladder_methods_eval_tokens: int = 4_096
    device: str = "auto"


PROFILES: dict[str, dict[str, Any]] = {
    "smoke": dict(model_id="gpt2-stdlib-tiny", context=64, stride=32, train_tokens=20_000,
                  eval_tokens=1024, steps=3, batch_size=4, lora_rank=4, gen_tokens=4, latency_repeats=2, n_seeds=2,
                  ladder_model_id="llama-stdlib-tiny", ladder_context=64, ladder_eval_tokens=1024,
                  ladder_calib_samples=(16, 4), ladder_calib_length=64, ladder_methods_eval_tokens=512,
                  llama_build="wheel"),  # the tests never build the variants
    "default": {},
    "t4": dict(model_id="gpt2", dataset_id="codesearchnet-python", context=512, stride=256,
               train_tokens=4_000_000, eval_tokens=65_536, steps=1000, lr=5e-5, lora_lr=2e-4,
               llama_build="wheel"),  # no 5-15 min variant build on a Colab CPU
    "gpu": dict(model_id="gpt2", random_init=True, context=512, stride=512, steps=30, batch_size=8,
                eval_tokens=8192, gguf=False, gen_tokens=64, ladder_model_id=None),
    # the whole shared set for the ladder and the methods (config.FULL_STUDIES); the regimes as in default
    "full": dict(ladder_eval_tokens=32_768, ladder_methods_eval_tokens=32_768),
}


def config(profile: str = "default", **overrides: Any) -> Config:
    cfg = make_config(Config, PROFILES, profile, **overrides)
    knobs(cfg)  # a bad preset or optimizer: one line
    llama_variants.check_build(cfg.llama_build)
    if bad := [r for r in cfg.regimes if r not in REGIMES]:
        raise QlabError(f"unknown regime(s) {', '.join(bad)}; valid: {', '.join(REGIMES)}")
    first = cfg.regimes.index("fp32") if "fp32" in cfg.regimes else len(cfg.regimes)
    if early := [r for r in cfg.regimes[:first] if REGIMES[r].task == "PTQ"]:
        raise QlabError(f"regime(s) {', '.join(early)} quantize the fp32 fine-tune: put 'fp32' before them")
    if cfg.ladder_methods:
        methods.resolve(cfg.ladder_methods + cfg.ladder_ablation)  # an unknown name: one line listing the valid ones
        if not cfg.ladder_calib_samples or min(cfg.ladder_calib_samples) < 1 or cfg.ladder_calib_length < 16:
            raise QlabError("ladder_calib_samples must name at least one positive count and ladder_calib_length be "
                            f"at least 16, got {cfg.ladder_calib_samples} x {cfg.ladder_calib_length}")
        bad = [s for s in cfg.ladder_calib_sources if s not in ptq_methods.SOURCES]
        if bad or not cfg.ladder_calib_sources:
            raise QlabError(f"ladder_calib_sources: unknown or no calibration source {bad}; valid: "
                            f"{', '.join(ptq_methods.SOURCES)}")
    return cfg


def knobs(cfg: Config) -> runmeta.LoraKnobs:
    return runmeta.LoraKnobs(r=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets,
                             keep_lm_head_fp16=cfg.keep_lm_head_fp16,
                             gradient_checkpointing=cfg.gradient_checkpointing, optimizer=cfg.optimizer)


def run_of(regime: str, cfg: Config, info: runmeta.RunInfo) -> tuple[str, str]:
    """A regime's run name and method (every head stays fp32 here: GPT-2 ties it to the embeddings)."""
    spec = REGIMES[regime]
    bits = build_quantization_plan(spec.method).spec.weights_bits
    return info.name(spec.task, knobs(cfg).token() if spec.lora else "full", spec.method, bits, "fp32"), spec.method


@dataclass
class Regime:
    """One regime's trained model and what its training cost."""

    name: str
    model: Any
    train: TrainResult | None = None
    train_mem: metrics.PeakMemory | None = None
    note: str = ""
    artifacts: dict[str, Path] = field(default_factory=dict)
    base_bytes: int = 0             # a frozen base shipped beside an adapter (as stored)


def _load(path: str, method: str | None, device: torch.device, cfg: Config) -> torch.nn.Module:
    """The folder as `method` makes it (bitsandbytes quantizes while loading), fp32 weights, autocast on CUDA."""
    return models.load_causal_lm(path, method, device, dtype=torch.float32, keep_lm_head=cfg.keep_lm_head_fp16)


def _lora(model: torch.nn.Module, cfg: Config, kbit: bool) -> Any:
    return adapters.add_causal_lora(model, cfg.lora_rank, kbit, cfg.lora_targets, cfg.gradient_checkpointing,
                                  cfg.lora_alpha)


def _train(name: str, model: Any, loader: Any, cfg: Config, lr: float, device: torch.device) -> Regime:
    """Every regime from the same seed and the same batches in the same order (the loader's shuffle restarts)."""
    set_seed(cfg.seed)
    if getattr(loader, "generator", None) is not None:
        loader.generator.manual_seed(cfg.seed)
    with metrics.PeakMemory(device) as mem:
        tr = finetune(model, loader, cfg.steps / len(loader), lr, device, weight_decay=0.0,
                      desc=f"{name}: fine-tune", optimizer=cfg.optimizer)
    return Regime(name, model, tr, mem)


def build_regimes(cfg: Config, base: str, loader: Any, out: Path, device: torch.device,
                  info: runmeta.RunInfo) -> Iterator[Regime]:
    """Train (or, where training is impossible, only quantize) each regime from the same base, one at a time:
    the caller measures each and lets it go before the next loads, so on CUDA no regime's peak memory
    (`max_memory_allocated`) includes another regime's weights. The FP32 fine-tune is saved at once under its run
    name: the PTQ regimes start from it."""
    fp32_dir = out / run_of("fp32", cfg, info)[0]
    for name in cfg.regimes:
        spec = REGIMES[name]
        model = _load(str(fp32_dir) if spec.task == "PTQ" else base, spec.method, device, cfg)
        if spec.lora:
            model = _lora(model, cfg, kbit=spec.method == "qlora")
        r = _train(name, model, loader, cfg, getattr(cfg, spec.lr), device) if spec.lr else \
            Regime(name, model, note=spec.note)
        if name == "fp32":
            with atomic_dir(fp32_dir) as tmp:
                r.model.save_pretrained(tmp)
                runmeta.write_meta(tmp, _meta(r, cfg, info, fp32_dir.name, "fp32", "model"))
        if name == "lora":  # the FP32 base ships beside the adapter
            r.base_bytes = metrics.size_on_disk(Path(base) / "model.safetensors")
        r.model.eval()
        yield r
        r = model = None  # the caller holds the only reference now


def _meta(r: Regime, cfg: Config, info: runmeta.RunInfo, name: str, method: str, artifact: str,
          **extra: Any) -> dict[str, Any]:
    """A regime's metadata: its plan (the head kept or not), the LoRA knobs where it trains an adapter, what its
    training cost (the peak-memory report)."""
    plan = build_quantization_plan(method, keep_lm_head=cfg.keep_lm_head_fp16)
    return info.meta(name, plan, artifact, runmeta.head_dtype(r.model),
                     knobs=knobs(cfg) if REGIMES[r.name].lora else None,
                     regime=r.name, trained=r.train is not None, train_steps=r.train.steps if r.train else None,
                     peak_memory=r.train_mem.report() if r.train_mem else None, **extra)


PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json", "README.md")  # what peft's save_pretrained writes


def save_artifact(r: Regime, out: Path, cfg: Config, info: runmeta.RunInfo, base: str, device: torch.device
                  ) -> tuple[Path, int, float | None, dict[str, Any]]:
    """Store the regime as it would ship, under its run name with its metadata; the folder, bytes on disk (base +
    adapter where there is one), the bits per weight of its quantized layers, and extras."""
    name, method = run_of(r.name, cfg, info)
    d = out / name
    if r.name == "fp32":  # saved when it was trained
        return d, metrics.size_on_disk(d / "model.safetensors"), None, {}
    artifact = "adapter" if REGIMES[r.name].lora else "ternary" if method == "bitnet" else "model"
    with atomic_dir(d) as tmp:
        ternary = _write(r, tmp, base, device, cfg)
        runmeta.write_meta(tmp, _meta(r, cfg, info, name, method, artifact))
    return d, *_sizes(r, d, ternary)


def _write(r: Regime, tmp: Path, base: str, device: torch.device, cfg: Config) -> tuple[float, int, int] | None:
    """The regime's files into its (staging) folder: a bitsandbytes model, an adapter (with the frozen base it needs:
    NF4 as bitsandbytes stores it, or packed ternary), or the packed ternary model with its config. For the ternary
    ones: bits per packed block weight, ternary layers, block weights."""
    spec = REGIMES[r.name]
    if spec.method == "bitnet":
        r.model.config.save_pretrained(tmp)
        return _pack_ternary(r.model, tmp / TERNARY_FILE)[1:]
    r.model.save_pretrained(tmp)  # a bitsandbytes model as saved, or an adapter
    if spec.method == "qlora":  # the frozen NF4 base ships beside the adapter, as bitsandbytes stores it
        _load(base, "qlora", device, cfg).save_pretrained(tmp / "base-nf4")
    if spec.method == "qlora_bitnet":  # merged LoRA deltas would not be ternary: packed base and adapter ship apart
        return _pack_ternary(copy.deepcopy(r.model).unload(), tmp / "base-ternary.safetensors")[1:]
    return None


def _sizes(r: Regime, d: Path, ternary: tuple[float, int, int] | None) -> tuple[int, float | None, dict[str, Any]]:
    """Bytes a user loads (base + adapter where there is one), the stored bits per quantized weight (with the FP32
    adapter that must run beside a ternary base counted in: what the artifact needs), extras."""
    spec = REGIMES[r.name]
    if spec.method in ("int8", "nf4"):
        return metrics.size_on_disk(d / "model.safetensors"), bnb.stored_bits(r.model), {}
    if spec.method == "bitnet":
        return metrics.size_on_disk(d / TERNARY_FILE), ternary[0], {"ternary_layers": ternary[1]}
    adapter = sum(metrics.size_on_disk(d / f) for f in PEFT_FILES if (d / f).is_file())
    if spec.method == "qlora":
        return metrics.size_on_disk(d / "base-nf4" / "model.safetensors") + adapter, bnb.stored_bits(r.model), \
            {"adapter_bytes": adapter}
    if spec.method == "fp32":  # LoRA: the FP32 base as shipped + the adapter
        return r.base_bytes + adapter, None, {"adapter_bytes": adapter}
    return metrics.size_on_disk(d / "base-ternary.safetensors") + adapter, ternary[0] + 8 * adapter / ternary[2], \
        {"ternary_layers": ternary[1], "adapter_bytes": adapter, "ternary_bits_per_weight": ternary[0]}


def _pack_ternary(model: torch.nn.Module, path: Path) -> tuple[int, float, int, int]:
    """Freeze a copy to TernaryLinear, pack its codes base-3, save; bytes, bits per block weight, layers, weights."""
    frozen = copy.deepcopy(model)
    n = bitnet.freeze_ternary(frozen)
    state = bitnet.ternary_state(frozen)
    atomic_write_bytes(path, save(state))
    codes = sum(v.numel() for k, v in state.items() if k.endswith("codes_base3"))
    weights = sum(m.codes.numel() for m in frozen.modules() if isinstance(m, bitnet.TernaryLinear))
    return metrics.size_on_disk(path), codes * 8 / weights, n, weights


def export_ternary_hf(model: torch.nn.Module, tok: Any, out: Path, meta: dict[str, Any] | None = None) -> Path:
    """The trained BitNet as a plain HF GPT-2 folder: each BitLinear's weight = codes x scale, written
    back in Conv1D layout (in x out), so llama.cpp's converter reads it like any GPT-2."""
    from transformers import GPT2LMHeadModel

    plain = GPT2LMHeadModel(model.config)
    state = {}
    for name, mod in model.named_modules():
        if isinstance(mod, bitnet.BitLinear):
            codes, scale = bitnet.quantize_weights(mod.weight.detach())
            state[f"{name}.weight"] = (codes * scale).t().contiguous()
            state[f"{name}.bias"] = mod.bias.detach()
    for key, t in model.state_dict().items():
        state.setdefault(key, t)
    plain.load_state_dict(state)
    with atomic_dir(out) as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if meta is not None:
            runmeta.write_meta(tmp, meta)
    return out


def gguf_rows(r: Regime, tok: Any, eval_ids: torch.Tensor, prompt: list[int], cfg: Config,
              out: Path, pretokenizer_is_gpt2: bool, info: runmeta.RunInfo,
              build: str = llama_variants.WHEEL) -> tuple[list[dict], dict]:
    """BitNet -> GGUF F16 / TQ2_0 / TQ1_0 with llama.cpp's converter (rows `bitnet_gguf_*`: the ternary-trained model
    in each file type, F16 the speed reference); perplexity and decode in llama.cpp. The dense export and each file
    under the BitNet run's name."""
    bit_name = run_of("bitnet", cfg, info)[0]
    hf = export_ternary_hf(r.model, tok, out / f"{bit_name}_dense",
                           _meta(r, cfg, info, f"{bit_name}_dense", "bitnet", "dense"))
    with torch.no_grad():
        torch_ppl = metrics.perplexity(r.model, eval_ids, cfg.context, cfg.context)["perplexity"]
    rows, types, paths = [], {}, {}
    n_params = metrics.param_counts(r.model)["total_params"]
    for outtype in ("f16", "tq2_0", "tq1_0"):
        path = gguf.convert(hf, out / f".bitnet-{outtype}.gguf", outtype,
                            pre_tokenizer="gpt-2" if pretokenizer_is_gpt2 else None)
        path = gguf.ship(path, info, "SFT", "full", outtype, regime="bitnet", source=hf.name)
        kinds = gguf.tensor_types(path)
        types[outtype] = {k: sum(v == k for v in kinds.values()) for k in sorted(set(kinds.values()))}
        with metrics.PeakMemory("cpu") as mem:
            ppl = gguf.perplexity(path, eval_ids.tolist(), cfg.context)
        size, paths[f"bitnet_gguf_{outtype}"] = metrics.size_on_disk(path), path
        rows.append(results.make_row(
            f"bitnet_gguf_{outtype}", model=info.base_model, dataset=info.dataset, perplexity=ppl["perplexity"],
            size_bytes=size, bits_per_param=metrics.bits_per_param(size, n_params),
            inference_peak_mem_bytes=mem.peak_bytes, peak_mem_source=mem.source, total_params=n_params,
            trainable_params=0, backend="llama.cpp", tensor_types=types[outtype], timing_threads=1,
            torch_bitnet_perplexity_same_windows=torch_ppl, artifact=path.name))
    speeds = llama_variants.decode_speeds(paths, prompt, cfg.gen_tokens, repeats=cfg.latency_repeats, build=build)
    load = metrics.load_average()
    for row in rows:
        row["load_avg_1m"], row["llama_build"] = load, build
        row["tokens_per_s"], row["decode_repeat_s"] = speeds[row["method"]]["tokens_per_s"], \
            speeds[row["method"]]["repeat_s"]
    return rows, types


@dataclass
class GPT2Result(StudyResult):
    losses: dict[str, list[float]]
    packed_identical: bool | None


@dataclass
class Setup:
    """What every regime starts from: the base model folder, its tokenizer (None on random init), the token streams."""

    asset: assets.Resolved
    base: str
    tok: Any
    eos: int
    chunks: torch.Tensor      # training windows
    eval_ids: torch.Tensor    # held-out tokens
    data_asset: assets.Resolved


def real_setup(cfg: Config) -> Setup:
    """The profile's pretrained base and its code text, tokenized into training windows and held-out tokens."""
    from transformers import AutoTokenizer

    asset = assets.resolve_model("causal-lm", cfg.model_id)
    tok = AutoTokenizer.from_pretrained(asset.path)
    train_texts, eval_texts, data_asset = data.load_code_sft(cfg.dataset_id)
    chunks = data.lm_chunks(tok, train_texts, cfg.context, cfg.train_tokens)
    eval_ids = data.lm_chunks(tok, eval_texts, cfg.context, cfg.eval_tokens).reshape(-1)[: cfg.eval_tokens]
    return Setup(asset, str(asset.path), tok, tok.eos_token_id, chunks, eval_ids, data_asset)


def random_init_setup(cfg: Config, out: Path) -> Setup:
    """The true architecture with random weights, saved once (bitsandbytes quantizes from a folder), and
    random token batches: memory and speed do not depend on the values, quality is not measured."""
    from transformers import GPT2Config as HFGPT2Config
    from transformers import GPT2LMHeadModel

    asset = assets.resolve_model("causal-lm", cfg.model_id, random_init=True)
    arch = model_config(LM_SPECS[cfg.model_id]) if cfg.model_id in LM_SPECS else HFGPT2Config()
    arch.n_positions = max(arch.n_positions, cfg.context)
    base = models.save_random_init(out / f"random-init-{cfg.model_id.replace('/', '_')}",
                                   lambda: GPT2LMHeadModel(arch), cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    chunks = torch.randint(0, arch.vocab_size, (cfg.steps * cfg.batch_size, cfg.context), generator=gen)
    eval_ids = torch.randint(0, arch.vocab_size, (cfg.eval_tokens,), generator=gen)
    return Setup(asset, str(base), None, arch.eos_token_id, chunks, eval_ids,
                 assets.Resolved("causal-lm-data", "random tokens", "torch.randint"))


def plan(cfg: Config, model_config: Any, device: torch.device) -> list[budget.Prediction]:
    """The regimes that train: FP32 and BitNet full fine-tunes (fp32 weights, autocast, AdamW; BitLinear keeps
    a ternary fp32 copy of each weight for backward), LoRA and QLoRA. int8/nf4/bitnet_ptq only evaluate."""
    kw = dict(batch=cfg.batch_size, seq=cfg.context, steps=cfg.steps, compute=budget.compute_for(device))
    shape = f"batch {cfg.batch_size} x {cfg.context}"
    out = []
    if "fp32" in cfg.regimes:
        out.append(budget.predict(f"05 fp32 fine-tune of {cfg.model_id}, {shape}", model_config, "full", **kw))
    if "lora" in cfg.regimes:
        out.append(budget.predict(f"05 lora r={cfg.lora_rank} on the full-precision base, {shape}", model_config,
                                  "lora", rank=cfg.lora_rank, targets=GPT2_TARGETS,
                                  lora_dropout=True, **kw))
    if "qlora" in cfg.regimes:
        out.append(budget.predict(f"05 qlora r={cfg.lora_rank}, {shape}", model_config, "qlora", rank=cfg.lora_rank,
                                  targets=GPT2_TARGETS, lora_dropout=True, **kw))
    if "bitnet" in cfg.regimes:
        linears = accounting.params_by_kind(accounting.meta_model(model_config))["block_linears"]
        out.append(budget.predict(f"05 bitnet fine-tune, {shape}", model_config, "full",
                                  extra={"ternary_weight_copies": 4 * linears}, **kw))
    return out


def gpu_predictions(profile: str) -> list[budget.Prediction]:
    """This profile's training runs as a T4 would run them, predicted from the hub's true config
    (the study contract)."""
    cfg = config(profile)
    return plan(cfg, budget.hub_config(cfg.model_id), budget.T4)


@dataclass
class Tally:
    """What the regimes' loop gathers: rows, losses and per-token NLL by regime, peak-memory reports, and the models
    later steps reuse (the FP32 reference for decode speed, the BitNet regime for the GGUF rows)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    losses: dict[str, list[float]] = field(default_factory=dict)
    nll: dict[str, np.ndarray] = field(default_factory=dict)
    peak_memory: dict[str, Any] = field(default_factory=dict)
    identical: bool | None = None   # the packed ternary file reproduces BitNet's logits
    ref: Any = None
    bit: Regime | None = None
    emb: int = 0                    # embedding parameters (the GGUF rows' bits exclude them)


@staged(STUDY)
def run(cfg: Config) -> GPT2Result:
    """All regimes from one base on one split; perplexity, speed, memory, sizes; metrics.json."""
    device = pick_device(cfg.device, cfg.profile)
    set_seed(cfg.seed)
    build = llama_variants.resolve(cfg.llama_build) if cfg.gguf else llama_variants.WHEEL  # one line, before training
    out = outputs_dir(STUDY, cfg.profile)
    su = random_init_setup(cfg, out) if cfg.random_init else real_setup(cfg)
    prompt = su.eval_ids[:16].unsqueeze(0).to(device)
    gpu_plan = budget.announce(plan(cfg, hub.model_config(su.base), device), device) \
        if budget.wanted(cfg.profile, device) else None
    info = runmeta.RunInfo(STUDY, cfg.profile, cfg.seed, su.asset.id, su.base, su.data_asset.id)
    if not cfg.keep_lm_head_fp16:  # before any training: a tied head cannot be quantized
        models.require_untied_head(su.base)
    sections = metrics.Sections()
    with sections("regimes"):
        t = measure_regimes(cfg, su, prompt, out, device, info)
    with sections("seed replicas"):
        if not cfg.random_init:
            compare_regimes(cfg, su, t, out, device, info)
    with sections("gguf"):
        if cfg.gguf and t.bit is not None and su.tok is not None:  # random-init runs have no tokenizer to convert
            t.rows += gguf_rows(t.bit, su.tok, su.eval_ids, prompt[0].tolist(), cfg, out,
                                su.asset.source == "pretrained-here", info, build)[0]
    _gguf_speed_vs_f16(t.rows)
    real = cfg.ladder_model_id and not cfg.random_init
    with sections("post-training ladder"):
        ladder_doc = post_training_ladder(cfg, t, device) if real else None
    with sections("post-training methods and calibration ablation"):
        methods_doc = post_training_methods(cfg, t, device, out) if real and cfg.ladder_methods else None
    path = write_results(cfg, su, t, device, gpu_plan=gpu_plan, ladder=ladder_doc, methods=methods_doc,
                         section_seconds=sections.seconds)
    return GPT2Result(t.rows, results.load_metrics(path), path, t.losses, t.identical)


def measure_regimes(cfg: Config, su: Setup, prompt: torch.Tensor, out: Path, device: torch.device,
                    info: runmeta.RunInfo) -> Tally:
    """Train or quantize each regime in turn, score it, time it, save it; one row each."""
    t = Tally()
    loader = data.lm_loader(su.chunks, cfg.batch_size, seed=cfg.seed)
    for r in build_regimes(cfg, su.base, loader, out, device, info):
        with metrics.PeakMemory(device) as inf_mem, torch.no_grad():
            t.nll[r.name] = metrics.token_nll(r.model, su.eval_ids, cfg.context, cfg.stride, device).double().numpy()
        tps, speedup = _decode_vs_fp32(r, t.ref, prompt, su.eos, cfg, device)
        folder, size, stored_bits, extra = save_artifact(r, out, cfg, info, su.base, device)
        if r.train_mem:
            t.peak_memory[r.name] = r.train_mem.report()
        if r.name == "bitnet":
            t.identical = _check_unpacked(r.model, folder / TERNARY_FILE, su.eval_ids[:64])
        t.losses[r.name] = r.train.losses if r.train else []
        t.rows.append(_regime_row(r, cfg, su, float(np.exp(t.nll[r.name].mean())), size, stored_bits, tps, speedup,
                                  inf_mem, folder, device, extra))
        t.emb = t.emb or _embedding_params(r.model)
        _release(r, t, device)
    return t


def _regime_row(r: Regime, cfg: Config, su: Setup, ppl: float, size: int, stored_bits: float | None,
                tps: float | None, speedup: dict[str, Any] | None, inf_mem: metrics.PeakMemory, folder: Path,
                device: torch.device, extra: dict[str, Any]) -> dict[str, Any]:
    counts = metrics.param_counts(r.model)
    if r.train is None:
        counts["trainable_params"] = 0  # evaluated only
    tr = r.train
    row = results.make_row(
        r.name, model=su.asset.id, dataset=su.data_asset.id, size_bytes=size,
        perplexity=None if cfg.random_init else ppl,  # random weights: quality is not a number
        bits_per_param=metrics.bits_per_param(size, counts["total_params"]),
        quantized_bits_per_weight=stored_bits, tokens_per_s=tps,
        load_avg_1m=metrics.load_average(), timing_threads=metrics.TIMING_THREADS if device.type == "cpu" else None,
        peak_mem_bytes=r.train_mem.peak_bytes if r.train_mem else None,
        peak_mem_source=(r.train_mem or inf_mem).source, inference_peak_mem_bytes=inf_mem.peak_bytes,
        train_time_s=tr.train_time_s if tr else None, train_steps=tr.steps if tr else None,
        step_time_s=tr.median_step_s if tr else None, compute_dtype=compute_dtype_name(device),
        train_tokens_per_s=cfg.batch_size * cfg.context / tr.median_step_s if tr else None,
        note=r.note or None, layer_kinds=models.layer_kinds(r.model), artifact=folder.name, **counts, **extra)
    return metrics.with_difference(row, "speedup_vs_fp32", speedup, value="ratio")


def _release(r: Regime, t: Tally, device: torch.device) -> None:
    """Keep FP32 (every later regime decodes against it) and BitNet (the GGUF rows) on the CPU; drop the rest."""
    if r.name == "fp32":
        t.ref = r.model.to("cpu")
    if r.name == "bitnet":
        r.model, t.bit = r.model.to("cpu"), r
    else:
        r.model = None
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def compare_regimes(cfg: Config, su: Setup, t: Tally, out: Path, device: torch.device,
                    info: runmeta.RunInfo) -> None:
    """Paired intervals against FP32 and each control; the trained regimes again from more seeds."""
    paired_differences(t.rows, t.nll, cfg)
    replicas = {s: replicate(cfg, s, su.base, su.chunks, su.eval_ids, out, device, info)
                for s in seeds(cfg.seed, cfg.n_seeds)[1:]}
    seed_spread(t.rows, {cfg.seed: t.nll, **replicas})
    results.write_per_example(STUDY, cfg.profile, "regime_per_token_nll", {
        **t.nll, **{seed_column(k, s): v for s, r in replicas.items() for k, v in r.items()}})


def _gguf_speed_vs_f16(rows: list[dict[str, Any]]) -> None:
    """Speed ratios inside one runtime: each llama.cpp row against the F16 GGUF of the same model, interleaved."""
    f16 = next((x for x in rows if x["method"] == "bitnet_gguf_f16"), None)
    for x in rows:
        if x.get("backend") == "llama.cpp":
            metrics.with_difference(x, "decode_vs_fp16_same_runtime", metrics.speed_ratio(
                f16["decode_repeat_s"], x["decode_repeat_s"]) if f16 else None, value="ratio")
            x["speed_reference"] = "bitnet_gguf_f16"


def post_training_ladder(cfg: Config, t: Tally, device: torch.device) -> dict[str, Any]:
    """The real LM's round-to-nearest ladder (`ptq_ladder`): its rows into the tally, its description back."""
    lad = ptq_ladder.run_ladder(ptq_ladder.LadderSpec(
        cfg.ladder_model_id, cfg.dataset_id, cfg.ladder_rungs, cfg.ladder_context, cfg.ladder_eval_tokens,
        cfg.train_tokens or 200_000, cfg.seed), device)
    t.rows += lad.rows
    results.write_per_example(STUDY, cfg.profile, "ladder_per_token_nll", lad.nll)
    return {**lad.model, "context": cfg.ladder_context, "stride": cfg.ladder_context,
            "per_token_nll": "ladder_per_token_nll.csv.gz"}


def post_training_methods(cfg: Config, t: Tally, device: torch.device, out: Path) -> dict[str, Any]:
    """The registry's methods beside round-to-nearest on the real LM, and the calibration ablation."""
    spec = ptq_methods.MethodsSpec(cfg.ladder_model_id, cfg.dataset_id, cfg.ladder_methods, cfg.ladder_ablation,
                                   cfg.ladder_calib_samples, cfg.ladder_calib_length, cfg.ladder_context,
                                   cfg.ladder_methods_eval_tokens, cfg.seed, cfg.ladder_calib_sources)
    m = ptq_methods.run_methods(spec, device, out / "methods", STUDY, cfg.profile)
    t.rows += m.rows
    results.write_per_example(STUDY, cfg.profile, "methods_per_token_nll", {"group": m.groups, **m.nll})
    return {"calibration_settings": m.settings, "problems": m.problems, "eval_set": m.eval_set,
            "context": cfg.ladder_context, "per_token_nll": "methods_per_token_nll.csv.gz"}


def write_results(cfg: Config, su: Setup, t: Tally, device: torch.device, **sections: Any) -> Path:
    """metrics.json: the rows, where they came from, and each section's description."""
    doc_assets = {"model": {"role": "causal-lm", **su.asset.provenance()},
                  "data": {**su.data_asset.provenance(), "n_train_tokens": int(su.chunks.numel()),
                           "n_eval_tokens": int(su.eval_ids.numel())}}
    return results.write_metrics(STUDY, cfg.profile, cfg.seed, metrics.runtime_env(device), doc_assets, t.rows,
                                 config={**asdict(cfg), "regimes": list(cfg.regimes)},
                                 perplexity_window={"context": cfg.context, "stride": cfg.stride,
                                                    "gguf_rows": "llama.cpp, stride = context"},
                                 packed_ternary_identical_logits=t.identical, embedding_params=t.emb,
                                 peak_memory=t.peak_memory, readme=README, **sections)


def paired_differences(rows: list[dict[str, Any]], nll: dict[str, Any], cfg: Config) -> None:
    """Each regime's perplexity over the FP32 fine-tune's and over its control's (`CONTROLS`), on the same tokens,
    with the paired block-bootstrap interval (blocks of `stride` tokens: one window's new tokens)."""
    for row in rows:
        name = row["method"]
        for key, ref in (("perplexity_ratio_vs_fp32", "fp32"), ("perplexity_ratio_vs_control", CONTROLS.get(name))):
            d = metrics.perplexity_ratio(nll[ref], nll[name], cfg.stride, cfg.seed) \
                if ref in nll and ref != name else None
            metrics.with_difference(row, key, d, value="ratio")
        row["control"] = CONTROLS.get(name) if CONTROLS.get(name) in nll else None


SEEDED = ("fp32", "lora", "qlora", "bitnet_ptq", "bitnet", "qlora_bitnet")  # what a training seed changes


def replicate(cfg: Config, seed: int, base: str, chunks: Any, eval_ids: torch.Tensor, out: Path,
              device: torch.device, info: runmeta.RunInfo) -> dict[str, np.ndarray]:
    """The trained regimes (and the ternary control of the FP32 fine-tune) again from another seed (data order,
    adapter init): per-token losses on the same tokens. Their weights go to a temporary folder."""
    import dataclasses
    import tempfile

    c = dataclasses.replace(cfg, seed=seed, regimes=tuple(r for r in cfg.regimes if r in SEEDED))
    loader = data.lm_loader(chunks, cfg.batch_size, seed=seed)
    nll = {}
    with tempfile.TemporaryDirectory(dir=out, prefix=f".seed{seed}-") as tmp:
        for r in build_regimes(c, base, loader, Path(tmp), device, info):
            with torch.no_grad():
                nll[r.name] = metrics.token_nll(r.model, eval_ids, cfg.context, cfg.stride, device).double().numpy()
            r.model = None
    return nll


def seed_spread(rows: list[dict[str, Any]], nll: dict[int, dict[str, np.ndarray]]) -> None:
    """Per regime trained in every seed: perplexity and its ratios to fp32 and to its control, mean ± sd over seeds
    (each seed's regime against the same seed's reference)."""
    ppl = lambda x: float(np.exp(x.mean()))  # noqa: E731
    for row in rows:
        name, runs = row["method"], [n for n in nll.values() if row["method"] in n]
        if len(runs) < 2:
            continue
        metrics.with_seeds(row, "perplexity", [ppl(n[name]) for n in runs])
        for key, ref in (("perplexity_change_vs_fp32", "fp32"), ("perplexity_change_vs_control", CONTROLS.get(name))):
            if ref and ref != name and all(ref in n for n in runs):  # ratio - 1, seed by seed
                metrics.with_seeds(row, key, [float(np.expm1(n[name].mean() - n[ref].mean())) for n in runs])


def _decode_vs_fp32(r: Regime, ref: Any, prompt: torch.Tensor, eos: int, cfg: Config,
                    device: torch.device) -> tuple[float, dict[str, Any] | None]:
    """Decode tokens/s, and its ratio to the FP32 fine-tune decoded interleaved with it in the same repeats, with
    its interval over the repeats (the reference visits the GPU only while it is timed, so it never counts in
    another regime's memory)."""
    threads = metrics.torch_threads(metrics.TIMING_THREADS) if device.type == "cpu" else contextlib.nullcontext()
    if r.name == "fp32" or ref is None:  # one thread on a CPU: spinning threads collapse on a busy 2-core machine
        with threads:
            tps = metrics.decode_speed(r.model, prompt, cfg.gen_tokens, cfg.latency_repeats, eos, device)
        return tps, {"ratio": 1.0, "lo": 1.0, "hi": 1.0, "real": False} if r.name == "fp32" else None
    ref.to(device)
    try:
        with threads:
            s = metrics.decode_speeds({"x": r.model, "fp32": ref}, prompt, cfg.gen_tokens, cfg.latency_repeats, eos,
                                      device)
    finally:
        ref.to("cpu")
    return s["x"]["tokens_per_s"], metrics.speed_ratio(s["fp32"]["repeat_s"], s["x"]["repeat_s"], cfg.seed)


def _embedding_params(model: Any) -> int:
    """Token + position embeddings: what stays 16/32-bit whatever the blocks are quantized to."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))


def _check_unpacked(model: Any, path: Path, ids: torch.Tensor) -> bool:
    """Load the packed file into a fresh ternary skeleton: logits identical to the trained model's."""
    from safetensors.torch import load_file

    frozen = copy.deepcopy(model)
    bitnet.freeze_ternary(frozen)
    skeleton = copy.deepcopy(frozen)
    for m in skeleton.modules():
        if isinstance(m, bitnet.TernaryLinear):
            m.codes.zero_()
    bitnet.load_ternary_state(skeleton, load_file(path))
    x = ids.unsqueeze(0).to(next(model.parameters()).device)
    with torch.no_grad():
        return bool(torch.equal(skeleton(input_ids=x).logits, model(input_ids=x).logits))


def _ratio(row: dict[str, Any], key: str) -> str:
    """A perplexity ratio as a % change with its interval and verdict."""
    pct = lambda x: f"{100 * (x - 1):+.1f} %"  # noqa: E731
    return (f"{pct(row[key])} [{pct(row[key + '_lo'])}, {pct(row[key + '_hi'])}]"
            + ("" if row[key + "_real"] else ", within noise"))


def findings(res: GPT2Result) -> str:
    """Markdown findings from this run's numbers."""
    by = {r["method"]: r for r in res.rows}
    fp = by.get("fp32")
    lines = []
    for r in res.rows:
        if r.get("backend") == "llama.cpp" or r.get("section"):
            continue  # other windows (stride = context) or another model (ladder, methods): their own lines
        has_ppl = r["perplexity"] is not None
        rel = (f" ({_ratio(r, 'perplexity_ratio_vs_fp32')} vs fp32"
               + (f"; {_ratio(r, 'perplexity_ratio_vs_control')} vs its control `{r['control']}`"
                  if r.get("control") and r["control"] != "fp32" else "") + ")"
               if r.get("perplexity_ratio_vs_fp32") is not None else "")
        ppl = f"perplexity {r['perplexity']:.2f}{rel}" if has_ppl else "perplexity not measured (random init)"
        if r.get("perplexity_seed_mean") is not None:
            ppl += f"; over seeds {results.seed_spread_text(r, 'perplexity', fmt='.2f')}" + "".join(
                f", {lab} {results.seed_spread_text(r, key, 100, '+.1f', ' %')}" for key, lab in (
                    ("perplexity_change_vs_fp32", "vs fp32"), ("perplexity_change_vs_control", "vs its control"))
                if r.get(f"{key}_seed_mean") is not None)
        train = (f", trained {r['trainable_params']:,} of {r['total_params']:,} params in {r['train_time_s']:.1f} s "
                 f"({r['step_time_s'] * 1e3:.0f} ms/step median, peak {r['peak_mem_bytes'] / 2**20:,.0f} MiB "
                 f"{r['peak_mem_source']})" if r["train_time_s"] else ", not trained")
        qbits = (f" ({r['quantized_bits_per_weight']:.2f} in its quantized layers)"
                 if r.get("quantized_bits_per_weight") else "")
        lines.append(f"- `{r['method']}`: {ppl}; {r['size_bytes'] / 2**20:.2f} MiB "
                     f"stored = {r['bits_per_param']:.2f} bits/param over the whole model{qbits}; "
                     f"decode {r['tokens_per_s']:.0f} tok/s{train}.")
    if "bitnet" in by:
        lines.append(f"- The packed ternary BitNet (base-3, 1.6 bits per block weight) reloads with identical "
                     f"logits: {res.packed_identical}. In PyTorch BitLinear is fake quantization, so it decodes no "
                     "faster than FP32; the speed of ternary weights needs a ternary kernel (llama.cpp TQ1_0/TQ2_0).")
    g = {r["method"]: r for r in res.rows if r.get("backend") == "llama.cpp"}
    if "bitnet_gguf_tq2_0" in g and "bitnet_gguf_f16" in g:
        t2, t1, f = g["bitnet_gguf_tq2_0"], g.get("bitnet_gguf_tq1_0"), g["bitnet_gguf_f16"]
        lines.append(f"- llama.cpp, same BitNet weights: TQ2_0 perplexity {t2['perplexity']:.2f}, F16 GGUF "
                     f"{f['perplexity']:.2f}, PyTorch BitNet {t2['torch_bitnet_perplexity_same_windows']:.2f} on the "
                     "same windows (llama.cpp quantizes activations per 256-block for its ternary dot products, "
                     "BitLinear per token).")
        lines.append("- Ternary vs F16 of the same model in llama.cpp, decoded interleaved in one run: "
                     f"{t2['tokens_per_s'] / f['tokens_per_s']:.2f}× "
                     f"(TQ2_0) and {t1['tokens_per_s'] / f['tokens_per_s']:.2f}× (TQ1_0); file "
                     f"{t2['size_bytes'] / f['size_bytes']:.2f}× / {t1['size_bytes'] / f['size_bytes']:.2f}×; peak "
                     "RSS during load + eval "
                     f"{t2['inference_peak_mem_bytes'] / max(1, f['inference_peak_mem_bytes']):.2f}× "
                     "(TQ2_0). The embeddings stay F16 in these files (the converter's choice for ternary types).")
    elif res.doc["config"].get("gguf") is False:
        lines.append("- GGUF export was switched off in this run (`gguf=False`): no llama.cpp rows.")
    notes = {r["note"] for r in res.rows if r.get("note")}
    lines += [f"- {n}." for n in notes]
    if fp and res.doc.get("embedding_params"):
        share = res.doc["embedding_params"] / fp["total_params"]
        lines.append(f"- Whole-model bits/param include what stays in FP32 (embeddings, LayerNorms, the tied head): "
                     f"the embeddings are {100 * share:.0f} % of this model's parameters, so quantizing the blocks "
                     "alone cannot bring the whole model near the layer-level figure.")
    return "\n".join(lines)
