"""Every relative link in the README and docs/ points at a file that exists, and a link with a
``#fragment`` into a Markdown file at one of its headings (GitHub's heading slugs).

Results pages are rewritten as tables move into history; a renamed heading silently breaks the
links into it, which a reader only finds by clicking.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.+?)\s*$", re.MULTILINE)


def heading_slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def unique_slugs(titles: list[str]) -> list[str]:
    """GitHub's anchors for a page's headings in order: a repeated slug gets ``-1``, ``-2``, ..."""
    seen: dict[str, int] = {}
    out = []
    for title in titles:
        slug = heading_slug(title)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.append(f"{slug}-{n}" if n else slug)
    return out


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)  # no code blocks
    return set(unique_slugs(HEADING.findall(text)))


def test_heading_slug_follows_github() -> None:
    assert heading_slug("Past 400 steps (2026-12-06): OCR gains, quality does not") == (
        "past-400-steps-2026-12-06-ocr-gains-quality-does-not"
    )
    assert heading_slug("`kl_only` with the fixed sampled KL advantage") == "kl_only-with-the-fixed-sampled-kl-advantage"
    assert unique_slugs(["What is left", "Runs", "What is left", "What is left"]) == [
        "what-is-left", "runs", "what-is-left-1", "what-is-left-2"
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for link in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", link):  # http:, https:, mailto:, file:
            continue
        path, _, fragment = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link} (no such file)")
        elif fragment and target.suffix == ".md" and fragment not in anchors(target):
            broken.append(f"{link} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)
