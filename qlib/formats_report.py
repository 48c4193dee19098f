"""`python -m qlib formats MODEL`: study 08's merge-and-quantize report for any causal LM a user brings.

The model (a local folder, a registry key such as `smollm2-135m`, or a hub id where the hub can be reached) is
written as FP16, an adapter merged into it first where one is given (dequantize-then-merge for a 4-bit base),
then `formats.measure` writes, reloads and scores every format and `formats.decode` times them. Results go to
results/formats/<model>/ (metrics.json in the results schema, the per-token NLL, table.md, quality_vs_size.png;
<model>: a hub or registry id, or a local folder's name and a hash of its path, and a kept result of another model
is never replaced), artifacts to outputs/default/formats/<model>/, both staged: all or nothing. Bad input that
leaves something to measure (no tokenizer, an adapter for another base, text shorter than one window, an architecture
llama.cpp's converter does not know) is one line in `problems`, and the formats that could be made are still reported.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from qlib import (assets, data, evalset, figures, formats, hub, merge, methods, metrics, models, ngram, pretrain,
                  results, runmeta)
from qlib.backends import llama_variants
from qlib.core.device import parse_device, pick_device, set_seed
from qlib.core.errors import QlabError
from qlib.core.io import atomic_write_text
from qlib.core.paths import outputs_dir, results_dir, staged_run
from qlib.core.quiet import no_load_bars

STUDY = "formats"


@dataclass(frozen=True)
class Config:
    """The command's options (`python -m qlib formats --help`)."""

    model: str = "smollm2-135m"
    adapter: str | None = None
    adapter_base: str | None = None     # fp32 | nf4: what the adapter was trained on (None: its metadata, else fp32)
    text: str | None = None             # a UTF-8 text file; else the dataset's held-out split
    dataset: str = "stdlib-code"        # stdlib-code (offline) | codesearchnet-python | a local folder of split files
    formats: tuple[str, ...] = formats.DEFAULT_FORMATS
    context: int = 256                  # perplexity window, stride = window
    eval_tokens: int = 4096             # the shared set's first eval_tokens / context windows (at most 128)
    baseline_tokens: int = 200_000      # the n-gram baselines' fitting tokens (the dataset's train split)
    gen_tokens: int = 32                # decode length (transformers decodes half): 10 minutes in all
    repeats: int = 3
    timing_threads: int = 1
    llama_build: str = "best"           # llama.cpp's decode: "best" (this CPU's variant), "wheel" (AVX2), or a variant
    keep_lm_head_fp16: bool = True
    calibration: str | None = None      # a UTF-8 text file; else the dataset's train split (or, with --text, the
                                        # text beyond the scored tokens): never the evaluated tokens
    calib_samples: int = 64             # calibration windows ...
    calib_length: int = 256             # ... of this many tokens
    device: str = "auto"
    seed: int = 0
    name: str | None = None             # results/formats/<model>-<name>/: several lists of one model side by side

    def __post_init__(self) -> None:
        formats.parse_formats(self.formats)
        llama_variants.check_build(self.llama_build)
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,40}", self.name):
            raise QlabError(f"formats: name must be letters, digits, '.', '_' or '-' (at most 41), got {self.name!r}")
        for k in ("context", "eval_tokens", "gen_tokens", "repeats", "timing_threads", "calib_samples", "calib_length"):
            least = {"context": 2, "calib_length": 16}.get(k, 1)  # llama.cpp's importance matrix skips < 16 rows
            if getattr(self, k) < least:
                raise QlabError(f"formats: {k} must be at least {least}, got {getattr(self, k)}")
        if not 0 <= self.seed < 2**32:
            raise QlabError(f"formats: seed must be in [0, 2**32), got {self.seed}")
        if self.device != "auto":
            parse_device(self.device)
        if self.adapter_base not in (None, "fp32", "nf4"):
            raise QlabError(f"formats: adapter_base must be fp32 or nf4, got {self.adapter_base!r}")
        for what in ("text", "calibration"):
            if getattr(self, what) and not Path(getattr(self, what)).is_file():
                raise QlabError(f"{what} file not found: {getattr(self, what)}")
            if getattr(self, what):
                read_text(getattr(self, what))  # binary or not UTF-8: refused before anything runs


@dataclass
class Report:
    rows: list[dict[str, Any]]
    doc: dict[str, Any]
    path: Path
    problems: list[str]
    table: str


def slug(asset: assets.Resolved) -> str:
    """The results folder's name: a hub or registry id with `--` for `/`; a local folder's own name and a hash of
    its full path, so two folders both called `merged` (or one named like a hub id) never share a result."""
    if asset.source == "folder":
        tag = hashlib.sha1(str(Path(asset.path).resolve()).encode()).hexdigest()[:8]
        name = f"{Path(asset.id).name}-{tag}"
    else:
        name = asset.id.replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:100]


def check_same_model(res: Path, asset: assets.Resolved) -> None:
    """A kept result is replaced only by a run of the same model (its id; a local folder's path too: a cache's path
    differs between machines, a folder's identity is its path), never silently by another's."""
    kept = res / "metrics.json"
    if not kept.is_file():
        return
    try:
        was = json.loads(kept.read_text(encoding="utf-8"))["assets"]["model"]
        same = was.get("id") == asset.id and (asset.source != "folder" or was.get("path") == asset.path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        same = False
    if not same:
        raise QlabError(f"{res} holds another model's result (or an unreadable one); pass --name to keep this run "
                        f"beside it, or move that folder away")


def resolve(model: str) -> assets.Resolved:
    """A local folder (config.json and weights; the tokenizer is checked later, its absence is not fatal), a registry
    key, or a hub id (offline: one line)."""
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise QlabError(f"{p} is not a Hugging Face model folder (no config.json)")
        models.check_weights(p)
        return assets.Resolved("causal-lm", str(p.resolve()), "folder", str(p.resolve()))
    if model in assets.REGISTRY:
        return assets.resolve_model(assets.REGISTRY[model].role, model)
    if assets.looks_like_path(model):
        raise QlabError(f"model folder not found: {model}")
    path = hub.model_snapshot(model, "any causal LM", "offline: pass a local model folder, or smollm2-135m")
    return assets.Resolved("causal-lm", model, "hub", str(path), revision=path.name)


def load_tokenizer(path: str, problems: list[str]) -> Any:
    """The model's tokenizer, or None with one line (no perplexity, no GGUF: both need it)."""
    from transformers import AutoTokenizer

    try:
        merge.require_tokenizer(path)
        return AutoTokenizer.from_pretrained(path)
    except QlabError as e:
        problems.append(f"tokenizer: {e}; perplexity and GGUF need it, the other formats are measured without")
    except Exception as e:  # noqa: BLE001 - any loader failure is the same missing piece
        problems.append(f"tokenizer: {path}: does not load ({type(e).__name__}); perplexity and GGUF skipped")
    return None


def load_text(cfg: Config, tok: Any, problems: list[str]) -> tuple[formats.Text, torch.Tensor | None, str]:
    """The evaluation windows, the n-gram baselines' fitting tokens (None: none to fit on), and the data's id: the
    shared evaluation set (`evalset`: held-out modules and BBC articles) for the default dataset, else the first
    `eval_tokens` of the text or the dataset's held-out split."""
    data_id = Path(cfg.text).name if cfg.text else cfg.dataset
    if tok is None:
        return formats.Text(None, cfg.context, torch.arange(1, 17), None, cfg.seed), None, data_id
    if not cfg.text and cfg.dataset == SHARED:
        return shared_text(cfg, tok)
    if cfg.text:
        texts, train = [read_text(cfg.text)], None
    else:
        train, texts, asset = data.load_code_sft(cfg.dataset)
        data_id = asset.id
    prompt = torch.tensor((tok(texts[0][:2000])["input_ids"] + [tok.eos_token_id or 0] * 16)[:16])
    try:
        chunks = data.lm_chunks(tok, texts, cfg.context, cfg.eval_tokens + (0 if train else cfg.baseline_tokens))
    except QlabError as e:
        problems.append(f"text: {e}: perplexity not measured")
        return formats.Text(None, cfg.context, prompt, tok.eos_token_id, cfg.seed), None, data_id
    ids = chunks.reshape(-1)
    eval_ids, rest = ids[: cfg.eval_tokens], ids[cfg.eval_tokens:]
    if train:
        rest = data.lm_chunks(tok, train, cfg.context, cfg.baseline_tokens)
    return formats.Text(eval_ids, cfg.context, eval_ids[:16], tok.eos_token_id, cfg.seed), rest, data_id


SHARED = "stdlib-code"  # the dataset whose held-out modules, with BBC News articles, make the shared evaluation set


def shared_text(cfg: Config, tok: Any) -> tuple[formats.Text, torch.Tensor, str]:
    """The first eval_tokens / context windows of the shared set (intervals resample its modules and articles);
    beyond them, its domains' training texts (the n-gram baselines' and calibration's tokens, code first)."""
    s = evalset.scored(tok, cfg.context, cfg.eval_tokens)
    rest = evalset.training_tokens(tok, cfg.context, max(cfg.baseline_tokens, 4 * cfg.calib_samples * cfg.calib_length))
    return formats.Text.of(s, tok.eos_token_id, cfg.seed), rest, evalset.DATASET_ID


def shared_mix(rest: torch.Tensor, want: int, length: int) -> tuple[torch.Tensor, str]:
    """`want` calibration tokens in the shared set's own mix, 3 code : 1 prose, as 05's methods calibrate: its training
    tokens hold code, then prose (`evalset.training_tokens`)."""
    ids = rest.reshape(-1)
    split, code = int(ids.numel() * evalset.CODE_SHARE), round(want * evalset.CODE_SHARE / length) * length
    mixed = torch.cat([ids[:code], ids[split:split + want - code]])
    return mixed, (f"{SHARED}'s training texts: {code // length} code + {(mixed.numel() - code) // length} prose "
                   f"windows (the evaluation set's mix)")


def load_calibration(cfg: Config, tok: Any, rest: torch.Tensor | None, problems: list[str]
                     ) -> methods.Calibration | None:
    """`calib_samples` windows of `calib_length` tokens, disjoint from the scored ones: the --calibration file, else
    the tokens beyond the scored ones (the dataset's train split, or the rest of --text). Too little text is one
    line, and the methods that need calibration then say so."""
    if tok is None or not formats.needs_calibration(cfg.formats):
        return None
    want = cfg.calib_samples * cfg.calib_length
    try:
        if cfg.calibration:
            source = Path(cfg.calibration).name
            rest = data.lm_chunks(tok, [read_text(cfg.calibration)], cfg.calib_length, want)
        else:
            source = f"{Path(cfg.text).name} (beyond the scored tokens)" if cfg.text else f"{cfg.dataset} (train split)"
        if rest is None or rest.numel() < cfg.calib_length:
            raise QlabError(f"not enough text for one {cfg.calib_length}-token window")
    except QlabError as e:
        problems.append(f"calibration: {e}: the methods that need it are not made")
        return None
    if not cfg.calibration and not cfg.text and cfg.dataset == SHARED:
        rest, source = shared_mix(rest, want, cfg.calib_length)
    ids = rest.reshape(-1)[:want]
    return methods.Calibration(source, list(ids[: ids.numel() - ids.numel() % cfg.calib_length]
                                            .reshape(-1, cfg.calib_length)))


def read_text(path: str) -> str:
    """A UTF-8 text file; binary data or another encoding is refused (scored, it would yield a perplexity of
    replacement characters)."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QlabError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start:,}): pass a UTF-8 "
                        "text file") from None
    if "\x00" in text:
        raise QlabError(f"{path} holds NUL bytes: binary data, not text")
    return text


def baseline_tokens(rest: torch.Tensor | None, problems: list[str]) -> torch.Tensor | None:
    """The n-gram baselines' fitting tokens, or None with one line where there are too few."""
    if rest is not None and rest.numel() < 1000:
        problems.append("baselines: the text has fewer than 1,000 tokens beyond the evaluated ones: no n-gram baseline")
        return None
    return rest


def model_to_measure(cfg: Config, src: str, out: Path, info: runmeta.RunInfo, tok: Any, text: formats.Text,
                     device: torch.device, problems: list[str]) -> tuple[Path, dict[str, Any] | None]:
    """The FP16 folder every format starts from: base + adapter merged where the adapter fits, else the base as
    FP16 (one line saying why); the merge record."""
    if cfg.adapter:
        adapter = Path(cfg.adapter)
        try:
            trained_on = cfg.adapter_base or merge.adapter_trained_on(adapter, "fp32")
            name = f"{adapter.name}_merged"
            mi = merge.merge_adapter(src, adapter, out / name, trained_on, text.prompt,
                                     merge.merged_meta(adapter, name, info, trained_on, device))
            return mi.path, {"adapter": str(adapter), "trained_on": mi.trained_on, "merge_base": mi.merge_base,
                             "max_abs_logit_diff_fp32": mi.max_abs_logit_diff_fp32,
                             "max_abs_logit_diff_fp16": mi.max_abs_logit_diff_fp16}
        except QlabError as e:
            problems.append(f"adapter: not merged: {e}; the base model's formats are reported instead")
    return formats.fp16_model(src, out, info, tok), None


def run(cfg: Config) -> Report:
    """Resolve, merge, write every format, reload, score, time; write metrics.json, the table and the figure."""
    t0 = time.perf_counter()
    no_load_bars()
    device = pick_device(cfg.device)
    set_seed(cfg.seed)
    asset = resolve(cfg.model)
    # an unrunnable build: one line before any work; no llama.cpp format, nothing to build or score
    build = llama_variants.resolve(cfg.llama_build) if formats.needs_llama_cpp(cfg.formats) else llama_variants.WHEEL
    key, problems = slug(asset) + (f"-{cfg.name}" if cfg.name else ""), []
    check_same_model(results_dir(f"{STUDY}/{key}", "default"), asset)
    with staged_run(f"{STUDY}/{key}", "default"):
        out, res = outputs_dir(f"{STUDY}/{key}", "default"), results_dir(f"{STUDY}/{key}", "default")
        tok = load_tokenizer(asset.path, problems)
        text, rest, data_id = load_text(cfg, tok, problems)
        calibration = load_calibration(cfg, tok, rest, problems)
        train_ids = baseline_tokens(rest, problems)
        info = runmeta.RunInfo(STUDY, "default", cfg.seed, asset.id, asset.path, data_id)
        src, merged = model_to_measure(cfg, asset.path, out, info, tok, text, device, problems)
        stage = formats.measure(src, cfg.formats, out, text, device, info, keep_lm_head=cfg.keep_lm_head_fp16,
                                pre_tokenizer=pretrain.gguf_pre_tokenizer(asset.path), calibration=calibration)
        problems += stage.problems
        speeds = formats.decode(stage.measured, text, device, cfg.gen_tokens, cfg.repeats, cfg.timing_threads,
                                build)
        measured = stage.measured + (formats.count_baselines(train_ids, text.ids, len(tok), cfg.context)
                                     if train_ids is not None and text.ids is not None else [])
        rows = formats.rows(measured, speeds, merge.stored_params(src), asset.id, data_id, cfg.context, cfg.seed,
                            groups=text.groups)
        path = _write(cfg, key, rows, measured, text, asset, merged, problems, device, res, time.perf_counter() - t0)
    path = results_dir(f"{STUDY}/{key}", "default") / path.name  # where the staging folder went
    for line in problems:
        print(f"qlab formats: {line}")
    return Report(rows, results.load_metrics(path), path, problems, formats.table(rows))


def _write(cfg: Config, key: str, rows: list[dict[str, Any]], measured: list[formats.Measured], text: formats.Text,
           asset: assets.Resolved, merged: dict[str, Any] | None, problems: list[str], device: torch.device,
           res: Path, seconds: float) -> Path:
    """metrics.json, the per-token NLL beside it, table.md and quality_vs_size.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if text.ids is not None:
        scored = text.ids[ngram.scored_positions(text.ids.numel(), text.context)]
        results.write_per_example(f"{STUDY}/{key}", "default", "per_token_nll",
                                  {"token_id": scored.numpy(), **{m.method: m.nll for m in measured}})
    atomic_write_text(res / "table.md", formats.table(rows) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    formats.plot(rows, ax, title=f"{asset.id}: quality vs size")
    figures.save_figure(fig, res / "quality_vs_size.png")
    plt.close(fig)
    return results.write_metrics(
        STUDY, "default", cfg.seed, metrics.runtime_env(device), {"model": asset.provenance(),
                                                                  "data": {"id": rows[0]["dataset"]}},
        rows, out_dir=res, config={**asdict(cfg), "formats": list(formats.parse_formats(cfg.formats))},
        merge=merged, problems=problems, definitions=formats.DEFINITIONS, duration_s=round(seconds, 1),
        perplexity_window={"context": cfg.context, "stride": cfg.context,
                           "scored_tokens": None if text.ids is None else int(measured[0].nll.size)},
        eval_set=text.about)
