"""Study 06's pieces: the uniform quantizer, QuantLinear, bitmaps and adapter switching, training styles,
sensitivity and greedy search, the cloze QA set and SQuAD's metric."""
import pytest
import torch

from qlib import choice, qa, search, switchable
from qlib.cli import main as cli_main
from qlib.core.errors import QlabError
from qlib.pretrain import pretrained_lm
from qlib.quant.uniform import QuantLinear, fake_quantize, patch_gpt2_with_quantization, row_scale
from qlib.switchable import style_bitmaps, train_switchable

pytestmark = pytest.mark.slow  # switchable training: `make test-fast` leaves this file out

CPU = torch.device("cpu")
# gpt2-stdlib-tiny: 2 blocks, hidden 256; LoRA rank r on c_attn (256->768), attn c_proj (256->256),
# c_fc (256->1024), mlp c_proj (1024->256)
LORA_PER_WIDTH = lambda r: 2 * r * ((256 + 768) + (256 + 256) + (256 + 1024) + (1024 + 256))  # noqa: E731


@pytest.fixture(scope="module")
def tiny():
    return pretrained_lm("gpt2-stdlib-tiny")


@pytest.fixture()
def model(tiny):
    torch.manual_seed(0)
    return switchable.build(tiny, (2, 4, 8, 32), 2, CPU)


def test_quantization_error_shrinks_with_bits():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    errs = [float((fake_quantize(w, b) - w).pow(2).mean()) for b in (2, 4, 8, 32)]
    assert errs[0] > errs[1] > errs[2] > errs[3] == 0.0


def test_per_row_scale_and_grid():
    w = torch.tensor([[1.0, -0.5, 0.25], [10.0, 5.0, -10.0]])
    assert torch.allclose(row_scale(w, 4), torch.tensor([[1 / 7], [10 / 7]]))
    q = fake_quantize(w, 4)
    assert torch.equal(q[:, 0].abs(), w[:, 0].abs())  # each row's absmax is exactly representable
    levels = q / row_scale(w, 4)
    assert torch.allclose(levels, levels.round(), atol=1e-5) and levels.abs().max() <= 7
    assert set(fake_quantize(w, 2)[1].div(10).tolist()) <= {-1.0, 0.0, 1.0}


def test_straight_through_gradient():
    w = torch.randn(8, 8, requires_grad=True)
    (fake_quantize(w, 2) * torch.arange(64.0).reshape(8, 8)).sum().backward()
    assert torch.equal(w.grad, torch.arange(64.0).reshape(8, 8))


def test_quantlinear_replaces_conv1d_exactly(tiny):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny).eval()
    patched = AutoModelForCausalLM.from_pretrained(tiny).eval()
    assert patch_gpt2_with_quantization(patched) == 4 * 2
    assert sum(isinstance(m, QuantLinear) for m in patched.modules()) == 8
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.allclose(ref(input_ids=ids).logits, patched(input_ids=ids).logits, atol=1e-5)
        for m in patched.modules():
            if isinstance(m, QuantLinear):
                m.set_bit_width(2)
        assert not torch.allclose(ref(input_ids=ids).logits, patched(input_ids=ids).logits, atol=1e-2)
    with pytest.raises(QlabError, match="unsupported bit width 3"):
        QuantLinear(4, 4).set_bit_width(3)


def test_set_config_switches_width_and_adapter(model):
    assert sum(p.numel() for p in model.lora_parameters()) == 4 * LORA_PER_WIDTH(2)
    assert model.active() == [(32, "w32"), (32, "w32")]
    model.set_config("8,4")
    assert model.active() == [(8, "w8"), (4, "w4")]
    model.set_config({"h.1": 2})
    assert model.active() == [(8, "w8"), (2, "w2")]
    model.set_config(4)
    assert model.active() == [(4, "w4"), (4, "w4")]


@pytest.mark.parametrize("bad, message", [
    ("8,4,2", "3 entries for a model with 2 blocks"), ({"h.7": 4}, "unknown layer 'h.7'"),
    ("8,x", "'x' at block 1 is not a bit width"), (3, "unsupported bit width 3"), (2.5, "expected an int"),
    ({"0": 16}, "no adapter was trained for width"), ([], "0 entries"), (True, "expected an int"),
    ("-1", "unsupported bit width -1 at all blocks"), ("abc", "'abc' at all blocks is not a bit width"),
    ("  ", "bad bitmap: empty")])
def test_bad_bitmaps_are_named(model, bad, message):
    before = model.active()
    with pytest.raises(QlabError, match=message):
        model.set_config(bad)
    assert model.active() == before


def test_styles_visit_the_right_bitmaps():
    assert style_bitmaps("spnet", (2, 4, 8, 32), 4) == [[32] * 4, [8] * 4, [4] * 4, [2] * 4, [8, 4, 8, 4]]
    assert [m[0] for m in style_bitmaps("cyclic", (2, 4, 8, 32), 2)] == [2, 4, 8, 32, 8, 4]
    assert style_bitmaps("single", (4,), 2) == [[4, 4]]
    with pytest.raises(ValueError, match="unknown training style"):
        style_bitmaps("random", (2,), 2)


@pytest.mark.parametrize("style", ["spnet", "cyclic", "instantnet"])
def test_training_moves_only_lora(model, style):
    base = {n: p.detach().clone() for n, p in model.model.named_parameters() if "lora_" not in n}
    ids = torch.randint(0, 512, (4, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :16] = -100
    loader = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}]
    res = train_switchable(model, loader, style, 2, 1e-2, CPU)
    assert res.steps == 2 and all(torch.isfinite(torch.tensor(res.losses)))
    assert all(torch.equal(p, base[n]) for n, p in model.model.named_parameters() if "lora_" not in n)
    trained = {n.split(".lora_B.")[1].split(".")[0] for n, p in model.model.named_parameters()
               if ".lora_B." in n and p.abs().sum() > 0}
    assert trained == ({"w2", "w4"} if style == "cyclic" else {"w2", "w4", "w8", "w32"})


def test_sensitivity_and_greedy_search(model):
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    sens = search.sensitivity(model, [{"input_ids": ids}])
    assert set(sens) == {"0", "1"} and all(set(v) == {"2", "4", "8"} for v in sens.values())
    assert all(v["2"]["mse"] > v["8"]["mse"] > 0 for v in sens.values())

    def fake_eval(bitmap):  # F1 drops 0.03 per 2-bit block, 0.01 per 4-bit block
        return {"em": 0.0, "f1": 0.9 - 0.03 * bitmap.count(2) - 0.01 * bitmap.count(4)}
    rows = search.greedy_search(model, sens, fake_eval, 0.035, [100, 100])
    best = search.best_bitmap(rows)
    first = search.layer_order(sens)[0]
    assert best["bitmap"] == ("2,8" if first == 0 else "8,2") and best["avg_bits"] == 5.0
    assert [r["accepted"] for r in rows] == [True, True, False, False, True]  # 2 ok; then 2, 4 fail, 8 ok


def test_cloze_construction_and_squad_metric():
    article = ("Title line\n\nShares in Acme Widgets rose sharply on Monday after strong sales.\n\n"
               "Analysts had expected less. The board of Acme Widgets said demand was strong.\n")
    ex = qa.cloze_from_article("x/1.txt", article)
    assert ex.answer == "Acme Widgets" and qa.BLANK in ex.question and ex.answer not in ex.question
    assert ex.answer in ex.context and "Monday" not in ex.context
    assert ex.choices == ("Acme Widgets", "Analysts")  # the context's entities, sorted: no position gives it away
    code = ('def find(pattern, text, flags=0):\n    """Search ___ for pattern."""\n'
            '    return re.search(pattern, text, flags)\n')
    doc = "Search text for the pattern. Nothing here names one. Return None unless flags match."
    first, second = qa.clozes_from_function("m.find", doc, code)  # one question per sentence naming a parameter
    assert (first.id, first.answer, first.question) == ("m.find#0", "text", "Search ___ for the pattern.")
    assert (second.id, second.answer, second.question) == ("m.find#2", "flags", "Return None unless ___ match.")
    assert first.choices == ("pattern", "text", "flags") and '"""' not in first.context
    assert first.filled("flags") == "Search flags for the pattern."
    assert qa.clozes_from_function("m.one", "Return x doubled.", "def one(x):\n    return 2 * x\n") == []  # 1 param
    ex = first
    assert qa.heuristic_baseline([ex]) == {"em": 1.0, "f1": 1.0}  # 'pattern' is named, so it answers 'text'
    assert qa.heuristic_preds([first, second]) == ["text", "pattern"]  # the first one each question leaves unnamed
    assert qa.chance_accuracy([first, second]) == pytest.approx(1 / 3)
    train = [qa.QAExample(str(i), "", "", a) for i, a in enumerate(["flags", "flags", "text"])]
    assert qa.majority_choices(train, [first, second]) == ["flags", "flags"]
    assert qa.exact_match("the Acme  widgets!", "Acme Widgets") == 1.0
    assert qa.f1_score("Acme", "Acme Widgets") == pytest.approx(2 / 3)
    assert qa.em_f1(["a", "Acme"], ["b", "Acme"]) == {"em": 0.5, "f1": 0.5}
    with pytest.raises(QlabError, match="as many predictions"):
        qa.em_f1(["a"], [])


def test_command_line_errors_are_one_line(tmp_path, capsys, model):
    def one_line(args, needle):  # progress bars of model loading may come before it; no traceback
        capsys.readouterr()
        assert cli_main(args) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("qlab: error:")]
        assert "Traceback" not in err and len(errors) == 1 and needle in errors[0], err
        assert err.strip().splitlines()[-1] == errors[0]

    ev = ["eval", "--profile", "smoke", "--adapters"]
    one_line(ev + [str(tmp_path), "--bitmap", "8"], "not a switchable adapter folder")
    saved = model.save(tmp_path / "adapters")
    from qlib import artifacts

    assert artifacts.verify(saved) == [f"{saved}: switchable adapters for widths 2, 4, 8, 32, each whole"]
    one_line(ev + [str(saved), "--bitmap", "{8: 4"], "is not valid JSON")
    (saved / "switchable.json").write_text("")
    one_line(ev + [str(saved), "--bitmap", "8"], "corrupt")
    (saved / "switchable.json").write_text('{"widths": [2, 4, 8, 32]}')
    import shutil

    shutil.rmtree(saved / "w4")
    one_line(ev + [str(saved), "--bitmap", "8"], "the adapter of width(s) w4/ is missing")
    with pytest.raises(QlabError, match=r"w4/ is missing"):
        artifacts.verify(saved)
    one_line(["train", "--profile", "smoke", "--steps", "0", "--adapters", str(tmp_path / "new")],
             "parameter steps must be at least 1, got 0")
    assert not (tmp_path / "new").exists()  # refused before anything was trained or saved
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    one_line(["train", "--profile", "smoke", "--steps", "1", "--adapters", str(mine)], "holds files qlab did not write")
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]  # a user's folder is never replaced


def _cloze(answer: str) -> qa.QAExample:
    code = "def find(pattern, text, flags=0):\n    return re.search(pattern, text, flags)"
    return qa.QAExample("m.find#0", code, "Search ___ for the pattern.", answer, ("pattern", "text", "flags"))


def test_multiple_choice_prompt_does_not_depend_on_the_answer_and_picks_the_likeliest(tiny, model):
    from transformers import AutoTokenizer

    from qlib.studies import switchable as study

    tok = AutoTokenizer.from_pretrained(tiny)
    items = {a: study.encode(_cloze(a), tok, 40, 8) for a in ("pattern", "text", "flags")}
    assert len({tuple(p) for p, _ in items.values()}) == 1  # one prompt, cut from the context's end, for every answer
    prompt, target = items["text"]
    assert len(prompt) + max(len(t) for t in choice.cloze_targets(_cloze("text"), tok)) <= 40
    assert tok.decode(target[:-1]).strip() == "Search text for the pattern." and target[-1] == tok.eos_token_id
    model.set_config(32)
    scores = {}
    for c, t in zip(_cloze("text").choices, choice.cloze_targets(_cloze("text"), tok)):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + t])).logits[0, :-1], -1)
        scores[c] = float(sum(logp[len(prompt) - 1 + i, tok_id] for i, tok_id in enumerate(t)))
    best = [max(scores, key=scores.get)]
    assert choice.choose(model, tok, [_cloze("text")], [prompt], CPU) == best  # the prompt's KV cache shared
    assert choice.choose(model, tok, [_cloze("text")], [prompt], CPU, share_prompt=False) == best  # whole sequences
    for way in (choice._cached_scores, choice._batched_scores):
        assert way(model, tok, [_cloze("text")], [prompt], CPU)[0] == pytest.approx(list(scores.values()), abs=1e-4)
    assert len(set(scores.values())) == 3  # no tie decides it


def test_paired_accuracy_against_a_baseline():
    from qlib.studies import switchable as study

    exs = [_cloze(a) for a in ("text",) * 30 + ("flags",) * 30]
    data = study.QAData([], [], exs, [([], [])] * 60, None, 0)
    assert data.multiple_choice and data.metric == "accuracy"
    always_text = ["text"] * 60
    d = choice.versus(exs, always_text, [e.answer for e in exs], seed=0)
    assert d["diff"] == pytest.approx(0.5) and d["real"] and 0.3 < d["lo"] < 0.5 < d["hi"] <= 0.7
    d = choice.versus(exs, always_text, ["flags"] * 30 + ["text"] * 30, seed=0)  # all wrong vs half right
    assert d["diff"] == pytest.approx(-0.5) and d["real"]
    assert not choice.versus(exs, always_text, ["text"] * 59 + ["flags"], seed=0)["real"]  # one answer: noise


def test_the_search_budgets_the_named_metric(model):
    sens = {"0": {"2": {"mse": 1.0}, "4": {"mse": 0.5}, "8": {"mse": 0.1}},
            "1": {"2": {"mse": 2.0}, "4": {"mse": 0.6}, "8": {"mse": 0.2}}}
    rows = search.greedy_search(model, sens, lambda bm: {"accuracy": 0.8 - 0.05 * bm.count(2)}, 0.02, [1, 1],
                                metric="accuracy")
    assert [r["width"] for r in rows if r["accepted"]] == [None, 4, 4] and rows[1]["drop"] == pytest.approx(0.05)
    with pytest.raises(QlabError, match="search metric 'accuracy' is not among the scores"):
        search.greedy_search(model, sens, lambda bm: {"f1": 0.5}, 0.02, [1, 1], metric="accuracy")


def test_the_search_has_its_own_dev_questions_held_out_of_training_and_of_the_report():
    from qlib.studies import switchable as study

    cfg = study.config("smoke", n_dev=7)
    _, _, data = study.load_setup(cfg)
    ids = lambda exs: {e.id for e in exs}  # noqa: E731
    assert len(data.dev_examples) == len(data.dev_items) == 7
    assert not ids(data.dev_examples) & ids(data.train_examples)
    assert not ids(data.dev_examples) & ids(data.eval_examples)
    assert len(data.train) == len(data.train_examples)
    dev = data.dev()
    assert dev.eval_examples == data.dev_examples and dev.train_examples == data.train_examples
    assert study.load_setup(cfg)[2].dev_examples == data.dev_examples  # drawn with the seed
