"""The README is the quick start and the reference; the design, operations and proofs live in docs/.
Every relative link among them must lead somewhere: a file that exists, and a heading that exists in it."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings (lowercase, punctuation dropped, spaces to hyphens)."""
    anchors, fenced = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        match = re.match(r"^#{1,6} (.*)$", line)
        if match and not fenced:
            anchors.add(re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    broken = []
    for match in re.finditer(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", page.read_text()):
        target, anchor = match.group(1), match.group(2)
        if re.match(r"^[a-z]+:", target):
            continue
        path = (page.parent / target) if target else page
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in heading_anchors(path):
            broken.append(f"{target}#{anchor}: no such heading")
    assert broken == []


def test_the_readme_stays_a_quick_start_and_links_the_docs():
    readme = (ROOT / "README.md").read_text()
    for page in ("docs/design.md", "docs/operations.md", "docs/proofs.md"):
        assert (ROOT / page).exists() and f"({page}" in readme, page
    assert len(readme.splitlines()) < 500  # the long material stays in docs/
