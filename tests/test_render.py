"""The executed notebooks as a reader sees them: laid out in Chromium, the findings must come within a few
screens. The browser test needs the system's Chromium (`make render-check` or .ci/run installs it)."""
import shutil

import nbformat
import pytest

from qlib import render


def test_a_report_is_refused_for_findings_far_down_or_missing():
    ok = render.Rendered("a.ipynb", 1000, 3 * render.SCREEN[1], render.SCREEN[1])
    assert ok.problems() == []
    far = render.Rendered("b.ipynb", 1000, 80 * render.SCREEN[1], 70 * render.SCREEN[1])
    assert far.problems() == ["b.ipynb: findings start 70.0 screens down (at most 4)",
                              f"b.ipynb: {80 * render.SCREEN[1]:,} px tall (at most 15,000)"]
    assert render.Rendered("c.ipynb", 1, 10, None).problems() == ["c.ipynb: no 'Findings' heading"]


def _report(path, progress_lines: int):
    """An executed notebook: a run cell's stream output of `progress_lines` lines, then the findings."""
    nb = nbformat.v4.new_notebook()
    run = nbformat.v4.new_code_cell("run()")
    run.outputs = [nbformat.v4.new_output("stream", name="stderr",
                                          text="".join(f"bar {i}: 100%\n" for i in range(progress_lines)))]
    nb.cells = [nbformat.v4.new_markdown_cell("# 99 · a study"), run,
                nbformat.v4.new_markdown_cell("## Findings\n\n- a finding")]
    nbformat.write(nb, path)
    return path


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no system Chromium: `make render-check` installs it")
def test_chromium_measures_where_the_findings_start(tmp_path):
    short, long = _report(tmp_path / "short.ipynb", 5), _report(tmp_path / "long.ipynb", 2000)
    got = {r.notebook: r for r in render.measure([short, long])}
    assert got["short.ipynb"].problems() == [] and got["short.ipynb"].findings_px < render.SCREEN[1]
    # 2,000 lines of progress bars push the findings some 35,000 px down: the check names it
    assert got["long.ipynb"].findings_px > 20 * render.SCREEN[1]
    assert got["long.ipynb"].height_px > got["long.ipynb"].findings_px
    assert got["long.ipynb"].problems()[0].startswith("long.ipynb: findings start")
