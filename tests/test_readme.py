"""The README's promises that can drift: its line links into the code, and the test
command CI runs."""

import re

import helpers

README = (helpers.REPO / "README.md").read_text()


def test_line_links_point_at_what_they_name():
    links = re.findall(r"\[`([^`]+)`\]\(([\w./]+\.py)#L(\d+)\)", README)
    assert len(links) >= 15
    for text, path, line in links:
        lines = (helpers.REPO / path).read_text().splitlines()
        assert text in lines[int(line) - 1], f"README links {path}#L{line} for `{text}`, but that line is now: " + (
            lines[int(line) - 1].strip()
        )


def test_ci_runs_the_readme_test_command():
    assert "python -m pytest tests" in README
    ci = (helpers.REPO / ".ci" / "run").read_text()
    assert "-m pytest tests" in ci and re.search(r"pip install( -q)? -r requirements-dev.txt", ci)
    assert "-r requirements.txt" in (helpers.REPO / "requirements-dev.txt").read_text()
