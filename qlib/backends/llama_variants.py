"""llama.cpp with its CPU code built once per x86 instruction set, the best one this machine runs chosen at run time.

The llama-cpp-python wheel qlib builds (`gguf.ensure_llama_cpp`) is compiled for AVX2 (GGML_NATIVE=OFF: a native
build crashed on an Intel CPU with AMX under GCC 12, and a wheel built on one CI machine must run on the next). ggml
can instead build its CPU backend as one loadable library per instruction set (GGML_BACKEND_DL +
GGML_CPU_ALL_VARIANTS) and score each against the running CPU; llama-cpp-python 0.3.36 neither installs those
libraries where ggml looks nor binds the loader (llama-cpp-python#2069). So qlib builds the vendored llama.cpp
itself (the libraries only, the variants x86 machines in CI have), points llama-cpp-python at them
(LLAMA_CPP_LIB_PATH) in a separate process, scores the variants with ggml's own `ggml_backend_score` and loads the
best. AMX (the `sapphirerapids` variant) is left out unless asked for: ggml's AMX path crashed before here, and a
crash stays inside the worker process.

`python -m qlib.backends.llama_variants JOB.json` is that worker: it prints the job's measurements as JSON.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from qlib.core.errors import QlabError
from qlib.core.io import atomic_dir
from qlib.core.paths import cache_dir

# the x86 variants built (ggml's names, fewest features first); the others in ggml's list are older CPUs than CI's
VARIANTS = ("haswell", "skylakex", "icelake", "cooperlake", "zen4", "alderlake", "sapphirerapids")
AMX_VARIANTS = ("sapphirerapids",)
WHEEL = "wheel"  # the installed llama-cpp-python (AVX2), the build the variants are compared with


def _version() -> str:
    from qlib.backends.gguf import LLAMA_CPP_PYTHON

    return LLAMA_CPP_PYTHON


def lib_dir() -> Path:
    """The built libraries: libllama, libggml, libggml-base and one libggml-cpu-<variant>.so per variant."""
    dest = cache_dir() / f"llama.cpp-variants-{_version()}"
    if not all((dest / f"libggml-cpu-{v}.so").is_file() for v in VARIANTS):
        _build(dest)
    return dest


def _build(dest: Path) -> None:
    """cmake the vendored llama.cpp as shared libraries with every CPU variant (5-15 min on 2 cores, once)."""
    from qlib.backends.gguf import cmake_vendored

    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_BACKEND_DL=ON",
             "-DGGML_CPU_ALL_VARIANTS=ON", "-DGGML_NATIVE=OFF", "-DCMAKE_BUILD_RPATH=$ORIGIN",
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
             "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF"]
    targets = ["llama", *(f"ggml-cpu-{v}" for v in VARIANTS)]
    note = f"building llama.cpp {_version()} with its CPU variants ({', '.join(VARIANTS)}) once; 5-15 min on 2 cores"
    with cmake_vendored("llama.cpp's CPU variants", flags, targets, note) as build, atomic_dir(dest) as out:
        for so in build.rglob("*.so*"):
            if so.is_file() and not so.is_symlink():
                shutil.copy2(so, out / so.name)
        for so in build.rglob("*.so*"):  # sonames: libggml.so -> libggml.so.0 -> libggml.so.0.x.y
            if so.is_symlink() and not (out / so.name).exists():
                os.symlink(os.readlink(so), out / so.name)


def scores() -> dict[str, int]:
    """ggml's score of each variant on this CPU (0: the CPU lacks one of its instruction sets), asked in a worker
    process (the variants' libggml-base must not meet the wheel's in one process)."""
    got = run_job({"build": "scores"})
    if "crashed" in got:
        raise QlabError(f"scoring llama.cpp's CPU variants failed: {got['crashed']}")
    return {v: int(s) for v, s in got.items()}


def _scores_here(libs: Path) -> dict[str, int]:
    ctypes.CDLL(str(libs / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    out = {}
    for v in VARIANTS:
        fn = ctypes.CDLL(str(libs / f"libggml-cpu-{v}.so")).ggml_backend_score
        fn.restype = ctypes.c_int
        out[v] = int(fn())
    return out


def best(score: dict[str, int], amx: bool = False) -> str:
    """The highest-scoring variant this CPU runs (AMX only when asked for)."""
    ok = {v: s for v, s in score.items() if s > 0 and (amx or v not in AMX_VARIANTS)}
    if not ok:
        raise QlabError(f"no llama.cpp CPU variant runs on this CPU (scores {score}); the AVX2 wheel is the fallback")
    return max(ok, key=lambda v: ok[v])


BUILDS = (WHEEL, "best", *VARIANTS)  # what a study's `llama_build` parameter may name


def check_build(build: str) -> str:
    """A study's `llama_build` parameter, refused in one line unless it names a build (no build or scoring here)."""
    if build not in BUILDS:
        raise QlabError(f"llama_build must be one of {', '.join(BUILDS)}, got {build!r}")
    return build


def resolve(build: str, amx: bool = False) -> str:
    """A `llama_build` parameter made concrete: the AVX2 wheel, a named variant (one line if this CPU cannot run it),
    or "best", the highest-scoring variant here (building the variants once if they are missing; the wheel, said in
    one line, where they cannot be built or none runs: "best" is a preference, not a requirement)."""
    if check_build(build) == WHEEL:
        return WHEEL
    if build == "best":
        try:
            return best(scores(), amx)
        except QlabError as e:
            print(f"qlab: llama.cpp's decode is timed in the AVX2 wheel: {e}")
            return WHEEL
    score = scores()
    if score.get(build, 0) <= 0:
        raise QlabError(f"llama.cpp's {build} variant does not run on this CPU (ggml's scores: {score})")
    return build


def run_job(job: dict[str, Any], timeout_s: float = 900) -> dict[str, Any]:
    """Run one job in a worker process on `job['build']` (WHEEL, a variant name, or "scores"); a crash there
    (an instruction set the CPU lacks, ggml's AMX path) comes back as {"crashed": reason}."""
    env = dict(os.environ)
    if job["build"] != WHEEL:
        env["LLAMA_CPP_LIB_PATH"] = str(lib_dir())
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    try:
        r = subprocess.run([sys.executable, "-m", "qlib.backends.llama_variants", f.name], env=env,
                           capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"crashed": f"timed out after {timeout_s:.0f} s"}
    finally:
        os.unlink(f.name)
    if r.returncode != 0:
        how = f"killed by {signal.Signals(-r.returncode).name}" if r.returncode < 0 else f"exit status {r.returncode}"
        tail = [ln for ln in r.stderr.splitlines() if ln.strip()][-1:] or ["(no output)"]
        return {"crashed": f"{how}; its last line: {tail[0][:200]}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def decode_speeds(paths: dict[str, str | Path], prompt: list[int], n_new: int, threads: int = 1, repeats: int = 3,
                  build: str = WHEEL) -> dict[str, dict[str, Any]]:
    """`gguf.decode_speeds` in `build` (a `resolve`d name): the wheel in this process, a CPU variant in a worker
    process (its libraries cannot meet the wheel's in one process); the same keys either way."""
    if build == WHEEL:
        from qlib.backends import gguf

        return gguf.decode_speeds(paths, prompt, n_new, threads, repeats)
    return _decode_in_worker(paths, prompt, n_new, threads, repeats, build)


def measure(build: str, paths: dict[str, str | Path], prompt: list[int], gen: int, threads: int,
            repeats: int) -> dict[str, Any]:
    """`measure_gguf` in a worker process on `build`; a crash there is one line naming the build and the files."""
    got = run_job({"build": build, "paths": {k: str(p) for k, p in paths.items()}, "prompt": prompt, "gen": gen,
                   "threads": threads, "repeats": repeats})
    if "crashed" in got:
        raise QlabError(f"llama.cpp ({build} build) failed on {', '.join(paths)}: {got['crashed']}")
    return got


def _decode_in_worker(paths: dict[str, str | Path], prompt: list[int], n_new: int, threads: int, repeats: int,
                      build: str) -> dict[str, dict[str, Any]]:
    got = measure(build, paths, prompt, n_new, threads, repeats)
    return {k: {"tokens_per_s": float(np.median([n_new / s for s in got[k]["decode_s"]])),
                "repeat_s": list(got[k]["decode_s"])} for k in paths}


def _load_variant(variant: str) -> None:
    """Register `variant`'s CPU backend before llama.cpp looks for backends (it then finds one and stops)."""
    libs = Path(os.environ["LLAMA_CPP_LIB_PATH"])
    ggml = ctypes.CDLL(str(libs / "libggml.so"), mode=ctypes.RTLD_GLOBAL)
    ggml.ggml_backend_load.restype = ctypes.c_void_p
    if not ggml.ggml_backend_load(str(libs / f"libggml-cpu-{variant}.so").encode()):
        raise QlabError(f"ggml could not load the {variant} CPU variant from {libs}")


def measure_gguf(job: dict[str, Any]) -> dict[str, Any]:
    """In a worker process: each format's prefill and decode seconds, `repeats` rounds interleaved over formats,
    and llama.cpp's own account of the instruction sets it runs."""
    import llama_cpp

    prompt, gen, threads = job["prompt"], job["gen"], job["threads"]
    models = {fmt: llama_cpp.Llama(model_path=p, n_ctx=len(prompt) + gen + 8, n_batch=len(prompt),
                                   n_threads=threads, n_threads_batch=threads, verbose=False)
              for fmt, p in job["paths"].items()}
    out: dict[str, Any] = {fmt: {"prefill_s": [], "decode_s": []} for fmt in models}
    for llm in models.values():
        _prefill_decode(llm, prompt[:8], 2)  # warm-up
    for _ in range(job["repeats"]):
        for fmt, llm in models.items():
            p, d = _prefill_decode(llm, prompt, gen)
            out[fmt]["prefill_s"].append(p)
            out[fmt]["decode_s"].append(d)
    out["system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace")
    return out


def _prefill_decode(llm: Any, prompt: list[int], gen: int) -> tuple[float, float]:
    """Seconds to evaluate the prompt in one batch, and to decode `gen` tokens greedily after it."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for _ in range(gen):
        llm.eval([int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))))])
    return t1 - t0, time.perf_counter() - t1


def _worker(path: str) -> None:
    job = json.loads(Path(path).read_text())
    if job["build"] == "scores":
        print(json.dumps(_scores_here(Path(os.environ["LLAMA_CPP_LIB_PATH"]))))
        return
    if job["build"] != WHEEL:
        _load_variant(job["build"])
    print(json.dumps(measure_gguf(job)))


if __name__ == "__main__":
    _worker(sys.argv[1])
