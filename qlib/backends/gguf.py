"""GGUF through llama.cpp's own tools: convert an HF folder, quantize, read back, run, measure.

Nothing here re-implements llama.cpp. The converter (`convert_hf_to_gguf.py` + its `conversion/`
package + the `gguf-py` it needs) ships only inside the llama-cpp-python source archive, so qlib
unpacks it from the pinned sdist (PyPI `gguf` lacks pieces the converter uses). The runtime is
llama-cpp-python built from that same sdist with GGML_NATIVE=OFF (ON segfaults on AMX CPUs with
GCC 12), once, and cached as a wheel under the qlab cache.
Timing note: llama.cpp's worker threads spin-wait; beside another CPU-bound process on 2 cores both
slowed by an order of magnitude here. Decode is timed with one thread, llama.cpp alone.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from qlib import fidelity, runmeta
from qlib.backends import gguf_table
from qlib.core.errors import QlabError
from qlib.core.io import atomic_dir
from qlib.core.paths import cache_dir
from qlib.core.pip import pip

LLAMA_CPP_PYTHON = "0.3.36"
_SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}"


def sdist() -> Path:
    """The pinned llama-cpp-python source archive (downloaded from PyPI once)."""
    dl = cache_dir() / "downloads"
    path = dl / f"{_SDIST}.tar.gz"
    if not path.is_file():
        dl.mkdir(parents=True, exist_ok=True)
        pip("download", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
             "-d", str(dl))
    return path


def tools_dir() -> Path:
    """llama.cpp's converter, its conversion package and gguf-py, unpacked from the sdist."""
    dest = cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    if (dest / "convert_hf_to_gguf.py").is_file():
        return dest
    prefix = f"{_SDIST}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(sdist()) as tar, atomic_dir(dest) as tmp:
        for m in tar.getmembers():
            rel = m.name[len(prefix):] if m.name.startswith(prefix) else ""
            if m.isfile() and rel.startswith(wanted):
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(m).read())  # type: ignore[union-attr]
    return dest


def ensure_llama_cpp() -> Any:
    """Import llama_cpp, building the pinned wheel once (minutes on 2 cores) if it is missing."""
    try:
        import llama_cpp

        return llama_cpp
    except ImportError:
        pass
    wheels = cache_dir() / "wheels"
    found = sorted(wheels.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}-*.whl"))
    if not found:
        print(f"building llama-cpp-python {LLAMA_CPP_PYTHON} from source (once; ~4 min on 2 cores)...",
              flush=True)
        env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF "
                                           "-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF"}
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir",
                            str(sdist()), "-w", str(wheels)], env=env, capture_output=True, text=True)
        found = sorted(wheels.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}-*.whl"))
        if r.returncode != 0 or not found:
            tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise QlabError(f"building llama-cpp-python failed: {tail}")
    pip("install", str(found[-1]))
    import importlib

    importlib.invalidate_caches()
    import llama_cpp

    return llama_cpp


TOOLS = ("llama-quantize", "llama-imatrix")


def tool(name: str) -> Path:
    """One of llama.cpp's command-line tools, built from the pinned sdist once (~6 min on 2 cores) and cached.
    The Python package ships only the libraries, and an importance matrix reaches llama.cpp's quantizer only as a
    C++ std::unordered_map (`llama_model_quantize_params.imatrix`), which ctypes cannot build: the quantize tool
    reads it from a file. `llama-imatrix` is built beside it to check qlib's own matrix against."""
    if name not in TOOLS:
        raise QlabError(f"unknown llama.cpp tool {name!r}; qlib builds {', '.join(TOOLS)}")
    dest = cache_dir() / f"llama.cpp-tools-{LLAMA_CPP_PYTHON}"
    if not (dest / name).is_file():
        _build_tools(dest)
    return dest / name


def _build_tools(dest: Path) -> None:
    """cmake the vendored llama.cpp (static, GGML_NATIVE=OFF like the Python wheel, nothing downloaded)."""
    import shutil

    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF",
             "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_CURL=OFF"]
    note = f"building llama.cpp's {' and '.join(TOOLS)} {LLAMA_CPP_PYTHON} from source (once; ~6 min on 2 cores)..."
    with cmake_vendored("llama.cpp's tools", flags, list(TOOLS), note) as build, atomic_dir(dest) as out:
        for t in TOOLS:
            shutil.copy2(build / "bin" / t, out / t)


@contextlib.contextmanager
def cmake_vendored(what: str, flags: list[str], targets: list[str], note: str) -> Iterator[Path]:
    """Build `targets` of the llama.cpp the pinned sdist vendors, with `flags`, in a temporary folder (nothing
    downloaded; `note` printed first): yields the build folder, removed after the block. No cmake, or a failed
    step, is one line naming `what`."""
    import shutil

    cmake = shutil.which("cmake")
    if cmake is None:
        raise QlabError(f"building {what} needs cmake (apt-get install cmake, or pip install cmake)")
    print(note, flush=True)
    prefix = f"{_SDIST}/vendor/llama.cpp/"
    with tempfile.TemporaryDirectory(prefix="qlab-llama-build-") as work:
        with tarfile.open(sdist()) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(Path(work) / "src", members=members, filter="data")
        for cmd in ([cmake, "-S", "src", "-B", "build", *flags],
                    [cmake, "--build", "build", "-j", str(os.cpu_count() or 2), "--target", *targets]):
            r = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
            if r.returncode != 0:
                tail = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip()][-1:] or ["(no output)"]
                raise QlabError(f"building {what} failed ({' '.join(cmd[1:3])}): {tail[0][:300]}")
        yield Path(work) / "build"


_RUNNER = """
import runpy, sys
tools, src, out, outtype, pre = sys.argv[1:6]
sys.path[:0] = [tools, tools + "/gguf-py"]
if pre:
    # qlib's tokenizers are byte-level BPE with GPT-2's (or Qwen2's) pre-tokenizer but a vocabulary whose
    # hash llama.cpp has never seen; tell the converter what they are instead of letting it refuse them.
    from conversion import base
    known = base.TextModel.get_vocab_base_pre
    def get_vocab_base_pre(self, tokenizer):
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            return pre
    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = ["convert_hf_to_gguf.py", src, "--outfile", out, "--outtype", outtype]
runpy.run_path(tools + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def _staged(src: Path, stage: Path) -> Path:
    """The HF folder as the converter expects it: files linked, config.json completed.

    transformers 5 no longer writes GPT-2's legacy `n_ctx`, which llama.cpp's GPT-2 converter reads.
    """
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("model_type") != "gpt2" or "n_ctx" in cfg:
        return src
    stage.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "config.json":
            (stage / f.name).symlink_to(f.resolve())
    (stage / "config.json").write_text(json.dumps({**cfg, "n_ctx": cfg["n_positions"]}, indent=2))
    return stage


def convert(hf_dir: str | Path, out: str | Path, outtype: str = "f16", pre_tokenizer: str | None = None) -> Path:
    """HF folder -> GGUF with llama.cpp's converter; a failure leaves no file that looks complete.
    `pre_tokenizer` names llama.cpp's pre-tokenizer (gpt-2, qwen2) for a tokenizer it does not recognise."""
    src, dst = Path(hf_dir), Path(out)
    for need in ("config.json", "tokenizer.json"):
        if not (src / need).is_file():
            raise QlabError(f"cannot convert {src} to GGUF: {need} is missing (tokenizer files must "
                            "travel with the model)")
    tmp = dst.with_name(f".{dst.name}.tmp")
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".stage-") as stage:
        r = subprocess.run([sys.executable, "-c", _RUNNER, str(tools_dir()), str(_staged(src, Path(stage))),
                            str(tmp), outtype, pre_tokenizer or ""], capture_output=True, text=True)
    if r.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        tail = [line for line in r.stderr.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        raise QlabError(f"GGUF conversion of {src} ({outtype}) failed: {tail[0][:300]}")
    os.replace(tmp, dst)
    return dst


_READERS: dict[tuple[int, ...], Any] = {}


def _reader(path: str | Path) -> Any:
    """llama.cpp's own GGUF reader (its vendored gguf-py) over a file; an unreadable file is one clear error. One
    reader per file version, kept for the last few files (a renamed file keeps its inode): parsing a 150k-token
    vocabulary takes half a minute."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise QlabError(f"{path} is not a readable GGUF file: {type(e).__name__}: {e}") from None
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _READERS:
        try:
            reader = _gguf_py().GGUFReader(str(path))
        except Exception as e:
            _table(path)  # names a truncated file as truncated (gguf-py says "cannot reshape ...")
            raise QlabError(f"{path} is not a readable GGUF file: {type(e).__name__}: {e}") from None
        while len(_READERS) >= 4:
            _READERS.pop(next(iter(_READERS)))
        _READERS[key] = reader
    return _READERS[key]


def read_tensors(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (GGML type name, shape as GGUF stores it), from the file's header."""
    return {name: (t.type, t.shape) for name, t in _table(path).items()}


def _table(path: str | Path) -> dict[str, gguf_table.TensorInfo]:
    """The tensor table from the header alone (gguf-py's reader would first parse the whole vocabulary)."""
    g = _gguf_py()
    return gguf_table.tensor_table(path, g.GGML_QUANT_SIZES, g.GGMLQuantizationType)


def _gguf_py() -> Any:
    """The `gguf` package (llama.cpp's gguf-py; the vendored copy where PyPI's is not already imported)."""
    sys.path.insert(0, str(tools_dir() / "gguf-py"))
    try:
        import gguf as gguf_py
    finally:
        sys.path.pop(0)
    return gguf_py


def gguf_names(model_gguf: str | Path, hf_names: list[str]) -> dict[str, str]:
    """Hugging Face weight names -> the tensor names llama.cpp's converter gave them in `model_gguf` (its
    architecture's name map); a name the file does not hold is one error naming it."""
    g, reader = _gguf_py(), _reader(model_gguf)
    arch = reader.get_field("general.architecture").contents()
    blocks = int(reader.get_field(f"{arch}.block_count").contents())
    model_arch = next((a for a, n in g.MODEL_ARCH_NAMES.items() if n == arch), None)
    if model_arch is None:
        raise QlabError(f"{model_gguf}: gguf-py has no tensor-name map for architecture {arch!r}")
    names, held = g.get_tensor_name_map(model_arch, blocks), {t.name for t in reader.tensors}
    out = {h: names.get_name(h, try_suffixes=(".weight", ".bias")) for h in hf_names}
    bad = [h for h, n in out.items() if n not in held]
    if bad:
        raise QlabError(f"importance matrix does not match {Path(model_gguf).name}: no tensor for "
                        f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} ({len(bad)} of {len(out)})")
    return out  # type: ignore[return-value]


def write_imatrix(stats: dict[str, Any], model_gguf: str | Path, out: str | Path, datasets: list[str],
                  chunk_size: int) -> Path:
    """An importance matrix (`quant.imatrix.collect`'s Hugging Face names -> Stat) as the GGUF file llama-imatrix
    writes (`<tensor>.in_sum2`, `<tensor>.counts`, F32), named after `model_gguf`'s tensors; atomic."""
    g, out = _gguf_py(), Path(out)
    names, shapes = gguf_names(model_gguf, sorted(stats)), read_tensors(model_gguf)
    tmp = out.with_name(f".{out.name}.tmp")
    w = g.GGUFWriter(str(tmp), "imatrix")
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", list(datasets))
    w.add_uint32("imatrix.chunk_count", max(1, max(s.count for s in stats.values()) // chunk_size))
    w.add_uint32("imatrix.chunk_size", chunk_size)
    for hf, name in sorted(names.items(), key=lambda kv: kv[1]):
        s = stats[hf]
        if shapes[name][1][0] != s.in_sum2.size:
            raise QlabError(f"importance matrix does not match {Path(model_gguf).name}: {name} takes "
                            f"{shapes[name][1][0]} inputs, the matrix has {s.in_sum2.size}")
        w.add_tensor(f"{name}.in_sum2", s.in_sum2.astype(np.float32).reshape(1, -1))
        w.add_tensor(f"{name}.counts", np.array([[s.count]], dtype=np.float32))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def read_imatrix(path: str | Path) -> dict[str, tuple[np.ndarray, float]]:
    """An importance-matrix GGUF file (llama-imatrix's or qlib's): tensor -> (in_sum2, count)."""
    ts = {t.name: np.asarray(t.data, dtype=np.float64).reshape(-1) for t in _reader(path).tensors}
    return {n.removesuffix(".in_sum2"): (v, float(ts[n.removesuffix(".in_sum2") + ".counts"][0]))
            for n, v in ts.items() if n.endswith(".in_sum2")}


def tensor_types(path: str | Path) -> dict[str, str]:
    """Tensor name -> GGML type name (checks what was written)."""
    return {name: kind for name, (kind, _) in read_tensors(path).items()}


def load(path: str | Path, n_ctx: int, threads: int) -> Any:
    """A GGUF file in llama.cpp (all logits kept, for scoring); a file it cannot load is one line."""
    llama_cpp = ensure_llama_cpp()
    try:
        with _captured_stderr():
            return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=threads,
                                   n_batch=n_ctx, verbose=False)
    except Exception as e:
        raise QlabError(f"llama.cpp cannot load {path}: {e}") from None


def tokenize(path: str | Path, texts: list[str]) -> list[list[int]]:
    """llama.cpp's own token ids for each text (its vocabulary only; no BOS, special tokens as text): the
    other runtime's view, to check a Hugging Face tokenizer against."""
    llama_cpp = ensure_llama_cpp()
    try:
        with _captured_stderr():
            llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    except Exception as e:
        raise QlabError(f"llama.cpp cannot read the vocabulary of {path}: {e}") from None
    return [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in texts]


def window_logits(path: str | Path, tokens: list[int], context: int,
                  threads: int = 2) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(logits, targets) in llama.cpp over non-overlapping windows of `context` tokens (each window's first token
    has no history and is not scored): the same tokens, in the same order, as `metrics.window_logits` in
    transformers, so the two runtimes pair up."""
    llm = load(path, context, threads)
    for start in range(0, len(tokens) - 1, context):
        chunk = tokens[start:start + context]
        if len(chunk) < 2:
            break
        llm.reset()
        llm.eval(chunk)
        yield np.asarray(llm.scores[: len(chunk) - 1], dtype=np.float32), np.asarray(chunk[1:])


def token_nll(path: str | Path, tokens: list[int], context: int, threads: int = 2) -> np.ndarray:
    """Negative log-likelihood of every scored token in llama.cpp over `window_logits`' windows."""
    return fidelity.score(window_logits(path, tokens, context, threads))[0].nll


def perplexity(path: str | Path, tokens: list[int], context: int, threads: int = 2) -> dict[str, float]:
    """Perplexity in llama.cpp over non-overlapping windows of `context` tokens (stride = context)."""
    nll = token_nll(path, tokens, context, threads)
    return {"perplexity": math.exp(float(nll.mean())), "context": context, "stride": context, "tokens": int(nll.size)}


def _decode_once(llm: Any, prompt: list[int], n_new: int) -> float:
    llm.reset()
    llm.eval(prompt)
    t0 = time.perf_counter()
    for _ in range(n_new):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return n_new / (time.perf_counter() - t0)


def decode_speed(path: str | Path, prompt: list[int], n_new: int, threads: int = 1,
                 repeats: int = 3) -> float:
    """Greedy decode tokens/s in llama.cpp (prompt evaluated first, not timed); median of repeats."""
    return decode_speeds({"m": path}, prompt, n_new, threads, repeats)["m"]["tokens_per_s"]


def decode_speeds(paths: dict[str, str | Path], prompt: list[int], n_new: int, threads: int = 1,
                  repeats: int = 3) -> dict[str, dict[str, Any]]:
    """Several GGUF files decoded in turn, repeat by repeat (interleaved, so drift hits all alike);
    median tokens/s each and each repeat's seconds. The ratio between them is the number to trust, not the
    absolute rate. (In one of llama.cpp's CPU variants instead of the wheel: `llama_variants.decode_speeds`.)
    One thread by default: llama.cpp's workers spin, and two spinning threads on a 2-core machine collapse
    3-5x as soon as anything else runs."""
    models = {k: load(p, len(prompt) + n_new + 1, threads) for k, p in paths.items()}
    for llm in models.values():
        _decode_once(llm, prompt, min(n_new, 4))  # warm-up
    rates: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for k, llm in models.items():
            rates[k].append(_decode_once(llm, prompt, n_new))
    return {k: {"tokens_per_s": float(np.median(v)), "repeat_s": [n_new / r for r in v]} for k, v in rates.items()}


def tokenizer_agreement(path: str | Path, tokenizer: Any, texts: list[str]) -> dict[str, Any]:
    """How many texts a Hugging Face tokenizer and the GGUF's own vocabulary turn into the same ids (no
    special tokens): a model shipped as GGUF must read text as it was trained and evaluated on."""
    ours = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    theirs = tokenize(path, texts)
    same = sum(a == b for a, b in zip(ours, theirs))
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    return {"texts": len(texts), "identical": same, "first_mismatch": first}


def ship(written: str | Path, info: Any, task: str, peft: str, outtype: str, folder: str | Path | None = None,
         **extra: Any) -> Path:
    """Rename a GGUF file `convert` / `quantize` wrote to its run name (`info`: a `runmeta.RunInfo`; method GGUF,
    the type as variant, bits per weight matrix as stored, the output tensor's type as head), its metadata
    beside it."""
    src = Path(written)
    bits = round(bits_per_weight(src)["weight_matrices"], 2)
    types = tensor_types(src)
    head = (types.get("output.weight") or types.get("token_embd.weight") or "none").lower()
    name = info.name(task, peft, "gguf", bits, head, variant=outtype)
    dst = Path(folder or src.parent) / (name + ".gguf")
    runmeta.write_meta(dst, info.meta(name, "gguf", "gguf", head, weights_bits=bits,
                                      extras={"type": outtype, "runtime": "llama.cpp"}, **extra))
    os.replace(src, dst)
    return dst


def bits_per_weight(path: str | Path) -> dict[str, float]:
    """Stored bits per element: over every tensor, and over the 2-D weight matrices only (what a format
    quantizes; norms and biases stay F32), from the tensors' own byte sizes, header excluded."""
    tensors = list(_table(path).values())
    mats = [t for t in tensors if len(t.shape) == 2]
    return {"all_tensors": 8.0 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors),
            "weight_matrices": 8.0 * sum(int(t.n_bytes) for t in mats) / sum(int(t.n_elements) for t in mats)}


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """llama.cpp logs every tensor, to fd 2 from C and to sys.stderr through llama-cpp-python's log
    callback: keep both out of notebooks, keep them for error messages."""
    import io

    sys.stderr.flush()
    saved, lines, py = os.dup(2), [], io.StringIO()
    with tempfile.TemporaryFile(mode="w+") as log:
        os.dup2(log.fileno(), 2)
        try:
            with contextlib.redirect_stderr(py):
                yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            lines += [ln for ln in (log.read() + py.getvalue()).splitlines() if ln.strip()]


# llama.cpp's file types that need no importance matrix (each takes one to weight its rounding, too)
QUANT_TYPES = ("q8_0", "q6_k", "q5_0", "q5_1", "q5_k_m", "q5_k_s", "q4_0", "q4_1", "q4_k_m", "q4_k_s", "iq4_nl",
               "iq4_xs", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k", "q2_k_s", "q2_0", "tq1_0", "tq2_0")
# ... and those that need one (llama.cpp refuses them without)
IMATRIX_TYPES = ("iq3_s", "iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s")


def quantize(src: str | Path, dst: str | Path, qtype: str = "q4_0", threads: int = 2,
             imatrix: str | Path | None = None) -> Path:
    """GGUF -> GGUF with llama.cpp's own quantizer, atomic like `convert`: `llama_model_quantize` through
    llama-cpp-python, or with an importance matrix file, llama.cpp's quantize tool (`tool`)."""
    import ctypes

    if qtype not in QUANT_TYPES + IMATRIX_TYPES:
        raise QlabError(f"unknown GGUF quantization {qtype!r}; valid: {', '.join(QUANT_TYPES + IMATRIX_TYPES)}")
    if qtype in IMATRIX_TYPES and imatrix is None:
        raise QlabError(f"GGUF {qtype} needs an importance matrix (calibration text); none was given")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise QlabError(f"cannot quantize {src}: file is missing")
    tmp = dst.with_name(f".{dst.name}.tmp")
    if imatrix is not None:
        return _quantize_tool(src, dst, tmp, qtype, threads, Path(imatrix))
    llama_cpp = ensure_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    params.nthread = threads
    with _captured_stderr() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        last = log[-1] if log else "(no output)"
        raise QlabError(f"llama.cpp could not quantize {src} to {qtype} (return code {rc}): {last[:300]}")
    os.replace(tmp, dst)
    return dst


def _quantize_tool(src: Path, dst: Path, tmp: Path, qtype: str, threads: int, imatrix: Path) -> Path:
    """`llama-quantize --imatrix`: the one door through which an importance matrix reaches llama.cpp's quantizer."""
    if not imatrix.is_file():
        raise QlabError(f"importance matrix file is missing: {imatrix}")
    r = subprocess.run([str(tool("llama-quantize")), "--imatrix", str(imatrix), str(src), str(tmp), qtype.upper(),
                        str(threads)], capture_output=True, text=True)
    if r.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        lines = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if "error" in ln.lower() or "fail" in ln.lower()), lines[-1] if lines
                   else "(no output)")
        raise QlabError(f"llama.cpp could not quantize {src} to {qtype} with {imatrix.name} "
                        f"(return code {r.returncode}): {why.strip()[:300]}")
    os.replace(tmp, dst)
    return dst
