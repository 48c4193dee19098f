"""`python -m qlib run|report|assets|inspect|formats`, and study 06's `train|eval|sensitivity|search`."""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from qlib import render
from qlib.config import PARTIAL_PROFILES, PROFILES, check_profile, parse_params
from qlib.core.errors import ArgumentParser, QlabError
from qlib.core.io import make_folder
from qlib.core.notebook import tidy_file
from qlib.core.progress import HEADLESS
from qlib.core.paths import repo_root


def notebooks(selected: list[str] | None = None) -> list[Path]:
    """The numbered notebooks, all or those named (by stem, number or file name)."""
    found = sorted((repo_root() / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if not selected:
        return found
    picked = []
    for want in selected:
        hits = [p for p in found if want in (p.name, p.stem, p.stem[:2])]
        if not hits:
            names = ", ".join(p.stem for p in found)
            raise QlabError(f"unknown notebook {want!r}; available: {names}")
        picked += hits
    return picked


def executed_dir(profile: str) -> Path:
    base = repo_root() / "results"
    return base / "executed" if profile == "default" else base / profile / "executed"


def run_notebook(nb: Path, profile: str, params: dict[str, object]) -> Path:
    """Execute one notebook with papermill; the executed copy appears only when it succeeded."""
    import papermill as pm

    out_dir = make_folder(executed_dir(profile))
    final, tmp = out_dir / nb.name, out_dir / f".{nb.stem}.running.ipynb"
    failed = out_dir / f"{nb.stem}.failed.ipynb"
    failed.unlink(missing_ok=True)
    before = staging_folders(profile)
    os.environ[HEADLESS] = "1"  # the kernel inherits it: text progress bars in the executed copy
    try:
        pm.execute_notebook(str(nb), str(tmp), parameters={"profile": profile, **params},
                            cwd=str(nb.parent), kernel_name="python3", progress_bar=True)
    except pm.PapermillExecutionError as e:
        os.replace(tmp, failed)
        raise QlabError(f"{nb.name} failed in cell {e.exec_count}: {e.ename}: {e.evalue} "
                        f"(executed copy: {failed})") from None
    except BaseException:  # Ctrl-C or SIGTERM: the kernel was stopped mid-cell and could not clean up after itself
        tmp.unlink(missing_ok=True)
        for d in staging_folders(profile) - before:
            shutil.rmtree(d, ignore_errors=True)
        raise
    tidy_file(tmp, repo_root())  # a report: streams merged and settled, no absolute path of this machine
    os.replace(tmp, final)
    return final


def staging_folders(profile: str) -> set[Path]:
    """The studies' staging folders of a profile (`core.paths.staged_run`), in results/ and outputs/."""
    res = repo_root() / "results" / ("" if profile == "default" else profile)
    return {p for base in (res, repo_root() / "outputs" / profile) for p in base.glob(".*.staging")}


def notebook_parameters(nb: Path) -> list[str]:
    """The names a notebook's papermill `parameters` cell assigns, in order."""
    import ast
    import json

    try:
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        cell = next(c for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
        body = ast.parse("".join(cell["source"])).body
    except (OSError, ValueError, KeyError, StopIteration, SyntaxError) as e:
        raise QlabError(f"{nb.name}: no readable cell tagged 'parameters' ({type(e).__name__})") from None
    return [t.id for n in body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)]


def check_params(nbs: list[Path], profile: str, params: dict[str, object]) -> None:
    """Before papermill starts (it only warns): every `-p` name is a parameter of every selected notebook, and the
    values pass the study's own config checks (types, ranges), so a typo cannot run on the defaults."""
    from qlib.core.device import pick_device
    from qlib.studies import STUDIES, study

    if "profile" in params:
        raise QlabError("profile is not a -p parameter: pass it as --profile (one of " + ", ".join(PROFILES) + ")")
    if isinstance(params.get("device"), str):
        pick_device(params["device"])  # a typo or no CUDA here: one line now, not minutes into a notebook
    for nb in nbs:
        names = [n for n in notebook_parameters(nb) if n != "profile"]
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise QlabError(f"unknown parameter(s) for {nb.stem}: {', '.join(unknown)}; valid: {', '.join(names)}")
        if nb.stem in STUDIES and params:
            study(nb.stem).config(profile, **params)
            check_asset_ids(study(nb.stem), profile, params)


def check_asset_ids(mod: Any, profile: str, params: dict[str, object]) -> None:
    """A model or dataset id given with -p resolves now (an unknown or offline hub id, a missing folder or one
    holding the wrong kind of model: one line) rather than minutes into the notebook. The gpu profile builds random
    weights."""
    from qlib import assets

    for name, role in mod.ASSET_ROLES.items():
        key = params.get(name)
        if not (isinstance(key, str) and key) or (profile == "gpu" and not name.endswith("dataset_id")):
            continue
        if name.endswith("dataset_id"):
            assets.check_data(role, key)
        else:
            assets.resolve_model(role, key)


PARTIAL_WHAT = {"gpu": "random-init memory and speed", "full": "the whole shared evaluation set of the real LM"}


def cmd_run(args: argparse.Namespace) -> int:
    check_profile(args.profile)
    params = parse_params(args.param or [])
    covers = PARTIAL_PROFILES.get(args.profile)
    nbs = notebooks(args.notebooks or (list(covers) if covers else None))
    if args.profile == "gpu" and "device" not in params:
        from qlib.core.device import pick_device

        pick_device("auto", "gpu")  # no CUDA: one clear line now, not a failed notebook later
    if covers and (outside := [nb.stem for nb in nbs if nb.stem[:2] not in covers]):
        raise QlabError(f"no {args.profile} profile for {', '.join(outside)}: the {args.profile} profile "
                        f"({PARTIAL_WHAT[args.profile]}) covers notebooks {', '.join(covers)}; run the others with "
                        "--profile default or t4")
    check_params(nbs, args.profile, params)
    make_folder(executed_dir(args.profile))  # a file in the way of results/: one line before anything runs
    failed = []
    for nb in nbs:
        print(f"[qlab] running {nb.name} (profile {args.profile})", flush=True)
        try:
            out = run_notebook(nb, args.profile, params)
        except QlabError as e:
            if len(nbs) == 1:
                raise
            print(f"[qlab] failed: {e}", file=sys.stderr, flush=True)  # the others still run
            failed.append(nb.stem)
            continue
        print(f"[qlab] done: {out.relative_to(repo_root())}", flush=True)
    from qlib.report import write_summary

    skipped: list[str] = []
    if len(failed) < len(nbs):
        print(f"[qlab] summary: {write_summary(args.profile, skipped).relative_to(repo_root())}")
    _name_skipped(skipped)
    if failed:
        raise QlabError(f"{len(failed)} of {len(nbs)} notebooks failed: {', '.join(failed)} (errors above)")
    if skipped:
        raise QlabError(f"the notebooks ran; the summary left out {len(skipped)} malformed results file(s) (above)")
    return 0


def _name_skipped(skipped: list[str]) -> None:
    for m in skipped:
        print(f"[qlab] left out of the summary: {m}", file=sys.stderr, flush=True)


def cmd_report(args: argparse.Namespace) -> int:
    from qlib.report import write_summary

    check_profile(args.profile)
    skipped: list[str] = []
    path = write_summary(args.profile, skipped)
    print(path.read_text() if args.show else f"wrote {path}")
    _name_skipped(skipped)
    if args.readme:
        from qlib import plans, sharding
        from qlib.report import update_readme

        t4_plan = plans.table(plans.profile_plans("t4"))  # predictions from the t4 configs and the hub's true configs
        pages = update_readme(t4_plan=t4_plan, multi_gpu=sharding.tables())
        print(f"refilled the generated tables of {', '.join(p.name for p in pages)}")
    if skipped:
        raise QlabError(f"the summary left out {len(skipped)} malformed results file(s) (above)")
    return 0


def fetch_profile(profile: str) -> list[object]:
    """Every hub model and dataset a profile's notebooks use, into the Hugging Face cache (for Kaggle offline:
    upload that cache as a dataset and point HF_HUB_CACHE at it, with HF_HUB_OFFLINE=1)."""
    from qlib import assets
    from qlib.studies import STUDIES, asset_ids, study

    wanted = [(role, key, field.endswith("dataset_id")) for stem in STUDIES
              for field, role, key in asset_ids(study(stem), study(stem).config(profile))]
    done = []
    for role, key, is_data in dict.fromkeys(wanted):
        r = assets.resolve_data(role, key) if is_data else assets.resolve_model(role, key)
        if is_data and r.source in ("hub", "folder"):
            assets.dataset_for(r)
        print(f"ok  {role:15s} {r.id}  [{r.source}{' @ ' + r.revision[:12] if r.revision else ''}]", flush=True)
        done.append(r)
    return done


def cmd_plan(args: argparse.Namespace) -> int:
    """Every notebook's predicted peak GPU memory and time in a profile, before anything runs or downloads."""
    if args.gpus:
        return _plan_gpus(args)
    from qlib import plans

    check_profile(args.profile)
    print(plans.table(plans.profile_plans(args.profile)))
    return 0


def _plan_gpus(args: argparse.Namespace) -> int:
    """Per-GPU peaks of DDP and FSDP-QLoRA on 1..N GPUs (the accounting), and the published points beside them."""
    from qlib import sharding

    try:
        gpus = sorted({int(g) for g in args.gpus.split(",")})
    except ValueError:
        raise QlabError(f"--gpus takes GPU counts such as 2 or 1,2,4, not {args.gpus!r}") from None
    if gpus[0] < 1:
        raise QlabError(f"--gpus must be at least 1, not {gpus[0]}")
    recipe = {k: v for k, v in (("batch", args.batch), ("seq", args.seq), ("rank", args.rank)) if v is not None}
    models = tuple(args.model.split(",")) if args.model else tuple(sharding.PLAN_MODELS)
    print(sharding.tables(models, tuple(gpus), **recipe))
    return 0


def cmd_assets(args: argparse.Namespace) -> int:
    from qlib import assets

    if args.fetch and args.profile not in (None, "default", "smoke"):
        fetch_profile(check_profile(args.profile))
        return 0
    if args.fetch:
        for r in assets.fetch_all():
            print(f"ok  {r.role:15s} {r.id}  [{r.source}]  {r.path}")
        if args.llama_cpp:
            from qlib.backends import gguf

            gguf.ensure_llama_cpp()
            print(f"ok  llama.cpp       llama-cpp-python {gguf.LLAMA_CPP_PYTHON} + converter in {gguf.tools_dir()}")
            print(f"ok  llama.cpp tools {', '.join(gguf.TOOLS)} in {gguf.tool(gguf.TOOLS[0]).parent}")
        if args.llama_variants:
            from qlib.backends import llama_variants

            print(f"ok  llama.cpp CPU variants ({', '.join(llama_variants.VARIANTS)}) in {llama_variants.lib_dir()}")
        return 0
    for row in assets.describe():
        print(f"{row['key']:24s} {row['role']:15s} {row['source']:40s} {row['what']}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Verify a saved artifact (model folder, adapter, switchable set, QAT INT8 folder, GGUF) loads whole."""
    from qlib.artifacts import verify

    print("\n".join(verify(args.path)))
    return 0


def cmd_render_check(args: argparse.Namespace) -> int:
    """Render executed notebooks in Chromium: each one's height and where its findings start; 2 if too far down."""
    paths = [Path(p) for p in args.notebooks] or sorted((repo_root() / "results" / "executed").glob("*.ipynb"))
    rendered = render.measure(paths)
    print(render.table(rendered))
    problems = [p for r in rendered for p in r.problems(args.findings_screens, args.max_px)]
    for p in problems:
        print(f"qlab: error: {p}", file=sys.stderr)
    return 2 if problems else 0


def cmd_formats(args: argparse.Namespace) -> int:
    """Every deployment format of one causal LM, written, reloaded in its runtime and measured (study 08's report)."""
    from transformers.utils import logging

    from qlib import formats_report

    logging.disable_progress_bar()  # one bar per format is the progress worth showing
    cfg = formats_report.Config(
        model=args.model, adapter=args.adapter, adapter_base=args.adapter_base, text=args.text,
        dataset=args.dataset or "stdlib-code", formats=tuple(args.formats.split(",")), context=args.context,
        eval_tokens=args.eval_tokens,
        gen_tokens=args.gen_tokens, repeats=args.repeats, timing_threads=args.threads, llama_build=args.llama_build,
        device=args.device,
        seed=args.seed, keep_lm_head_fp16=not args.quantize_lm_head, calibration=args.calibration,
        calib_samples=args.calib_samples, calib_length=args.calib_length, name=args.name)
    rep = formats_report.run(cfg)
    print(rep.table)
    print(f"\nwrote {rep.path.relative_to(repo_root()) if rep.path.is_relative_to(repo_root()) else rep.path} "
          "(+ per_token_nll.csv.gz, table.md, quality_vs_size.png beside it)")
    return 0


def _formats_parser(sub: Any) -> None:
    from qlib.formats import DEFAULT_FORMATS, VALID_FORMATS

    f = sub.add_parser("formats", help="what each deployment format of a causal LM costs: size, bits, perplexity, "
                                       "decode speed, memory (FP16, bitsandbytes, GGUF)")
    f.add_argument("model", help="a local Hugging Face folder, a registry key (smollm2-135m), or a hub id")
    f.add_argument("--adapter", help="a LoRA adapter folder, merged first (dequantize-then-merge on a 4-bit base)")
    f.add_argument("--adapter-base", choices=("fp32", "nf4"),
                   help="what the adapter was trained on (default: its qlab metadata, else fp32); nf4: merged into "
                        "the NF4-dequantized base")
    src = f.add_mutually_exclusive_group()
    src.add_argument("--text", help="a UTF-8 text file to measure perplexity on")
    src.add_argument("--dataset", help="a code dataset: stdlib-code (default, offline), codesearchnet-python, a folder")
    f.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                   help=f"comma-separated, from: {', '.join(VALID_FORMATS)}")
    f.add_argument("--calibration", help="a UTF-8 text file for the methods that calibrate (importance matrix, GPTQ, "
                                         "AWQ); default: the dataset's train split (for the shared set, its code and "
                                         "prose in the set's 3 : 1 mix), or the text beyond the scored tokens")
    f.add_argument("--calib-samples", type=int, default=64, help="calibration windows")
    f.add_argument("--name", help="keep this run as results/formats/<model>-<name>/ beside the default list's")
    f.add_argument("--calib-length", type=int, default=256, help="tokens per calibration window")
    f.add_argument("--context", type=int, default=256, help="perplexity window (stride = window)")
    f.add_argument("--eval-tokens", type=int, default=4096,
                   help="tokens scored; on the default dataset, the shared evaluation set's first eval-tokens/context "
                        "windows (held-out stdlib modules and BBC News articles, 3:1; 32768 = all 128)")
    f.add_argument("--gen-tokens", type=int, default=32, help="decode length (transformers decodes half)")
    f.add_argument("--repeats", type=int, default=3, help="interleaved decode repeats (median)")
    f.add_argument("--threads", type=int, default=1, help="decode threads (1: spinning workers collapse on a busy CPU)")
    f.add_argument("--llama-build", default="best",
                   help="llama.cpp's decode timing: best (the CPU variant ggml scores highest here; built once, "
                        "5-15 min; the wheel where it cannot be), wheel (the AVX2 llama-cpp-python), or a variant "
                        "name (zen4, icelake, ...)")
    f.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]: the PyTorch formats' device")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--quantize-lm-head", action="store_true", help="let bitsandbytes quantize an untied LM head")
    f.set_defaults(fn=cmd_formats)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m qlib", description=__doc__,
                                epilog="study 06 (switchable precision): python -m qlib train|eval|sensitivity|search "
                                       "--help")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run notebooks headless with papermill, then write the summary")
    r.add_argument("notebooks", nargs="*", help="stems or numbers (default: all)")
    r.add_argument("--profile", default="default", help=f"one of {', '.join(PROFILES)}")
    r.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="override one notebook parameter (as papermill -p)")
    r.set_defaults(fn=cmd_run)
    s = sub.add_parser("report", help="gather results/*/metrics.json into results/summary.md")
    s.add_argument("--profile", default="default")
    s.add_argument("--show", action="store_true", help="print the summary")
    s.add_argument("--readme", action="store_true", help="also refill the generated tables of README.md and docs/")
    s.set_defaults(fn=cmd_report)
    a = sub.add_parser("assets", help="list the model/data registry, or --fetch the offline defaults")
    a.add_argument("--fetch", action="store_true")
    a.add_argument("--llama-cpp", action="store_true",
                   help="with --fetch: also build llama-cpp-python and llama.cpp's quantize and imatrix tools (once, "
                        "cached) and unpack its converter")
    a.add_argument("--llama-variants", action="store_true",
                   help="with --fetch: also build llama.cpp once per x86 instruction set for study 07's roofline "
                        "(5-15 min once, cached; `make run` does it, `make test` does not need it)")
    a.add_argument("--profile", default=None,
                   help="with --fetch: download a profile's hub models and datasets into the HF cache (e.g. t4)")
    a.set_defaults(fn=cmd_assets)
    pl = sub.add_parser("plan", help="predicted peak GPU memory and time of every notebook in a profile")
    pl.add_argument("--profile", default="t4")
    pl.add_argument("--gpus", default=None, help="GPU counts (e.g. 1,2,4): per-GPU peaks of DDP and FSDP-QLoRA instead "
                    "of the profile's notebooks")
    pl.add_argument("--model", default=None,
                    help="with --gpus: models (default llama-2-7b,llama-2-13b,llama-2-70b; or hub ids with a known "
                    "config)")
    pl.add_argument("--batch", type=int, default=None, help="with --gpus: micro-batch per GPU (default 2)")
    pl.add_argument("--seq", type=int, default=None, help="with --gpus: sequence length (default 2048)")
    pl.add_argument("--rank", type=int, default=None, help="with --gpus: LoRA rank (default 64)")
    pl.set_defaults(fn=cmd_plan)
    i = sub.add_parser("inspect", help="verify that a saved artifact (model, adapter, QAT folder, GGUF) loads whole")
    i.add_argument("path")
    i.set_defaults(fn=cmd_inspect)
    rc = sub.add_parser("render-check", help="render executed notebooks in Chromium: height, where findings start")
    rc.add_argument("notebooks", nargs="*", help="executed notebooks (default: results/executed/*.ipynb)")
    rc.add_argument("--findings-screens", type=float, default=render.FINDINGS_SCREENS,
                    help="findings must start within this many screens")
    rc.add_argument("--max-px", type=int, default=render.MAX_HEIGHT_PX, help="the whole report within this height")
    rc.set_defaults(fn=cmd_render_check)
    _formats_parser(sub)
    return p


SWITCHABLE_COMMANDS = ("train", "eval", "sensitivity", "search")  # study 06: the seed's four scripts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SWITCHABLE_COMMANDS:
        from qlib.studies.switchable import main as switchable_main

        run = lambda: switchable_main(argv)  # noqa: E731
    else:
        def run() -> int:  # parsing inside the try below: a usage mistake is a QlabError too
            args = build_parser().parse_args(argv)
            return args.fn(args)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, handler in before.items():
        if handler is not signal.SIG_IGN:  # a background job keeps ignoring Ctrl-C
            signal.signal(sig, _stop)
    try:
        return run()
    except QlabError as e:
        print(f"qlab: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as e:
        import logging

        logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # the stopped kernel's pending cell, at exit
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else "terminated"
        print(f"\nqlab: {what}; nothing half-written was kept", file=sys.stderr)
        return 130 if what == "interrupted" else 143
    finally:
        for sig, handler in before.items():  # main() called in-process (tests, a notebook) leaves them as found
            if handler is not None:
                signal.signal(sig, handler)


class Terminated(BaseException):
    """SIGTERM, raised where the program is so that every clean-up on the way out runs (as for Ctrl-C)."""


def _stop(signum: int, frame: Any) -> None:
    """Ctrl-C or SIGTERM: the notebook kernel (its own session, so the terminal's signal never reached it) and what
    it started are stopped first, before they can print their own tracebacks; then the exception unwinds the run."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated
