"""What each deployment format and post-training method of a causal LM costs in size, quality, speed and memory:
the model written by every method asked for (FP16, bitsandbytes INT8 / NF4, GGUF types rounded to nearest or with
an importance matrix: whatever `qlib.methods` registers), each reloaded in its own runtime (transformers +
bitsandbytes, llama.cpp), measured on the same token windows, and scored against the FP16 model token by token
(`fidelity`: KL divergence, top-1 agreement, Δp) as well as by perplexity: one measurement protocol across them.

`measure` does it for one model folder and `decode` times the artifacts; `rows`, `table` and `plot` turn the
measurements into results rows, a markdown table and the quality-vs-size figure. `python -m qlib formats`
(`qlib.formats_report`) and study 08 both call them, so the command and the notebook cannot drift apart. Nothing
here quantizes: each registered method writes its own artifact.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from qlib import evalset, fidelity, merge, methods, metrics, models, ngram, results, runmeta
from qlib.backends import gguf, llama_variants
from qlib.core.errors import QlabError
from qlib.core.io import atomic_dir

# The default list, sized to stay under 10 minutes on 2 CPU cores for a 135M model (each row costs 30-60 s there:
# write, then 16 windows of prefill with every logit kept; the importance matrix 90 s): the deployment formats, and
# each importance-matrix type after its round-to-nearest twin (the paired comparison). Everything else registered is a
# `--formats` away: Q8_0 (KL ~0.004 here), the IQ1-IQ3 types that need a matrix, Q3_K_M (~3.9 bits/weight where rows
# divide by 256, as in most LLMs; on SmolLM2's 576-wide rows llama.cpp falls back to 4-6-bit types, which
# `tensor_types` shows), Q2_0 (blocks of 64, one FP16 scale, codes -1/0/+1/+2: a storage format for ternary-trained
# models; its reference quantizer rounds most weights of a 16-bit-trained model to 0), and the weight-only methods
# (GPTQ, AWQ, HQQ, torchao; GPTQ costs ~5 min of calibration here, AWQ ~10 min on 16 windows).
DEFAULT_FORMATS = ("fp16", "bnb_int8", "bnb_nf4", "gguf_f16", "gguf_q4_0", "gguf_q4_0_imat", "gguf_q4_k_m",
                   "gguf_q4_k_m_imat")
VALID_FORMATS = tuple(methods.REGISTRY)


def parse_formats(names: Iterable[str]) -> tuple[str, ...]:
    """The formats to make, in the order given, with the references their ratios need added in front (fp16;
    gguf_f16 where any GGUF type is asked for) and each method's round-to-nearest control before it; an unknown
    name is one line."""
    return methods.resolve(names)


def needs_calibration(names: Iterable[str]) -> bool:
    """Whether any of these methods needs calibration text."""
    return any(methods.get(n).calibration for n in parse_formats(names))


def needs_llama_cpp(names: Iterable[str]) -> bool:
    """Whether any of these formats runs in llama.cpp (and so needs a llama.cpp build to time it)."""
    return any(methods.get(n).runtime == "llama.cpp" for n in parse_formats(names))


@dataclass
class Text:
    """The token windows every format is scored on (`ids` None: no perplexity, say why in the problems), what an
    interval resamples (`groups`, one per scored token: whole modules and articles; None: whole windows) and the
    prompt decode speed starts from."""

    ids: torch.Tensor | None
    context: int
    prompt: torch.Tensor
    eos: int | None
    seed: int = 0
    groups: np.ndarray | None = None
    about: dict[str, Any] | None = None   # what the windows are (the shared set's description), for metrics.json

    @classmethod
    def of(cls, s: evalset.EvalSet, eos: int | None, seed: int = 0) -> Text:
        """The shared evaluation set's windows, resampled by module and article."""
        ids = s.ids.reshape(-1)
        return cls(ids, s.context, ids[:16], eos, seed, s.token_groups(), s.describe())


@dataclass
class Measured:
    """One artifact (or baseline) as measured: per-token NLL on the shared windows (None: no text), what it is,
    and the peak memory of loading and scoring it."""

    method: str
    backend: str                     # transformers | llama.cpp | counts (n-gram baselines)
    nll: np.ndarray | None
    path: Path | None = None
    bits_per_weight: float | None = None   # stored bits per quantized weight (None: not quantized)
    extra: dict[str, Any] = field(default_factory=dict)
    peak_bytes: int | None = None
    peak_source: str | None = None
    scores: fidelity.TokenScores | None = None   # per token against the reference model (KL, top-1, Δp)
    control: str | None = None                    # the round-to-nearest row this method is compared with
    load: Callable[[Path, torch.device], torch.nn.Module] | None = None  # transformers: how to reload it


@dataclass
class Stage:
    """What `measure` made of one model: the measured artifacts and one line per format it could not make."""

    measured: list[Measured]
    problems: list[str]
    reference: fidelity.Reference | None = None   # the FP16 row's top-k view of every scored token
    made: dict[str, Path] = field(default_factory=dict)  # artifact of every format made so far, by registry name


def fp16_model(src: str, out: Path, info: runmeta.RunInfo, tok: Any) -> Path:
    """The model stored as FP16 under its run name: the fp16 row and the source of every other format (every study
    that measures formats starts here, so the same model gives the same rows in `formats`, 05 and 08)."""
    name = info.name("PTQ", "none", "fp16", 16, "fp16")
    model = models.load_causal_lm(src, None, torch.device("cpu"), dtype=torch.float16)
    with atomic_dir(out / name) as tmp:
        model.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        runmeta.write_meta(tmp, info.meta(name, "fp16", "model", "fp16", stored_dtype="fp16", source=src))
    return out / name


def measure(src: str | Path, formats: Iterable[str], out: Path, text: Text, device: torch.device,
            info: runmeta.RunInfo, name: Callable[[str], str] = str, peft: str = "none", keep_lm_head: bool = True,
            pre_tokenizer: str | None = None, desc: str = "formats", calibration: methods.Calibration | None = None,
            before: Stage | None = None, **meta: Any) -> Stage:
    """`src` (an FP16 transformers folder with its tokenizer: the fp16 row itself) written by every registered
    method asked for, under its run name with its metadata (`meta` added), each reloaded in its own runtime and
    scored on `text` against the fp16 row. `name` maps a format to its row's method. A format that cannot be made,
    or made but not loaded, is one line in `Stage.problems`; the rest go on. `before`, an earlier stage on the same
    text: what it made beside the formats asked for (the reference, the controls) is reused, not made or scored
    again; the formats asked for are made anew (with this stage's calibration)."""
    job = methods.Job(Path(src), out, device, info, peft, keep_lm_head, pre_tokenizer, meta, calibration=calibration)
    formats = list(formats)
    stage, asked = Stage([], [], made=job.made), {f.strip().lower() for f in formats}
    if before is not None:
        job.made.update({f: p for f, p in before.made.items() if f not in asked})
        stage.reference = before.reference
    bar = tqdm([f for f in parse_formats(formats) if f not in job.made], desc=desc)
    for fmt in bar:
        bar.set_postfix_str(fmt)
        path, method = None, methods.get(fmt)
        try:
            t0 = time.perf_counter()
            path = job.made[fmt] = method.write(job)
            made_s, t0 = time.perf_counter() - t0, time.perf_counter()
            m = _score(name(fmt), method, path, text, device, stage)
            m.control = name(method.control) if method.control else None
            m.extra.update(make_s=round(made_s, 2), score_s=round(time.perf_counter() - t0, 2),
                           **_calibration_cost(path))
            stage.measured.append(m)
        except Exception as e:  # noqa: BLE001 - a runtime's failure on one format must not hide the others
            why = e if isinstance(e, QlabError) else f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
            stage.problems.append(f"{fmt}: {'made but not measured' if path else 'not made'}: {why}")
    return stage


def _calibration_cost(path: Path) -> dict[str, Any]:
    """What an artifact's metadata says of its calibration (source, samples, length, seconds): row keys."""
    cal = (runmeta.read_meta(path) or {}).get("calibration")
    return {"calibration": cal} if cal else {}


def _score(method: str, spec: methods.Method, path: Path, text: Text, device: torch.device, stage: Stage) -> Measured:
    """Reload the artifact as a user would, score it on the shared windows against the reference (the first row
    scored becomes the reference); peak memory of loading and scoring together."""
    llama = spec.runtime == "llama.cpp"
    scores = None
    with metrics.PeakMemory("cpu" if llama else device) as mem:  # llama.cpp runs on the CPU here
        if llama:
            windows = gguf.window_logits(path, text.ids.tolist(), text.context) if text.ids is not None else None
            if windows is None:
                _load_only(path, text.context)
        else:
            model = load(spec)(path, device).eval()
            windows = metrics.window_logits(model, text.ids, text.context, device) if text.ids is not None else None
            kinds = models.layer_kinds(model)
        if windows is not None:
            first = stage.reference is None
            scores, ref = fidelity.score(windows, stage.reference, keep_top=fidelity.TOP_K if first else 0)
            if first:
                stage.reference, scores.kl = ref, None
        if not llama:
            del model
    if llama:
        types = list(gguf.tensor_types(path).values())
        counts = {k: types.count(k) for k in sorted(set(types))}
        bits = None if spec.name == "gguf_f16" else gguf.bits_per_weight(path)["weight_matrices"]
        extra = {"tensor_types": counts, "type": spec.name.removeprefix("gguf_")}
    else:
        bits = spec.bits(path) if spec.bits else None
        extra = {"layer_kinds": kinds, "tensor_types": merge.stored_dtypes(path)}
    return Measured(method, spec.runtime, None if scores is None else scores.nll, path, bits, extra, mem.peak_bytes,
                    mem.source, scores=scores, load=None if llama else load(spec))


def load(spec: methods.Method) -> Callable[[Path, torch.device], torch.nn.Module]:
    """How a transformers-runtime method's artifact is reloaded: its own loader, else as stored."""
    return spec.load or _as_stored


def _as_stored(path: Path, device: torch.device) -> torch.nn.Module:
    return models.load_causal_lm(path, None, device)


def _load_only(path: Path, context: int) -> None:
    """Without text to score, the artifact is still loaded (its memory is measured, a broken file is named)."""
    gguf.load(path, context, 1)


def decode(measured: list[Measured], text: Text, device: torch.device, gen_tokens: int, repeats: int,
           threads: int, llama_build: str = "wheel") -> dict[str, dict[str, Any]]:
    """Greedy decode tokens/s: each runtime's artifacts reloaded and interleaved repeat by repeat, on `threads`
    threads, the load average read before and after; llama.cpp in `llama_build` (a concrete build: the wheel or a
    CPU variant). Ratios are only taken inside one runtime (transformers decodes half as many tokens: it is the
    slower one here)."""
    hf = {m.method: (m.load or _as_stored)(m.path, device).eval() for m in measured if m.backend == "transformers"}
    files = {m.method: m.path for m in measured if m.backend == "llama.cpp"}
    eos = -1 if text.eos is None else text.eos  # no tokenizer: never stop early
    load0 = metrics.load_average()
    with metrics.torch_threads(threads):
        speeds = metrics.decode_speeds(hf, text.prompt.reshape(1, -1).to(device), max(1, gen_tokens // 2), repeats,
                                       eos, device) if hf else {}
    load1 = metrics.load_average()
    speeds.update(llama_variants.decode_speeds(files, text.prompt.tolist(), gen_tokens, threads, repeats,
                                               llama_build) if files else {})
    load2 = metrics.load_average()
    del hf
    return {k: {**v, "timing_threads": threads if k in files or device.type == "cpu" else None,
                "load_avg_1m": [load1, load2] if k in files else [load0, load1]}
            | ({"llama_build": llama_build} if k in files else {}) for k, v in speeds.items()}


def count_baselines(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab: int, context: int) -> list[Measured]:
    """Unigram and Kneser-Ney bigram fitted on `train_ids`, scored on the same windows: the floor for every row."""
    tr, ev = train_ids.reshape(-1).numpy(), eval_ids.numpy()
    return [Measured("unigram", "counts", ngram.Unigram(tr, vocab).token_nll(ev, context)),
            Measured("bigram_kn", "counts", ngram.KneserNeyBigram(tr, vocab).token_nll(ev, context))]


def reference_of(m: Measured) -> str | None:
    """A format against the FP16 of its own runtime; llama.cpp's F16 and the count baselines against transformers'
    FP16 (do the runtimes agree; what the network is worth)."""
    if m.method == "fp16":
        return None
    return "fp16" if m.backend != "llama.cpp" or m.method == "gguf_f16" else "gguf_f16"


DEFINITIONS = {
    "size_bytes": "the whole artifact a user loads: the GGUF file (header and vocabulary included), or the folder's "
                  "*.safetensors (tokenizer files excluded)",
    "bits_per_param": "8 x size_bytes / parameters of the FP16 model (embeddings, norms, scales and headers included)",
    "bits_per_quantized_weight": "stored bits per element of the quantized weights only: bitsandbytes' linears with "
                                 "all their scale tensors; every 2-D matrix of a GGUF file (embeddings included)",
    "tensor_types": "stored tensors by type: GGML types of a GGUF file, safetensors dtypes of a folder",
    "perplexity_ratio": "perplexity / that of the `reference` row on the same tokens, exp(mean NLL difference), "
                        "95 % paired bootstrap over whole units: on the shared evaluation set (`eval_set`) its "
                        "modules and articles, on other text its windows; every interval below resamples the same",
    "perplexity_by_domain": "perplexity on each domain of the shared evaluation set (code: held-out stdlib modules; "
                            "prose: held-out BBC News articles): one number per model and domain in every study",
    "kl_mean": "mean over scored tokens of KL(reference || format) of the next-token distributions, the reference "
               "being the FP16 model in transformers on the same windows; computed over the reference's top-128 "
               "tokens plus one bucket for the rest (a lower bound on the full KL), 95 % bootstrap interval "
               "over whole units; kl_median, kl_p99, kl_max over tokens",
    "top1_agreement": "share of scored tokens whose most likely next token is the reference's (llama.cpp's "
                      "'same top p'), 95 % interval over whole units",
    "rms_dp": "root mean square over scored tokens of the change in probability of the true next token against the "
              "reference (llama.cpp's Δp), 95 % interval over whole units",
    "kl_vs_control": "mean KL of a method minus that of its round-to-nearest control (`control`, same grid) on the "
                     "same tokens, paired 95 % bootstrap over whole units: the method's own contribution",
    "perplexity_vs_control_by_domain": "per domain of the shared set, perplexity of a method over its control's on "
                                       "the same tokens, paired 95 % bootstrap over that domain's whole modules or "
                                       "articles",
    "calibration": "the calibration text a method used (source, samples, length, tokens) and the seconds its "
                   "statistic took (the importance matrix, shared by the methods of one run); make_s: seconds to "
                   "write the artifact (the first method to need the importance matrix includes it); score_s: "
                   "seconds to reload it and score the text",
    "decode_vs_fp16_same_runtime": "greedy decode tokens/s over the FP16 artifact's, same runtime, interleaved repeats "
                                   "(95 % interval resampling whole rounds of repeats)",
    "inference_peak_mem_bytes": "peak memory of loading the artifact and scoring the text: CUDA max allocated for "
                                "PyTorch formats on a GPU, else growth of the process RSS (llama.cpp maps the file: "
                                "its pages count once touched); transformers computes FP16 weights in FP32 on CPU",
}


def rows(measured: list[Measured], speeds: dict[str, dict[str, Any]], n_params: int, model_id: str, data_id: str,
         context: int, seed: int, reference: Callable[[Measured], str | None] = reference_of, fp16: str = "fp16",
         gguf_f16: str = "gguf_f16", extra: dict[str, dict[str, Any]] | None = None,
         groups: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Schema rows: perplexity ratios with intervals against `reference` (resampling whole `groups` where given, else
    windows), decode ratios against the FP16 artifact of the same runtime (`fp16`, `gguf_f16`), sizes against
    `fp16`'s; `extra[method]` adds or overrides keys (a training cost)."""
    by = {m.method: m for m in measured}
    fp16_bytes = merge.weights_bytes(by[fp16].path) if fp16 in by else None
    ref_speed = {"transformers": speeds.get(fp16, {}), "llama.cpp": speeds.get(gguf_f16, {})}
    out = []
    for m in measured:
        size = merge.weights_bytes(m.path) if m.path else None
        ref = by.get(reference(m) or "")
        ratio = metrics.perplexity_ratio(ref.nll, m.nll, block=context - 1, seed=seed, groups=groups) \
            if ref is not None and ref.nll is not None and m.nll is not None else None
        speed, base = speeds.get(m.method, {}), ref_speed.get(m.backend, {})
        ppl = None if m.nll is None else float(np.exp(m.nll.mean()))
        row = results.make_row(
            m.method, model=model_id, dataset=data_id, perplexity=ppl,
            size_bytes=size, bits_per_param=metrics.bits_per_param(size, n_params) if size else None,
            bits_per_quantized_weight=m.bits_per_weight, backend=m.backend, artifact=m.path.name if m.path else None,
            total_params=n_params if m.path else None, trainable_params=0 if m.path else None,
            reference=ref.method if ref else None, tokens_per_s=speed.get("tokens_per_s"),
            decode_repeat_s=speed.get("repeat_s"),
            timing_threads=speed.get("timing_threads"), load_avg_1m=speed.get("load_avg_1m"),
            llama_build=speed.get("llama_build"), size_vs_fp16=size / fp16_bytes if size and fp16_bytes else None,
            peak_mem_source=None, inference_peak_mem_bytes=m.peak_bytes, inference_peak_mem_source=m.peak_source,
            **m.extra)
        metrics.with_difference(row, "decode_vs_fp16_same_runtime", metrics.speed_ratio(
            base["repeat_s"], speed["repeat_s"], seed) if speed and base else None, value="ratio")
        row.update(fidelity.summary(m.scores, block=context - 1, seed=seed, groups=groups),
                   perplexity_by_domain=by_domain(m.nll, groups))
        row.update(control=m.control, **_versus_control(m, by.get(m.control or ""), context, seed, groups))
        row.update((extra or {}).get(m.method, {}))
        out.append(metrics.with_difference(row, "perplexity_ratio", ratio, value="ratio"))
    return out


def by_domain(nll: np.ndarray | None, groups: np.ndarray | None) -> dict[str, float] | None:
    """Perplexity per domain of the shared set (a group is `domain:module`), so every study quotes the same number
    for the same model on the same domain; None without groups."""
    if nll is None or groups is None:
        return None
    domains = domain_of(groups)
    return {d: float(np.exp(nll[domains == d].mean())) for d in sorted(set(domains))}


def domain_of(groups: np.ndarray) -> np.ndarray:
    """Each scored token's domain: a group is `domain:module` (or `domain:article`)."""
    return np.array([g.split(":", 1)[0] for g in groups])


def _versus_control(m: Measured, ctl: Measured | None, context: int, seed: int,
                    groups: np.ndarray | None = None) -> dict[str, Any]:
    """A method's own contribution: its mean KL minus its round-to-nearest control's on the same tokens, with the
    paired 95 % interval over whole windows or `groups` (negative: the method is closer to the reference)."""
    if ctl is None or m.scores is None or ctl.scores is None or m.scores.kl is None or ctl.scores.kl is None:
        return {**metrics.with_difference({}, "kl_vs_control", None), "perplexity_vs_control_by_domain": None}
    d = metrics.paired_bootstrap(ctl.scores.kl, m.scores.kl, block=context - 1, seed=seed, groups=groups)
    return {**metrics.with_difference({}, "kl_vs_control", {**d, "real": d["excludes_zero"]}),
            "perplexity_vs_control_by_domain": ratio_by_domain(ctl.nll, m.nll, groups, context, seed)}


def ratio_by_domain(ref_nll: np.ndarray | None, nll: np.ndarray | None, groups: np.ndarray | None, context: int,
                    seed: int) -> dict[str, dict[str, Any]] | None:
    """Perplexity over a reference's on each domain of the shared set, with the paired interval over that domain's
    whole modules or articles: a method fitted to its calibration domain can gain on one and lose on the other."""
    if ref_nll is None or nll is None or groups is None:
        return None
    domains = domain_of(groups)
    return {d: metrics.perplexity_ratio(ref_nll[domains == d], nll[domains == d], block=context - 1, seed=seed,
                                        groups=groups[domains == d]) for d in sorted(set(domains))}


def _pct(r: dict[str, Any]) -> str:
    """A perplexity ratio as a change in percent with its interval (x-fold beyond a factor of 2)."""
    mid, lo, hi = (r.get(f"perplexity_ratio{k}") for k in ("", "_lo", "_hi"))
    if mid is None:
        return "–"
    if 0.5 < mid < 2:
        return f"{100 * (mid - 1):+.2f} % [{100 * (lo - 1):+.2f}, {100 * (hi - 1):+.2f}] vs {r['reference']}"
    return f"×{mid:.3g} [{lo:.3g}, {hi:.3g}] vs {r['reference']}"


def _kl(r: dict[str, Any]) -> str:
    """Mean KL against the FP16 model with its interval."""
    if r.get("kl_mean") is None:
        return "–"
    return f"{r['kl_mean']:.4f} [{r['kl_mean_lo']:.4f}, {r['kl_mean_hi']:.4f}]"


def _kl_control(r: dict[str, Any]) -> str:
    """The method's KL minus its round-to-nearest control's, with the paired interval."""
    if r.get("kl_vs_control") is None:
        return "–"
    return f"{r['kl_vs_control']:+.4f} [{r['kl_vs_control_lo']:+.4f}, {r['kl_vs_control_hi']:+.4f}] vs {r['control']}"


def table(rows_: list[dict[str, Any]]) -> str:
    """The report as a markdown table (readable in a terminal as it is)."""
    def f(v: Any, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    lines = ["| format | runtime | size (MiB) | bits/param | bits/quantized weight | tensor types | perplexity | "
             "vs reference [95 % CI] | mean KL vs FP16 [95 % CI] | same top-1 | KL vs RTN control [95 % CI] | "
             "decode tok/s | decode vs FP16 (same runtime) [95 % CI] | peak mem (MiB) |",
             "|" + "---|" * 14]
    for r in rows_:
        types = ", ".join(f"{k} {v}" for k, v in (r.get("tensor_types") or {}).items()) or "–"
        mem = r.get("inference_peak_mem_bytes")
        lines.append("| " + " | ".join([
            r["method"], r.get("backend") or "–", f((r["size_bytes"] or 0) / 2**20 or None, ".1f"),
            f(r["bits_per_param"], ".2f"), f(r.get("bits_per_quantized_weight"), ".2f"), types,
            f(r["perplexity"], ".3f"), _pct(r), _kl(r), f(r.get("top1_agreement") and 100 * r["top1_agreement"], ".1f")
            + (" %" if r.get("top1_agreement") is not None else ""), _kl_control(r), f(r["tokens_per_s"], ".1f"),
            results.times_interval(r, "decode_vs_fp16_same_runtime"),
            f(None if mem is None else mem / 2**20, ".0f")]) + " |")
    return "\n".join(lines)


def plot(rows_: list[dict[str, Any]], ax: Any, title: str = "", cap: float = 2.0) -> Any:
    """Quality against size: one point per format (perplexity ratio vs its reference, 95 % interval), size on a log
    axis; the references sit at 1 without a bar; a ratio beyond `cap` is drawn at the cap as a triangle, its value
    written beside it (a collapsed format would flatten every other point)."""
    pts = sorted((r for r in rows_ if r.get("size_bytes")), key=lambda r: r["size_bytes"])  # labels alternate
    for i, r in enumerate(pts):
        y = r.get("perplexity_ratio") or 1.0
        lo, hi = r.get("perplexity_ratio_lo") or y, r.get("perplexity_ratio_hi") or y
        x, off = r["size_bytes"] / 2**20, y > cap
        marker = "^" if off else "s" if r.get("backend") == "llama.cpp" else "o"
        err = [[0], [0]] if off else [[y - lo], [hi - y]]
        ax.errorbar(x, min(y, cap), yerr=err, fmt=marker, capsize=3)
        label = f"{r['method']} ×{y:.3g} (off scale)" if off else r["method"]
        ax.annotate(label, (x, min(y, cap)), textcoords="offset points", xytext=(4, -10 if i % 2 else 4), fontsize=8)
    ax.axhline(1.0, color="grey", lw=1)
    ax.set_xscale("log")
    ax.set(xlabel="size on disk (MiB, log)", ylabel="perplexity / reference (95 % CI)",
           title=title or "quality vs size (circles: transformers, squares: llama.cpp)")
    return ax
