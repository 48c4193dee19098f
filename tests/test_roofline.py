"""qlib.roofline and qlib.machine: exact parameter counts, the bytes and FLOPs a token costs, the ceilings, the
issue's checks on synthetic rows, bad input before anything is built."""
from pathlib import Path

import pytest
import torch

from qlib import machine, roofline
from qlib.backends import llama_variants
from qlib.core.errors import QlabError

CPU = torch.device("cpu")


@pytest.mark.parametrize("size", ["tiny", "60m", "135m"])
def test_parameter_counts_are_exact(size):
    """The formula against transformers' own model of the same config (meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(roofline.hf_config(size, 49152))
    assert roofline.n_params(size, 49152) == sum(p.numel() for p in model.parameters())


def test_smollm2_135m_shape_is_the_real_ones_parameter_count():
    assert roofline.n_params("135m", 49152) == 134_515_008  # SmolLM2-135M's published count


def test_bytes_and_flops_per_token():
    h, _, layers, heads, kv = roofline.SIZES["135m"]
    assert roofline.kv_bytes("135m", 100, 2) == 2 * layers * kv * (h // heads) * 100 * 2
    f0, f1 = roofline.flops_per_token("135m", 49152, 0), roofline.flops_per_token("135m", 49152, 10)
    assert f0 == 2 * (roofline.n_params("135m", 49152) - layers * 2 * h - h)
    assert f1 - f0 == layers * 4 * h * 10


def _rows(f16_s, q4_s, size="1b"):
    base = {"runtime": "llama.cpp", "size": size, "threads": 1}
    return [{**base, "format": "f16", "decode_s": f16_s}, {**base, "format": "q4_0", "decode_s": q4_s}]


def test_benchmark_pairs_rounds_and_needs_twice_f16():
    spec = roofline.Spec(sizes=("135m", "1b"))
    res = roofline.Result(_rows([2.0, 2.2, 2.1], [1.0, 1.0, 1.0]), [], {"cpu": {"isa": ["avx2"]}}, {})
    b = roofline.benchmark(res, spec)
    assert b["size"] == "1b" and b["q4_0_decode_vs_f16"]["ratio"] == pytest.approx(2.1) and b["q4_0_decode_ok"]
    assert b["q4_0_prefill_vs_avx2_min"] is None  # no AVX-512: the 1.3x prefill check does not apply
    res = roofline.Result(_rows([1.9, 1.9, 1.9], [1.0, 1.0, 1.0]), [], {"cpu": {"isa": ["avx512f"]}}, {})
    assert roofline.benchmark(res, spec)["q4_0_decode_ok"] is False
    assert roofline.speed_ratio(res.rows, "60m", "q4_0") is None


def test_bad_input_is_one_line_before_anything_is_built(monkeypatch):
    with pytest.raises(QlabError, match="unknown roofline size/format"):
        roofline.check(roofline.Spec(sizes=("7b",)), CPU)
    with pytest.raises(QlabError, match="more than this machine's"):
        roofline.check(roofline.Spec(sizes=("tiny",), threads=(1, 999)), CPU)
    import psutil

    class Mem:
        available = 2**30

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Mem)
    with pytest.raises(QlabError, match="roofline size 1b needs about .* GiB"):
        roofline.check(roofline.Spec(sizes=("tiny", "1b")), CPU)


def test_07_refuses_a_bad_roofline_before_its_ladder():
    from qlib.studies import llama_scaling

    cfg = llama_scaling.config("smoke", roofline_threads=(1, 999), device="cpu")
    with pytest.raises(QlabError, match="more than this machine's"):
        llama_scaling.run(cfg)


def test_ceilings_are_measured_and_positive():
    assert machine.read_bandwidth(1, CPU, buffer_bytes=16 << 20, repeats=2) > 1e8
    assert machine.matmul_throughput("fp32", 1, CPU, n=128, repeats=2) > 1e8
    assert "fp32" in machine.usable_dtypes(CPU)


def test_best_variant_leaves_amx_out_unless_asked():
    scores = {"haswell": 10, "skylakex": 20, "sapphirerapids": 90, "zen4": 0}
    assert llama_variants.best(scores) == "skylakex"
    assert llama_variants.best(scores, amx=True) == "sapphirerapids"
    with pytest.raises(QlabError, match="no llama.cpp CPU variant runs"):
        llama_variants.best({"haswell": 0})


def test_roofline_section_is_filled_from_07s_results(tmp_path, monkeypatch):
    from qlib import report, results

    monkeypatch.setenv("QLAB_ROOT", str(tmp_path))
    assert report.roofline_readme().startswith("No roofline")
    row = {"size": "1b", "runtime": "llama.cpp", "build": "zen4", "format": "q4_0", "threads": 1,
           "bytes_per_token": 600 * 2**20, "decode_tokens_per_s": 20.0, "decode_tokens_per_s_lo": 19.5,
           "decode_tokens_per_s_hi": 20.5, "bandwidth_fraction": 0.8, "prefill_tokens_per_s": 300.0,
           "prefill_flops_fraction": 0.4}
    env = {"device": "cpu", "cpu": "c", "isa": [], "threads": 2, "torch": "t"}
    results.write_metrics("07_llama_scaling", "default", 0, env, {}, [results.make_row("lora")],
                          roofline={"rows": [row], "builds": [], "findings": ["- a finding"]})
    text = report.roofline_readme()
    assert text.startswith("- a finding")
    assert "| 1b | llama.cpp (zen4) | q4_0 | 1 | 600.0 | 20.0 [19.5, 20.5] | 0.80 | 300 | 0.40 |" in text


def test_a_worker_that_dies_comes_back_as_one_line(monkeypatch):
    """A variant the CPU cannot run (SIGILL) or any crash of the worker: named, not raised."""
    import signal
    import subprocess

    class Done:
        returncode, stdout, stderr = -signal.SIGILL, "", "load_backend: loaded CPU backend from x.so\n"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Done)
    got = llama_variants.run_job({"build": llama_variants.WHEEL})
    assert got == {"crashed": "killed by SIGILL; its last line: load_backend: loaded CPU backend from x.so"}


def test_building_llama_cpp_without_cmake_is_one_line(monkeypatch, tmp_path):
    """The tools and the CPU variants share one build step (`gguf.cmake_vendored`); either names itself."""
    import shutil

    from qlib.backends import gguf

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(QlabError, match="building llama.cpp's CPU variants needs cmake"):
        llama_variants._build(tmp_path / "variants")
    with pytest.raises(QlabError, match="building llama.cpp's tools needs cmake"):
        gguf._build_tools(tmp_path / "tools")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_llama_build_resolves_to_a_variant_this_cpu_runs(monkeypatch):
    """05, 08 and `formats` time llama.cpp in the build a parameter names: checked before any work."""
    monkeypatch.setattr(llama_variants, "scores", lambda: {"haswell": 10, "zen4": 30, "sapphirerapids": 90})
    assert llama_variants.resolve("wheel") == "wheel"
    assert llama_variants.resolve("best") == "zen4"  # AMX left out unless asked
    assert llama_variants.resolve("haswell") == "haswell"
    monkeypatch.setattr(llama_variants, "scores", lambda: {"haswell": 10, "zen4": 0})
    with pytest.raises(QlabError, match="zen4 variant does not run on this CPU"):
        llama_variants.resolve("zen4")
    with pytest.raises(QlabError, match="llama_build must be one of wheel, best, haswell"):
        llama_variants.resolve("avx9")


def test_best_falls_back_to_the_wheel_in_one_line(monkeypatch, capsys):
    """"best" (05's, 08's and `formats`' default) is a preference: where no variant runs or none can be built, the
    wheel times the decode and the run says why; a named variant stays a requirement."""
    monkeypatch.setattr(llama_variants, "scores", lambda: {"haswell": 0, "zen4": 0})
    assert llama_variants.resolve("best") == "wheel"
    assert "timed in the AVX2 wheel: no llama.cpp CPU variant runs on this CPU" in capsys.readouterr().out

    def no_cmake():
        raise QlabError("building llama.cpp's CPU variants needs cmake")

    monkeypatch.setattr(llama_variants, "scores", no_cmake)
    assert llama_variants.resolve("best") == "wheel"
    assert "needs cmake" in capsys.readouterr().out
    with pytest.raises(QlabError, match="needs cmake"):
        llama_variants.resolve("zen4")


def test_decode_speeds_in_a_variant_come_from_the_worker(monkeypatch):
    """A variant's decode runs in a worker process: its per-repeat seconds become tokens/s; a crash is one line."""
    jobs = []

    def fake(job):
        jobs.append(job)
        return {k: {"prefill_s": [0.1] * 3, "decode_s": [0.5, 0.4, 0.8]} for k in job["paths"]} | {"system_info": ""}

    monkeypatch.setattr(llama_variants, "run_job", fake)
    got = llama_variants.decode_speeds({"a": "a.gguf", "b": "b.gguf"}, [1, 2, 3], n_new=8, threads=1, repeats=3,
                                       build="zen4")
    assert jobs[0]["build"] == "zen4" and jobs[0]["gen"] == 8 and jobs[0]["repeats"] == 3
    assert got["a"] == {"tokens_per_s": 16.0, "repeat_s": [0.5, 0.4, 0.8]}  # median of 8/0.5, 8/0.4, 8/0.8
    monkeypatch.setattr(llama_variants, "run_job", lambda job: {"crashed": "killed by SIGILL; its last line: x"})
    with pytest.raises(QlabError, match=r"llama.cpp \(zen4 build\) failed on a: killed by SIGILL"):
        llama_variants.decode_speeds({"a": "a.gguf"}, [1], n_new=2, build="zen4")


@pytest.mark.parametrize("study", ["gpt2_bitnet", "qwen_merge"])
def test_a_study_refuses_an_unknown_llama_build(study):
    import importlib

    mod = importlib.import_module(f"qlib.studies.{study}")
    with pytest.raises(QlabError, match="llama_build must be one of"):
        mod.config("smoke", llama_build="avx9")
    # the main run times this CPU's best build (make run builds it first); the tests and a T4 never build one
    assert mod.config("default").llama_build == "best" == mod.config("full").llama_build
    assert mod.config("smoke").llama_build == "wheel" == mod.config("t4").llama_build


def test_without_gguf_formats_the_roofline_is_transformers_only(monkeypatch):
    """The gpu profile's roofline (llama.cpp's wheel is CPU-only): no GGUF written or run, transformers rows with
    their fraction of the ceiling in the findings, the figure still drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from transformers import AutoTokenizer

    from qlib import assets

    monkeypatch.setattr(roofline, "gguf_files", lambda *a: pytest.fail("no GGUF without GGUF formats"))
    monkeypatch.setattr(machine, "MIN_BUFFER", 64 << 20)
    monkeypatch.setattr(machine, "last_level_cache_bytes", lambda: None)
    tok = Path(assets.resolve_model("llama-arch", "llama-stdlib-tiny").path)
    spec = roofline.Spec(sizes=("tiny",), formats=(), hf_sizes=("tiny",), hf_formats=("fp32", "bnb_nf4"),
                         threads=(1,), repeats=2, compare_sizes=(), vocab_size=len(AutoTokenizer.from_pretrained(tok)))
    res = roofline.run(spec, CPU, tok, variants=False)
    assert {(r["runtime"], r["format"]) for r in res.rows} == {("transformers", "fp32"), ("transformers", "bnb_nf4")}
    assert res.builds == [] and res.variants["scores"] is None
    assert any(line.startswith("- tiny, transformers on cpu, decode") for line in roofline.findings(res, spec))
    assert roofline.benchmark(res, spec)["q4_0_decode_vs_f16"] is None
    fig, ax = plt.subplots()
    assert roofline.plot(res.rows, res.ceilings, ax).get_lines()
    plt.close(fig)
