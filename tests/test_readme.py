"""The README's and the docs pages' promises that can drift: their line links into the code, their
links to each other and to the repository's files, the flags their commands pass, `--help` itself,
and the test command CI runs."""

import argparse
import importlib
import json
import re
from unittest import mock

import helpers
import pytest

README = (helpers.REPO / "README.md").read_text()
DOCS = sorted((helpers.REPO / "docs").glob("*.md"))
PAGES = [helpers.REPO / "README.md", *DOCS]
LINE_LINK = re.compile(r"\[`([^`]+)`\]\(([\w./]+\.py)#L(\d+)\)")
# [text](target): a link's target, without the title some links carry; images too (![alt](...)).
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SCRIPTS = ["train_classifier", "finetune_gpt2", "pretrain_mlm"]
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
# Flags of the tools the pages launch the scripts with, not of this repository's code.
OTHER_TOOLS = {
    "accelerate launch": {"--config_file", "--num_processes", "--num_machines", "--machine_rank", "--cpu"},
    "accelerate launch, several machines": {"--main_process_ip", "--main_process_port"},
    "torchrun": {"--nproc_per_node"},
    "sbatch": {"--nodes", "--ntasks-per-node", "--gpus-per-node", "--requeue", "--signal"},
    "tensorboard": {"--logdir"},
    "GLUE's download_glue_data.py": {"--data_dir", "--tasks"},
}


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


class _ParserBuilt(Exception):
    pass


def parser_of(script):
    """The parser a script's parse_args builds, caught at its parse_args call."""
    module = importlib.import_module(script)

    def catch(parser, *args, **kwargs):
        raise _ParserBuilt(parser)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", catch), pytest.raises(_ParserBuilt) as built:
        module.parse_args([])
    return built.value.args[0]


def flags_of(script):
    return {flag for action in parser_of(script)._actions for flag in action.option_strings}


def help_entries(script):
    """--help's text, one entry per flag: its option line and the help lines under it."""
    entries = []
    for line in parser_of(script).format_help().splitlines():
        if re.match(r"  -", line):
            entries.append(line)
        elif entries and line.startswith("   "):
            entries[-1] += " " + line.strip()
    return entries


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_each_flag_default_once(script):
    """A help text that says its own default ("default: every core") is not followed by a second,
    "(default: None)", and every flag with a value default still shows it."""
    entries = help_entries(script)
    assert len(entries) > 40
    for entry in entries:
        assert entry.count("default:") <= 1, f"{script}.py --help: {entry}"
    assert any("--seed" in e and "(default: 42)" in e for e in entries)
    assert any("--preprocessing_num_workers" in e and "(default: every core)" in e for e in entries)


def commands(page):
    """(script, the flags it is given) for each line of the page's code blocks that runs a script;
    a `\\`-continued line is joined to the next, and a comment after `#` is left out."""
    found, in_code, held = [], False, ""
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if not in_code:
            continue
        line = held + re.split(r"\s#\s", line)[0]
        if line.rstrip().endswith("\\"):
            held = line.rstrip()[:-1]
            continue
        held = ""
        for script in SCRIPTS:
            if f"{script}.py" in line:
                found.append((script, FLAG.findall(line.split(f"{script}.py", 1)[1])))
    return found


def test_every_command_on_the_pages_passes_flags_its_script_takes():
    """Each `python <script>.py ...` (or `accelerate launch ... <script>.py ...`) in the README's
    and the docs pages' code blocks: each --flag after the script's name is one its parser takes."""
    accepted = {script: flags_of(script) for script in SCRIPTS}
    checked = 0
    for page in PAGES:
        for script, flags in commands(page):
            for flag in flags:
                assert flag in accepted[script], f"{page.name}: {script}.py has no {flag}"
                checked += 1
    assert checked >= 40


def test_the_pages_name_only_flags_the_code_has():
    """Every --flag the README and the docs pages name, in prose or in code, is a flag of one of the
    scripts, of a benchmark or test tool under bench/ and tests/ (read from their source), or of a
    tool that launches the scripts (OTHER_TOOLS)."""
    known = set().union(*(flags_of(script) for script in SCRIPTS), *OTHER_TOOLS.values())
    for tool in [*(helpers.REPO / "bench").glob("*.py"), helpers.REPO / "tests" / "kill_anywhere.py"]:
        known |= set(re.findall(r"[\"'](--[\w-]+)[\"']", tool.read_text()))
    for page in PAGES:
        for flag in FLAG.findall(page.read_text()):
            assert flag in known, f"{page.relative_to(helpers.REPO)} names {flag}, which no script or tool has"


def test_the_badge_and_the_notebook_name_the_same_repository():
    """Where the repository is pushed is written in two places, each marked: the README's Colab
    badge and REPO_URL in the notebook's settings cell. They name the same OWNER/REPO."""
    badge = re.findall(r"colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/", README)
    notebook = json.loads((helpers.REPO / "notebooks" / "colab_quickstart.ipynb").read_text())
    text = "".join("".join(cell["source"]) for cell in notebook["cells"])
    urls = re.findall(r'REPO_URL = "https://github\.com/([\w.-]+/[\w.-]+)"', text)
    assert len(badge) == 1 and len(urls) == 1, (badge, urls)
    assert urls[0].removesuffix(".git") == badge[0]
