"""The README's and the docs pages' promises that can drift: their line links into the code, their
links to each other and to the repository's files, and the test command CI runs."""

import re

import helpers

README = (helpers.REPO / "README.md").read_text()
DOCS = sorted((helpers.REPO / "docs").glob("*.md"))
PAGES = [helpers.REPO / "README.md", *DOCS]
LINE_LINK = re.compile(r"\[`([^`]+)`\]\(([\w./]+\.py)#L(\d+)\)")
# [text](target): a link's target, without the title some links carry; images too (![alt](...)).
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_the_docs_pages_exist_and_the_readme_links_each():
    names = {page.name for page in DOCS}
    assert {"flags.md", "checkpoints.md", "scaling-out.md", "speed.md", "troubleshooting.md"} <= names
    for page in DOCS:
        assert f"](docs/{page.name})" in README, f"the README does not link docs/{page.name}"
        assert "](../README.md" in page.read_text(), f"docs/{page.name} does not link back to the README"


def test_line_links_point_at_what_they_name():
    """Each [`text`](file.py#L123) in the README and the docs pages: line 123 of that file, taken
    relative to the page (docs pages link ../common.py#L..), holds `text`."""
    assert len(LINE_LINK.findall(README)) >= 15
    for page in PAGES:
        for text, path, line in LINE_LINK.findall(page.read_text()):
            lines = (page.parent / path).read_text().splitlines()
            here = lines[int(line) - 1] if int(line) <= len(lines) else "(past the end of the file)"
            where = page.relative_to(helpers.REPO)
            assert text in here, f"{where} links {path}#L{line} for `{text}`, but that line is now: {here.strip()}"


def anchors(page):
    """The anchors GitHub makes for a page's headings: lower case, punctuation other than - and _
    dropped, spaces as -, and -1, -2, ... after a repeated one."""
    seen, found = {}, set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not re.match(r"#{1,6} ", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def test_relative_links_point_at_files_and_headings_that_exist():
    """Every relative link in the README and the docs pages ([text](docs/flags.md),
    [text](../README.md), [text](flags.md#anchor), [text](../configs/fsdp.yaml)) names a file that
    exists, relative to the page; an anchor into a Markdown page names one of its headings."""
    checked = 0
    for page in PAGES:
        where = page.relative_to(helpers.REPO)
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:: not this repository's
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{where} links {target}, but {path} does not exist"
            if anchor and linked.suffix == ".md":
                assert anchor in anchors(linked), f"{where} links {target}, but {path or where} has no such heading"
            checked += 1
    assert checked >= len(DOCS) * 2


def test_ci_runs_the_readme_test_command():
    assert "python -m pytest tests" in README
    ci = (helpers.REPO / ".ci" / "run").read_text()
    assert "-m pytest tests" in ci and re.search(r"pip install( -q)? -r requirements-dev.txt", ci)
    assert "-r requirements.txt" in (helpers.REPO / "requirements-dev.txt").read_text()
