"""The default run's intervals beside the `full` run's: pairing, width ratios, the README blocks."""
import pytest

from qlib import report, results, set_size

ENV = {"device": "cpu", "cpu": "c", "isa": [], "threads": 2, "torch": "t"}
SHARED = "stdlib-code+bbc-news"


def _doc(width: float, windows: int, kept_width: float) -> dict:
    rows = [results.make_row("fp16", dataset=SHARED),
            results.make_row("gptq_w4", dataset=SHARED, reference="fp16", perplexity_ratio=1.2,
                             perplexity_ratio_lo=1.2 - width / 2, perplexity_ratio_hi=1.2 + width / 2),
            results.make_row("ptq_int8", dataset="other", perplexity_ratio=1.0, perplexity_ratio_lo=0.9,
                             perplexity_ratio_hi=1.1)]  # not the shared set: not a comparison on the real LM
    kept = {"merged_fp16": {"ppl_vs_fp16_base": 0.9, "ppl_vs_fp16_base_lo": 0.9, "ppl_vs_fp16_base_hi": 0.9},
            "gguf_q4_0": {"ppl_vs_fp16_base": 1.05, "ppl_vs_fp16_base_lo": 1.05 - kept_width / 2,
                          "ppl_vs_fp16_base_hi": 1.05 + kept_width / 2}}
    return {"rows": rows, "adapter_kept": kept,
            "eval_set": {"windows": windows, "scored_tokens": windows * 255}}


def test_comparisons_take_the_shared_sets_intervals_only():
    got = dict(set_size.comparisons(_doc(0.1, 16, 0.08)))
    assert set(got) == {"gptq_w4: ppl vs fp16", "merged gguf_q4_0: ppl vs FP16 base"}
    assert got["gptq_w4: ppl vs fp16"] == pytest.approx((1.2, 1.15, 1.25))


def test_width_ratio_pairs_the_same_comparison():
    ps = set_size.pairs(_doc(0.1, 16, 0.08), _doc(0.04, 128, 0.06))
    assert [w for w, _, _ in ps] == ["gptq_w4: ppl vs fp16", "merged gguf_q4_0: ppl vs FP16 base"]
    assert [set_size.width_ratio(a, b, w) for w, a, b in ps] == pytest.approx([0.3998, 0.7498], abs=1e-4)  # log widths
    assert set_size.width_ratio((1.2, 1.15, 1.25), (1.2, 1.18, 1.22)) == pytest.approx(0.4)  # not a ratio: linear
    huge, twice = (6.7e5, 3.7e5, 1.23e6), (1.7e6, 1.28e6, 2.35e6)  # a ratio that doubled: wider only linearly
    assert set_size.width_ratio(huge, twice) > 1 > 0.6 > set_size.width_ratio(huge, twice, "ternary: ppl vs fp16")
    assert set_size.width_ratio((1.0, 1.0, 1.0), (1.0, 0.9, 1.1)) is None  # a row against itself has no width


def test_readme_blocks_are_filled_from_both_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("QLAB_ROOT", str(tmp_path))
    page = tmp_path / "README.md"
    page.write_text(f"{report.README_START}\n{report.README_END}\n{set_size.SUMMARY_START}\nold\n"
                    "<!-- full-set-summary:end -->\n")
    assert "No `full` run" in report.update_readme(page)[0].read_text()
    for profile, (w, n, k) in {"default": (0.1, 16, 0.08), "full": (0.04, 128, 0.06)}.items():
        d = _doc(w, n, k)
        results.write_metrics("08_qwen_merge_gguf", profile, 0, ENV, {}, d["rows"], adapter_kept=d["adapter_kept"],
                              eval_set=d["eval_set"])
    text = report.update_readme(page)[0].read_text()
    assert "| 08_qwen_merge_gguf | 2 | 0.57 [0.40, 0.75] | 1 |" in text
    assert "| merged gguf_q4_0: ppl vs FP16 base | 1.050 [1.010, 1.090] | 1.050 [1.020, 1.080] |" in text
    assert "16 windows, 4,080 tokens against 128 windows, 32,640 tokens" in set_size.table()


def test_a_formats_list_pairs_with_its_whole_set_twin(tmp_path, monkeypatch):
    """`formats <model> --eval-tokens 32768 --name full` beside the default list: paired like a study."""
    monkeypatch.setenv("QLAB_ROOT", str(tmp_path))
    for name, (w, n) in {"m": (0.1, 16), "m-full": (0.05, 128), "other-full": (0.05, 128)}.items():
        d = _doc(w, n, 0.0)
        results.write_metrics("formats", "default", 0, ENV, {}, d["rows"], out_dir=tmp_path / "results" / "formats"
                              / name, eval_set=d["eval_set"])
    text = set_size.table()
    assert "**formats m** (16 windows, 4,080 tokens against 128 windows, 32,640 tokens): 1 intervals" in text
    assert "other" not in text  # a twin without its default list is not a pair
    assert "| formats m | 1 | 0.50 [0.50, 0.50] | 1 |" in set_size.summary()
