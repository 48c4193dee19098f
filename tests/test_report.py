import json
import os
import re

import pytest

from qlib import report, results
from qlib.core.errors import QlabError
from qlib.core.io import atomic_dir, atomic_write_text
from qlib.studies import baseline, llama_scaling, ptq, qlora_bert


def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new content")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_atomic_write_respects_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o644
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "model") as d:
            atomic_write_text(d / "config.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    assert (tmp_path / "model" / "config.json").stat().st_mode & 0o777 == 0o644


def test_atomic_write_failure_on_new_file_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("rename failed")))
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "new.json", "x")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_is_all_or_nothing(tmp_path):
    target = tmp_path / "baseline-model"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("crash mid-save")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(target) as d:
        (d / "a").write_text("1")
    with atomic_dir(target) as d:
        (d / "b").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baseline-model"]
    assert sorted(p.name for p in target.iterdir()) == ["b"]


def test_make_row_fills_every_schema_key_with_null():
    row = results.make_row("ptq_int8_dynamic", accuracy=0.9, latency_ms_b8=3.0, f1=float("nan"))
    assert set(results.ROW_KEYS) <= set(row)
    assert row["perplexity"] is None and row["f1"] is None and row["latency_ms_b8"] == 3.0
    with pytest.raises(ValueError):
        results.make_row("FP32")


def test_write_and_load_metrics_round_trip(tmp_path):
    rows = [results.make_row("fp32", accuracy=0.5)]
    p = results.write_metrics("99_x", "smoke", 0, {"device": "cpu"}, {"model": {"id": "m"}}, rows,
                              out_dir=tmp_path)
    doc = results.load_metrics(p)
    assert doc["rows"][0]["accuracy"] == 0.5 and doc["rows"][0]["em"] is None
    assert doc["study"] == "99_x" and doc["profile"] == "smoke"


def test_bad_metrics_are_named(tmp_path):
    with pytest.raises(QlabError, match="lacks keys"):
        results.write_metrics("x", "smoke", 0, {}, {}, [{"method": "fp32"}], out_dir=tmp_path)
    assert not (tmp_path / "metrics.json").exists()
    bad = tmp_path / "metrics.json"
    bad.write_text("{not json")
    with pytest.raises(QlabError, match="corrupt results file"):
        results.load_metrics(bad)
    bad.write_text(json.dumps({"study": "x"}))
    with pytest.raises(QlabError, match="missing top-level keys"):
        results.load_metrics(bad)


def test_summary_lists_each_study(tmp_path, monkeypatch):
    monkeypatch.setenv("QLAB_ROOT", str(tmp_path))
    rows = [results.make_row("fp32", model="m", accuracy=0.81, size_bytes=2**20)]
    env = {"device": "cpu", "cpu": "test-cpu", "isa": ["avx2"], "threads": 2, "torch": "t"}
    results.write_metrics("01_baseline", "default", 0, env, {"model": {"id": "m", "source": "s"}}, rows,
                          readme=baseline.README)
    text = report.write_summary("default").read_text()
    assert "## 01_baseline" in text and "0.810" in text and "| 1.0 |" in text and "size (MiB)" in text
    assert "BERT compression" not in text  # one study alone makes no cross table
    ptq_rows = [results.make_row("ptq_int8_dynamic", model="m", accuracy=0.80, size_bytes=2**18)]
    results.write_metrics("02_ptq", "default", 0, env, {"model": {"id": "m", "source": "s"}}, ptq_rows,
                          readme=ptq.README)  # each study names its rows of the cross-study table
    text = report.write_summary("default").read_text()
    assert "## BERT compression" in text and "| 02_ptq | ptq_int8_dynamic | m | 0.800 |" in text
    with pytest.raises(QlabError, match="no results for profile 'smoke'"):
        report.write_summary("smoke")


def test_readme_table_is_filled_from_results(tmp_path, monkeypatch):
    monkeypatch.setenv("QLAB_ROOT", str(tmp_path))
    env = {"device": "cpu", "cpu": "c", "isa": [], "threads": 2, "torch": "t"}
    rows = [results.make_row("fp32", accuracy=0.8, size_bytes=2**21),
            results.make_row("ptq_int8_dynamic", accuracy=0.79, size_bytes=2**19, speedup_vs_fp32=2.5)]
    results.write_metrics("02_ptq", "default", 0, env, {}, rows, readme=ptq.README)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_START}\nold\n{report.README_END}\nrest\n")
    text = report.update_readme(readme)[0].read_text()
    assert "old" not in text and text.startswith("intro") and text.endswith("rest\n")
    assert "| 02_ptq | ptq_int8_dynamic | – | acc 0.790 | 0.5 |" in text and "2.50×" in text
    assert "PyTorch dynamic-quantization BERT tutorial" in text  # the reference column, cited
    readme.write_text("no markers")
    with pytest.raises(QlabError, match="no <!-- results:start -->"):
        report.update_readme(readme)


def test_readme_and_docs_pages_are_filled_together(tmp_path, monkeypatch):
    """The headline table on the README, the full rows on docs/results.md, a page without markers left as it is."""
    monkeypatch.setenv("QLAB_ROOT", str(tmp_path))
    env = {"device": "cpu", "cpu": "c", "isa": [], "threads": 2, "torch": "t"}
    rows = [results.make_row("fp32", accuracy=0.8), results.make_row(
        "ort_int8_dynamic", accuracy=0.81, size_bytes=2**20, speedup_vs_fp32=2.0, accuracy_diff_vs_fp32=0.01,
        accuracy_diff_vs_fp32_lo=-0.02, accuracy_diff_vs_fp32_hi=0.03)]
    results.write_metrics("02_ptq", "default", 0, env, {}, rows, readme=ptq.README)
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(f"{report.HEADLINE_START}\n{report.HEADLINE_END}\n")
    (tmp_path / "docs" / "results.md").write_text(f"{report.README_START}\n{report.README_END}\n")
    (tmp_path / "docs" / "plain.md").write_text("nothing generated\n")
    pages = report.update_readme()
    assert [p.name for p in pages] == ["README.md", "plain.md", "results.md"]
    head = (tmp_path / "README.md").read_text()
    assert "| INT8 dynamic PTQ (ONNX Runtime) of a fine-tuned MiniLM | acc 0.810 (+1.0 pt [-2.0, +3.0] vs fp32) " \
           "| 1.0 |" in head and "[02_ptq](results/executed/02_ptq.ipynb)" in head
    assert "not in results/03_qat/metrics.json: run the notebook" in head  # a missing study is said, not skipped
    assert len(head.strip().splitlines()) - 4 <= 12  # markers, header, rule: at most 12 findings
    assert "| 02_ptq | ort_int8_dynamic |" in (tmp_path / "docs" / "results.md").read_text()
    assert (tmp_path / "docs" / "plain.md").read_text() == "nothing generated\n"


def _write(study, profile, rows, readme_lines=False, **extra):
    """A metrics.json as each study writes it, with its readme block (07: the lines it composes from its rows)."""
    env = {"device": "cuda", "gpu": "Test GPU", "cuda": "13.0", "torch": "2.x", "bitsandbytes": "0.50.2"}
    made = [results.make_row(m, **r) for m, r in rows]
    block = {"04_qlora_bert": qlora_bert.README, "01_baseline": baseline.README}.get(study)
    if study == "07_llama_scaling":
        block = results.readme_block(gpu_pairs=[("qlora", "lora")], lines=llama_scaling.measured_7b_lines(
            {"rows": made, **extra}) if readme_lines else [])
    results.write_metrics(study, profile, 0, env, {"model": {"source": "random-init"}}, made, readme=block, **extra)


def test_gpu_readme_table_says_not_run_without_gpu_results(tmp_path, monkeypatch):
    monkeypatch.setenv("QLAB_ROOT", str(tmp_path))
    assert report.gpu_readme_table().startswith("**Not run here**")


def test_gpu_readme_table_puts_gpu_ratios_beside_cpu_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("QLAB_ROOT", str(tmp_path))
    gib = 2**30
    _write("04_qlora_bert", "gpu", [("fp32", dict(peak_mem_bytes=8 * gib, step_time_s=0.2, model="bert-base")),
                                    ("qlora", dict(peak_mem_bytes=2 * gib, step_time_s=0.3, model="bert-base"))])
    _write("01_baseline", "default", [("fp32", dict(peak_mem_bytes=1000, train_time_s=10.0, train_steps=100))])
    _write("04_qlora_bert", "default", [("qlora", dict(peak_mem_bytes=500, train_time_s=30.0, train_steps=100,
                                                      model="minilm"))])
    seven = dict(rung="llama-7b", status="ok", total_params=6_738_415_616, tokens_per_s=600.0)
    _write("07_llama_scaling", "gpu", [
        ("lora", dict(rung="llama-270m", status="ok", total_params=2.7e8, peak_mem_bytes=gib, step_time_s=0.1)),
        ("qlora", dict(rung="llama-270m", status="ok", total_params=2.7e8, peak_mem_bytes=gib / 2, step_time_s=0.1)),
        ("lora", dict(seven, peak_mem_bytes=13 * gib, step_time_s=0.5, predicted_peak_mem_bytes=13 * gib,
                      prediction_error=0.0)),
        ("qlora", dict(seven, peak_mem_bytes=4.4 * gib, step_time_s=0.8, predicted_peak_mem_bytes=4 * gib,
                                prediction_error=4 / 4.4 - 1, fit_predicted_step_time_s=0.7)),
        ("qlora_t4_conditions", dict(rung="llama-7b", status="oom", note="out of memory at 15 GiB"))],
        benchmark={"evaluated": True, "qlora_peak_gib": 4.4, "qlora_peak_ok": True, "qlora_over_lora_mem": 4.4 / 13,
                   "mem_ok": False, "qlora_over_lora_time": 1.6, "time_ok": True}, readme_lines=True)
    t = report.gpu_readme_table()
    assert "Device: Test GPU (CUDA 13.0" in t
    assert "| 04_qlora_bert | qlora vs fp32 | 2.00 / 8.00 | 0.300 / 0.200 | mem 0.25×, time 1.50× (bert-base) | " \
           "mem 0.50×, time 3.00× (minilm) |" in t  # CPU: 01's FP32 fine-tune is the reference
    assert "| 07_llama_scaling | qlora vs lora | 4.40 / 13.00 | 0.800 / 0.500 | " \
           "mem 0.34×, time 1.60× (llama-7b) | – |" in t
    assert "7B `qlora`: peak 4.40 GiB measured, 4.00 GiB predicted by the accounting before it ran (-9.1 % off" in t
    assert "7B `qlora_t4_conditions`: oom — out of memory at 15 GiB" in t
    assert "s/step (the small rungs' fit said 0.700)" in t
    assert "memory 0.34 (<= 1/3: False)" in t


def _doc(**row):
    return {"study": "01_baseline", "profile": "default", "seed": 0, "env": {"device": "cpu"}, "assets": {},
            "rows": [results.make_row("fp32", model="m", **row)]}


@pytest.mark.parametrize("doc, needle", [
    (5, "a metrics document is a JSON object, got int"),
    ({**_doc(), "rows": {"method": "fp32"}}, "rows must be list, got dict"),
    ({**_doc(), "env": None}, "env must be dict, got NoneType"),
    ({**_doc(), "rows": []}, "rows is empty"),
    (_doc(accuracy="0.8"), "accuracy must be a finite number or null, got '0.8'"),
    (_doc(accuracy=1.5), "accuracy = 1.5 is outside [0, 1]"),
    (_doc(size_bytes=1.5), "size_bytes must be a whole number or null"),
    (_doc(perplexity=0.5), "perplexity = 0.5 is outside"),
    (_doc(total_params=True), "total_params must be a whole number"),
    ({**_doc(), "readme": {"refs": {}}}, "readme must be an object with keys"),
])
def test_schema_checks_types_and_ranges_not_only_key_names(doc, needle):
    with pytest.raises(QlabError, match=re.escape(needle)):
        results.validate_metrics(doc, "x")


def test_schema_refuses_non_finite_numbers_a_file_can_hold():
    doc = _doc()
    doc["rows"][0]["latency_ms"] = float("nan")  # json.loads reads NaN; make_row would have written null
    with pytest.raises(QlabError, match="latency_ms must be a finite number"):
        results.validate_metrics(json.loads(json.dumps(doc)), "x")
    doc["rows"][0].update(latency_ms=None, size_bytes=2.0**20)  # a whole number written as a float is whole
    assert results.validate_metrics(doc, "x") is doc


def test_a_malformed_sibling_is_named_and_left_out_of_the_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("QLAB_ROOT", str(tmp_path))
    env = {"device": "cpu", "cpu": "test-cpu", "isa": ["avx2"], "threads": 2, "torch": "t"}
    results.write_metrics("01_baseline", "default", 0, env, {"model": {"id": "m", "source": "s"}},
                          [results.make_row("fp32", model="m", accuracy=0.81)])
    for study, content in (("02_ptq", b"5"), ("03_qat", b"\xff\xfe not utf-8")):
        (tmp_path / "results" / study).mkdir(parents=True)
        (tmp_path / "results" / study / "metrics.json").write_bytes(content)
    skipped: list[str] = []
    text = report.write_summary("default", skipped).read_text()
    assert "## 01_baseline" in text and "0.810" in text
    assert (len(skipped) == 2 and "02_ptq" in skipped[0] and "03_qat" in skipped[1]
            and "UnicodeDecodeError" in skipped[1])
    assert "## Left out (malformed results)" in text
    with pytest.raises(QlabError, match="a metrics document is a JSON object"):
        report.collect("default")  # without a list to name them in, the first one is an error


def test_a_study_run_moves_results_and_artifacts_into_place_together_or_not_at_all(tmp_path, monkeypatch):
    from qlib.core.paths import outputs_dir, results_dir
    from qlib.studies import StudyResult, staged

    monkeypatch.setenv("QLAB_ROOT", str(tmp_path))
    env = {"device": "cpu"}

    class Cfg:
        profile = "smoke"

    @staged("99_x")
    def run(cfg, fail=False):
        model = outputs_dir("99_x", "smoke") / "model"
        model.mkdir(parents=True)
        (model / "weights").write_text("new")
        if fail:
            raise RuntimeError("killed after the model, before the metrics")
        p = results.write_metrics("99_x", "smoke", 0, env, {"model": {"id": str(model)}},
                                  [results.make_row("fp32", model="m")])
        return StudyResult([], results.load_metrics(p), p)

    first = run(Cfg())
    assert first.metrics_path == results_dir("99_x", "smoke") / "metrics.json" and first.metrics_path.is_file()
    assert ".staging" not in first.metrics_path.read_text() and ".staging" not in first.doc["assets"]["model"]["id"]
    (outputs_dir("99_x", "smoke") / "model" / "weights").write_text("previous")
    with pytest.raises(RuntimeError):
        run(Cfg(), fail=True)
    assert (outputs_dir("99_x", "smoke") / "model" / "weights").read_text() == "previous"  # the previous run, whole
    assert results.load_metrics(first.metrics_path)["rows"][0]["method"] == "fp32"
    leftovers = [p.name for d in (tmp_path / "results" / "smoke", tmp_path / "outputs" / "smoke") for p in d.iterdir()]
    assert leftovers == ["99_x", "99_x"]  # no staging folders left behind
    run(Cfg())
    assert (outputs_dir("99_x", "smoke") / "model" / "weights").read_text() == "new"
