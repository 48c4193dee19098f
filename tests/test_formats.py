"""`python -m qlib formats` and `qlib.formats` on the smoke-size Qwen2: every format written, reloaded in its runtime
and measured; the numbers agree with what each file is; bad input is one line and the other formats still report."""
import json
import shutil

import numpy as np
import pytest
import torch

from qlib import cli, formats, formats_report, hub, results
from qlib.core.errors import QlabError
from qlib.pretrain import pretrained_lm

pytestmark = pytest.mark.slow  # llama.cpp and every format of a tiny model: `make test-fast` leaves this file out

SMALL = dict(context=64, eval_tokens=512, gen_tokens=4, repeats=1, llama_build="wheel")  # the tests build no variant


@pytest.fixture(scope="module")
def tiny_qwen():
    return pretrained_lm("qwen2-stdlib-tiny")


@pytest.fixture(autouse=True)
def root(tmp_path, monkeypatch):
    """results/ and outputs/ of these runs go to a temporary checkout."""
    monkeypatch.setenv("QLAB_ROOT", str(tmp_path))
    return tmp_path


def _run(model, **kw):
    return formats_report.run(formats_report.Config(model=str(model), **{**SMALL, **kw}))


def test_parse_formats_adds_the_references_and_refuses_unknown_names():
    assert formats.parse_formats(["gguf_q4_0", "bnb_nf4"]) == ("fp16", "bnb_nf4", "gguf_f16", "gguf_q4_0")
    assert formats.parse_formats(["fp16"]) == ("fp16",)
    assert formats.DEFAULT_FORMATS == formats.parse_formats(formats.DEFAULT_FORMATS)
    # only a list with a llama.cpp format resolves (and may build) a llama.cpp build
    assert formats.needs_llama_cpp(["gguf_q4_0_imat"]) and not formats.needs_llama_cpp(["fp16", "awq_w4"])
    with pytest.raises(QlabError, match="unknown format.*gguf_q5; valid: fp16, bnb_int8"):
        formats.parse_formats(["gguf_q5"])


def test_every_format_is_written_reloaded_and_measured(tiny_qwen, root):
    rep = _run(tiny_qwen, formats=("bnb_int8", "bnb_nf4", "gguf_q8_0", "gguf_q4_0", "gguf_q2_0"), repeats=3)
    by = {r["method"]: r for r in rep.rows}
    assert list(by) == ["fp16", "bnb_int8", "bnb_nf4", "gguf_f16", "gguf_q8_0", "gguf_q4_0", "gguf_q2_0",
                        "unigram", "bigram_kn"]
    assert rep.problems == []
    # sizes follow the storage: 16-bit > 8-bit > 4-bit > 2-bit, in each runtime
    assert by["fp16"]["size_bytes"] > by["bnb_int8"]["size_bytes"] > by["bnb_nf4"]["size_bytes"]
    assert by["gguf_f16"]["size_bytes"] > by["gguf_q8_0"]["size_bytes"] > by["gguf_q4_0"]["size_bytes"] \
        > by["gguf_q2_0"]["size_bytes"]
    # bits per quantized weight as the GGML block layouts store them (32 weights + one f16 scale per block)
    q = {k: by[k]["tensor_types"] for k in ("gguf_q8_0", "gguf_q4_0", "gguf_q2_0")}
    assert q["gguf_q4_0"].get("Q4_0") and q["gguf_q2_0"].get("Q2_0") and q["gguf_q8_0"].get("Q8_0")
    assert by["fp16"]["tensor_types"] == {"F16": 26}
    assert by["bnb_nf4"]["bits_per_quantized_weight"] < 5 < by["bnb_int8"]["bits_per_quantized_weight"]
    n = by["fp16"]["total_params"]
    assert by["gguf_f16"]["bits_per_param"] == pytest.approx(8 * by["gguf_f16"]["size_bytes"] / n)
    # the runtimes agree at 16 bits; every interval holds its estimate; quantized rows compare within their runtime
    assert abs(by["gguf_f16"]["perplexity_ratio"] - 1) < 1e-3 and by["gguf_f16"]["reference"] == "fp16"
    assert by["gguf_q2_0"]["reference"] == "gguf_f16" and by["bnb_nf4"]["reference"] == "fp16"
    for r in rep.rows:
        if r["perplexity_ratio"] is not None:
            assert r["perplexity_ratio_lo"] <= r["perplexity_ratio"] <= r["perplexity_ratio_hi"]
    assert by["gguf_q2_0"]["perplexity_ratio"] > by["gguf_q8_0"]["perplexity_ratio"]
    assert by["gguf_f16"]["decode_vs_fp16_same_runtime"] == 1.0 and by["gguf_q4_0"]["decode_vs_fp16_same_runtime"] > 0
    q4 = by["gguf_q4_0"]  # the ratio of medians over the repeats kept in the row, with its interval over rounds
    assert q4["decode_vs_fp16_same_runtime"] == pytest.approx(
        np.median(by["gguf_f16"]["decode_repeat_s"]) / np.median(q4["decode_repeat_s"]))
    key = "decode_vs_fp16_same_runtime"
    assert q4[f"{key}_lo"] <= q4[key] <= q4[f"{key}_hi"]
    assert all(by[k]["inference_peak_mem_bytes"] is not None for k in list(by)[:7])
    # what a user reads: schema-valid metrics, the table, the figure, the per-token record, artifacts with metadata
    res = rep.path.parent
    assert res.parent == root / "results" / "formats" and res.name == formats_report.slug(
        formats_report.resolve(str(tiny_qwen)))
    assert res.name.startswith(f"{tiny_qwen.name}-") and len(res.name) == len(tiny_qwen.name) + 9  # name + path hash
    doc = results.load_metrics(res / "metrics.json")
    assert doc["study"] == "formats" and doc["problems"] == [] and len(doc["rows"]) == 9
    # scored on the shared set's first 512 / 64 windows, 3 code : 1 prose, each domain's perplexity on every row
    assert doc["eval_set"]["windows"] == 8 and doc["eval_set"]["prose"]["windows"] == 2
    assert set(by["gguf_q4_0"]["perplexity_by_domain"]) == {"code", "prose"}
    assert (res / "quality_vs_size.png").stat().st_size > 1000 and (res / "per_token_nll.csv.gz").is_file()
    assert (res / "table.md").read_text().count("\n") == 2 + 9
    out = root / "outputs" / "default" / "formats" / res.name
    assert len(list(out.glob("*.gguf"))) == 4 and len(list(out.glob("*.qlab.json"))) == 4
    from qlib import report  # the README section `report --readme` fills from the kept runs

    text = report.formats_readme()
    assert (f"python -m qlib formats {tiny_qwen} --eval-tokens 512 --context 64 --llama-build wheel "  # not defaults
            "--formats bnb_int8,bnb_nf4,gguf_f16,gguf_q8_0,gguf_q4_0,gguf_q2_0`") in text \
        and "| gguf_q2_0 | llama.cpp |" in text  # a list other than the default is named


def test_two_folders_of_one_name_never_share_a_result_and_a_kept_one_is_not_replaced_by_another_model(
        tiny_qwen, root, tmp_path):
    a, b = tmp_path / "x" / "merged", tmp_path / "y" / "merged"
    for d in (a, b):
        shutil.copytree(tiny_qwen, d)
    ka, kb = (formats_report.slug(formats_report.resolve(str(d))) for d in (a, b))
    assert ka != kb and ka.startswith("merged-") and kb.startswith("merged-")
    kept = root / "results" / "formats" / ka
    kept.mkdir(parents=True)
    other = {"assets": {"model": {"id": "someone/else", "path": "/elsewhere"}}}
    (kept / "metrics.json").write_text(json.dumps(other))
    with pytest.raises(QlabError, match=f"{ka} holds another model's result.*--name"):
        _run(a, formats=("gguf_q4_0",))
    assert json.loads((kept / "metrics.json").read_text()) == other and list(kept.iterdir()) == [kept / "metrics.json"]
    assert not (root / "outputs").exists()  # refused before anything was made


def test_same_seed_same_numbers(tiny_qwen):
    a, b = (_run(tiny_qwen, formats=("gguf_q4_0",)) for _ in range(2))
    keys = ("perplexity", "perplexity_ratio", "perplexity_ratio_lo", "perplexity_ratio_hi", "size_bytes")
    assert [[r[k] for k in keys] for r in a.rows] == [[r[k] for k in keys] for r in b.rows]


def test_no_tokenizer_still_reports_what_can_be_made(tiny_qwen, tmp_path):
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_qwen, folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).unlink()
    rep = _run(folder, formats=("bnb_nf4", "gguf_q4_0"))
    assert [r["method"] for r in rep.rows] == ["fp16", "bnb_nf4"]
    assert rep.rows[1]["size_bytes"] < rep.rows[0]["size_bytes"] and rep.rows[0]["perplexity"] is None
    assert rep.rows[1]["tokens_per_s"] > 0  # decode timed from a fixed prompt
    lines = "\n".join(rep.problems)
    assert "tokenizer.json" in lines and "gguf_f16: not made" in lines and "gguf_q4_0: not made" in lines
    assert all("\n" not in p for p in rep.problems)


def test_an_adapter_is_merged_first_and_a_foreign_one_short_text_and_unsupported_architecture_are_one_line_each(
        tiny_qwen, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    from qlib import adapters, merge, models

    torch.manual_seed(0)
    model = adapters.add_causal_lora(models.load_causal_lm(tiny_qwen, None, torch.device("cpu")), 4, kbit=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a fresh adapter (B = 0) would change nothing
            torch.nn.init.normal_(p, std=0.05)
    tok = AutoTokenizer.from_pretrained(tiny_qwen)
    adapter = merge.save_adapter(model, tok, tmp_path / "adapter", "fp32")
    merged, plain = _run(tiny_qwen, adapter=str(adapter), formats=("fp16",)), _run(tiny_qwen, formats=("fp16",))
    assert merged.problems == [] and merged.doc["merge"]["max_abs_logit_diff_fp32"] < 1e-4
    assert (merged.rows[0]["artifact"] == "adapter_merged"
            and merged.rows[0]["perplexity"] != plain.rows[0]["perplexity"])
    adapter = shutil.copytree(adapter, tmp_path / "foreign")
    state = load_file(adapter / "adapter_model.safetensors")  # LoRA A made for a hidden size of 96, not 64
    save_file({k: torch.zeros(v.shape[0], 96) if ".lora_A." in k else v for k, v in state.items()},
              adapter / "adapter_model.safetensors")
    short = tmp_path / "short.txt"
    short.write_text("def f():\n    return 1\n")
    rep = _run(tiny_qwen, adapter=str(adapter), text=str(short), formats=("gguf_q4_0",))
    assert [p.split(":")[0] for p in rep.problems] == ["text", "adapter"]
    assert "adapter/base mismatch" in rep.problems[1] and "64-token window" in rep.problems[0]
    assert [r["method"] for r in rep.rows] == ["fp16", "gguf_f16", "gguf_q4_0"]
    assert all(r["perplexity"] is None and r["size_bytes"] for r in rep.rows)

    opt = tmp_path / "tiny-opt"  # an architecture llama.cpp's converter does not know
    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                             num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64)
                   ).save_pretrained(opt)
    tok.save_pretrained(opt)
    rep = _run(opt, formats=("bnb_nf4", "gguf_q4_0"))
    assert [r["method"] for r in rep.rows][:2] == ["fp16", "bnb_nf4"] and rep.rows[0]["perplexity"] > 1
    assert rep.problems[0].startswith("gguf_f16: not made: GGUF conversion") and "not supported" in rep.problems[0]
    assert rep.problems[1] == "gguf_q4_0: not made: needs the F16 GGUF file, which was not made"


def test_a_format_made_but_not_loadable_is_one_line_and_the_others_still_report(tiny_qwen, monkeypatch):
    from qlib.backends import gguf

    real = gguf.window_logits

    def broken(path, *a, **k):
        if "GGUF-Q4-0" in str(path):
            raise QlabError(f"llama.cpp cannot load {path}: corrupt")
        return real(path, *a, **k)

    monkeypatch.setattr(gguf, "window_logits", broken)
    rep = _run(tiny_qwen, formats=("gguf_q4_0", "gguf_q8_0"))
    assert [r["method"] for r in rep.rows][:3] == ["fp16", "gguf_f16", "gguf_q8_0"]
    assert len(rep.problems) == 1 and rep.problems[0].startswith("gguf_q4_0: made but not measured: llama.cpp cannot")


def test_a_hub_id_resolves_through_the_hugging_face_cache(standin_hub, monkeypatch):
    """The t4 path: a hub id (here the hub-faithful stand-in of Qwen2.5-1.5B-Instruct in an HF cache layout)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(standin_hub))
    rep = _run("Qwen/Qwen2.5-1.5B-Instruct", formats=("bnb_nf4",), eval_tokens=256, baseline_tokens=2000)
    model = rep.doc["assets"]["model"]  # (its GGUF conversion runs in study 08's t4 stand-in test)
    assert (model["source"], model["id"]) == ("hub", "Qwen/Qwen2.5-1.5B-Instruct") and model["revision"]
    assert [r["method"] for r in rep.rows][:2] == ["fp16", "bnb_nf4"] and rep.problems == []
    assert rep.path.parent.name == "Qwen--Qwen2.5-1.5B-Instruct"


def test_cli_prints_the_table_and_refuses_bad_input_in_one_line(tiny_qwen, capsys, monkeypatch, tmp_path):
    import textwrap  # a text file a user brings: its first 256 tokens scored, the rest fits the n-gram baselines

    assert cli.main(["formats", str(tiny_qwen), "--formats", "fp16", "--context", "64", "--eval-tokens", "256",
                     "--gen-tokens", "2", "--repeats", "1", "--text", textwrap.__file__]) == 0
    out = capsys.readouterr().out
    assert "| fp16 | transformers |" in out and "| bigram_kn | counts |" in out and "metrics.json" in out
    assert cli.main(["formats", str(tiny_qwen), "--formats", "gguf_q5"]) == 2
    assert "unknown format(s) gguf_q5" in capsys.readouterr().err
    noise = tmp_path / "random.txt"
    noise.write_bytes(bytes(range(128, 256)) * 100)  # not UTF-8: no perplexity of replacement characters
    assert cli.main(["formats", str(tiny_qwen), "--text", str(noise)]) == 2
    assert "is not UTF-8 text (byte 0x80 at offset 0)" in capsys.readouterr().err
    monkeypatch.setattr(hub, "offline", lambda: True)
    assert cli.main(["formats", "no-org/no-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-org/no-model" in err and "smollm2-135m" in err


def test_study_08_measures_through_the_same_function():
    """The notebook and the command share the code: 08 names `formats.measure` and keeps no writer of its own."""
    import inspect

    from qlib.studies import qwen_merge

    src = inspect.getsource(qwen_merge)
    assert "formats.measure(" in src and "formats.rows(" in src and "formats.decode(" in src
    assert "gguf.convert(" not in src and "save_bnb(" not in src and "export_gguf(" not in src
    assert json.dumps(qwen_merge.DEFINITIONS["perplexity_ratio"]) == json.dumps(formats.DEFINITIONS["perplexity_ratio"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_on_cuda_the_pytorch_formats_run_on_the_gpu(tiny_qwen):
    rep = _run(tiny_qwen, formats=("bnb_int8", "bnb_nf4", "gguf_q4_0"), device="cuda")
    by = {r["method"]: r for r in rep.rows}
    assert {by[k]["inference_peak_mem_source"] for k in ("fp16", "bnb_int8", "bnb_nf4")} == {"cuda_max_allocated"}
    assert by["gguf_q4_0"]["inference_peak_mem_source"] == "cpu_rss_delta"  # llama.cpp: the CPU build
    assert rep.doc["env"]["device"].startswith("cuda") and abs(by["bnb_nf4"]["perplexity_ratio"] - 1) < 0.2


def test_study_08_base_rows_are_the_commands_rows_on_the_same_model(tiny_qwen, root):
    """08's base model in a format and `python -m qlib formats` of the same model are one measurement: the same
    FP16 start, windows and scorer give the same numbers to the last digit (they drifted apart when 08 started from
    the FP32 folder)."""
    from transformers import AutoTokenizer

    from qlib import assets, evalset, runmeta
    from qlib.studies import qwen_merge

    rep = _run(tiny_qwen, formats=("bnb_nf4", "gguf_q4_0"))
    cfg = qwen_merge.config("smoke", model_id=str(tiny_qwen), context=64, eval_tokens=512, gguf_types=("q4_0",))
    tok = AutoTokenizer.from_pretrained(tiny_qwen)
    s = evalset.scored(tok, 64, 512)
    su = qwen_merge.Setup(assets.resolve_model("qwen-arch", str(tiny_qwen)), tok, None, [], s, torch.zeros(1))
    info = runmeta.RunInfo("08_qwen_merge_gguf", "smoke", 0, "tiny", str(tiny_qwen), "stdlib-code")
    got = qwen_merge.measure_both(cfg, su, tiny_qwen, formats.Text.of(s, tok.eos_token_id, 0), root / "out",
                                  torch.device("cpu"), info)
    by = {m.method: m for m in got}
    cmd = {r["method"]: r for r in rep.rows}
    for fmt, row in (("fp16", "base"), ("bnb_nf4", "base_bnb_nf4"), ("gguf_q4_0", "base_gguf_q4_0")):
        assert float(np.exp(by[row].nll.mean())) == cmd[fmt]["perplexity"], fmt
    assert by["base_bnb_nf4"].scores.kl.mean() == cmd["bnb_nf4"]["kl_mean"]


def test_ratio_by_domain_resamples_each_domains_own_groups():
    """A method fitted to one domain gains there and loses on the other; a pooled ratio can hide both."""
    rng = np.random.default_rng(0)
    groups = np.repeat([f"code:m{i}" for i in range(6)] + [f"prose:a{i}" for i in range(6)], 20)
    ref = rng.normal(2.0, 0.3, groups.size)
    code = np.char.startswith(groups.astype(str), "code")
    nll = ref + np.where(code, -0.1, 0.2) + rng.normal(0, 0.02, groups.size)
    got = formats.ratio_by_domain(ref, nll, groups, context=21, seed=0)
    assert set(got) == {"code", "prose"} and got["code"]["tokens"] == got["prose"]["tokens"] == 120
    assert got["code"]["hi"] < 1 < got["prose"]["lo"] and got["code"]["real"] and got["prose"]["real"]
    assert got["code"]["ratio"] == pytest.approx(np.exp(np.mean(nll[code] - ref[code])))
    assert formats.ratio_by_domain(ref, nll, None, context=21, seed=0) is None


def test_formats_calibrates_on_the_shared_sets_mix():
    """The shared set's training tokens are code then prose: calibration takes both in the set's 3 : 1 mix (it took
    the first tokens, all code, while its label named both domains)."""
    from qlib import formats_report

    rest = torch.arange(400)  # 300 code tokens, then 100 prose
    ids, source = formats_report.shared_mix(rest, want=80, length=10)
    assert ids.tolist() == list(range(60)) + list(range(300, 320))
    assert source == "stdlib-code's training texts: 6 code + 2 prose windows (the evaluation set's mix)"
