"""The front door: a short README whose links, and the docs pages' links, all point at files the repository holds."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "DESIGN.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_readme_is_short():
    assert (ROOT / "README.md").stat().st_size <= 12 * 1024


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_relative_link_points_at_a_file_the_repository_holds(page):
    targets = [t.split("#", 1)[0] for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", t)]
    missing = [t for t in targets if t and not (page.parent / t).exists()]
    assert missing == []


def test_no_page_or_module_cites_a_file_outside_the_repository():
    """The workplace's notes (ASSETS.md) are not in the repository: reference figures are cited from docs/assets.md."""
    texts = [*PAGES, *(ROOT / "qlib").rglob("*.py"), *(ROOT / "notebooks").glob("*.ipynb")]
    assert [p.name for p in texts if "ASSETS.md" in p.read_text()] == []
