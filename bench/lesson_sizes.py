"""How much a learner reads: each lesson (one script and common.py) in lines, and what keeps it a
lesson (issue 31's targets). Prints a table, and exits 1 if a target is missed:

    python bench/lesson_sizes.py

- a lesson: at most 900 lines (a script and common.py, every line counted, comments included);
- common.py at most 500; finetune_gpt2.py and pretrain_mlm.py at most 300, train_classifier.py 350;
- no function (or method) over 60 lines, in the lesson files and in machinery/;
- comments and docstrings at least 25% of the lesson files' lines;
- machinery/: each module under 400 lines, with a docstring that names its tests, and importing
  neither common.py nor a script (imports go one way: a script -> common.py -> machinery/)."""

import ast
import io
import sys
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = {"finetune_gpt2.py": 300, "pretrain_mlm.py": 300, "train_classifier.py": 350}
COMMON, LESSON, MODULE, FUNCTION, COMMENTS = 500, 900, 400, 60, 0.25


def comment_lines(source):
    """Lines that hold a comment or a docstring (a code line with a comment at its end counts)."""
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            lines.add(token.start[0])
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node) is not None:
            first = node.body[0]
            lines.update(range(first.lineno, first.end_lineno + 1))
    return len(lines)


def long_functions(path):
    tree = ast.parse(path.read_text())
    return [
        f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > FUNCTION
    ]


def imports_of(path):
    """The top-level modules a file imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def main():
    problems = []
    common = REPO / "common.py"
    common_lines = len(common.read_text().splitlines())
    print(f"{'file':<22}{'lines':>7}{'target':>8}{'lesson':>8}{'comments':>10}")
    print(f"{'common.py':<22}{common_lines:>7}{COMMON:>8}")
    if common_lines > COMMON:
        problems.append(f"common.py has {common_lines} lines, over {COMMON}")
    lesson_files = [common, *(REPO / name for name in SCRIPTS)]
    for name, target in SCRIPTS.items():
        source = (REPO / name).read_text()
        lines = len(source.splitlines())
        lesson = lines + common_lines
        shares = (comment_lines(source) + comment_lines(common.read_text())) / lesson
        print(f"{name:<22}{lines:>7}{target:>8}{lesson:>8}{shares:>10.0%}")
        if lines > target:
            problems.append(f"{name} has {lines} lines, over {target}")
        if lesson > LESSON:
            problems.append(f"the lesson of {name} has {lesson} lines, over {LESSON}")
        if shares < COMMENTS:
            problems.append(f"the lesson of {name} is {shares:.0%} comments and docstrings, under {COMMENTS:.0%}")
    modules = sorted((REPO / "machinery").glob("*.py"))
    print(f"\nmachinery/: {len(modules)} modules, {sum(len(m.read_text().splitlines()) for m in modules)} lines")
    for module in modules:
        lines = len(module.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(module.read_text())) or ""
        print(f"  {module.name:<22}{lines:>5}")
        if lines >= MODULE:
            problems.append(f"machinery/{module.name} has {lines} lines, not under {MODULE}")
        if module.name != "__init__.py" and "test" not in doc:
            problems.append(f"machinery/{module.name}: its docstring names no test")
        upward = imports_of(module) & {"common", *(Path(name).stem for name in SCRIPTS)}
        if upward:
            problems.append(f"machinery/{module.name} imports {sorted(upward)}: imports go downward only")
    for path in [*lesson_files, *modules]:
        problems += [f"over {FUNCTION} lines: {where}" for where in long_functions(path)]
    for problem in problems:
        print(f"MISSED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
