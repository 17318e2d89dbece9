"""Every pointer a reader can follow resolves: relative links in the Markdown pages (README.md,
docs/, benchmarks/, tests/**/README.md), with their #anchors, and every docs/... or
benchmarks/... page cited in the code, presets and tests."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Markdown a reader of the repository follows links in
PAGES = sorted(
    {REPO / "README.md", *REPO.glob("docs/**/*.md"), *REPO.glob("benchmarks/**/*.md"), *REPO.glob("tests/**/README.md")}
)
#: where code cites pages
CODE_DIRS = ("sdca_dist", "launch", "conf", "tests")
CODE_SUFFIXES = {".py", ".yaml", ".yml", ".sh", ".md", ".txt", ".toml"}

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^\s*(```|~~~)")
#: a page path in code: any path ending in .md whose folders include docs/ or benchmarks/
_CITATION = re.compile(r"[\w./-]*\b(?:docs|benchmarks)/[\w./-]*?\.md\b")


def _prose_lines(text: str) -> list[str]:
    """The page's lines outside fenced and indented code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if fenced or line.startswith("    ") or line.startswith("\t"):
            continue
        out.append(line)
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose_lines(page.read_text()):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(page: Path, root: Path = REPO) -> list[str]:
    """'target: why' for every relative link of ``page`` that does not resolve inside ``root``."""
    bad = []
    for line in _prose_lines(page.read_text()):
        for target in _LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            if not dest.exists() or not dest.is_relative_to(root):
                bad.append(f"{target}: no such file in the repository")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(root)}")
    return bad


def cited_pages(text: str) -> list[str]:
    return _CITATION.findall(text)


def test_the_checks_find_what_is_broken(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Title here\n[ok](#title-here) [gone](missing.md) [web](https://example.org)\n"
        "[no anchor](#nothing)\n```\n[in code](nowhere.md)\n```\n"
    )
    assert [b.split(":")[0] for b in broken_links(page, tmp_path)] == ["missing.md", "#nothing"]
    assert cited_pages("see docs/sdca-method.md and shared/docs/gpu-check.md, benchmarks/x.md.") == [
        "docs/sdca-method.md",
        "shared/docs/gpu-check.md",
        "benchmarks/x.md",
    ]


def test_every_relative_link_in_the_pages_resolves():
    assert REPO / "README.md" in PAGES and len(PAGES) > 5
    bad = {str(p.relative_to(REPO)): broken_links(p) for p in PAGES}
    assert not {k: v for k, v in bad.items() if v}


def test_every_page_cited_in_code_exists():
    bad = []
    for folder in CODE_DIRS:
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix not in CODE_SUFFIXES or not path.is_file() or "__pycache__" in path.parts:
                continue
            if path == Path(__file__).resolve():
                continue
            for cited in cited_pages(path.read_text(errors="replace")):
                if not (REPO / cited).is_file():
                    bad.append(f"{path.relative_to(REPO)}: {cited}")
    assert not bad, "cited pages that are not in the repository:\n" + "\n".join(bad)
