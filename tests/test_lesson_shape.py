"""The lesson stays a lesson: each script with common.py is short, nothing in it is one long
function, a quarter of it explains why, and machinery/ (the second layer) never imports upward.
bench/lesson_sizes.py measures it all and prints the table; here it must pass."""

import importlib.util

import helpers


def test_each_lesson_meets_its_targets_and_imports_go_one_way(capsys):
    spec = importlib.util.spec_from_file_location("lesson_sizes", helpers.REPO / "bench" / "lesson_sizes.py")
    lesson_sizes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lesson_sizes)
    status = lesson_sizes.main()
    report = capsys.readouterr().out
    assert status == 0, report
    assert "MISSED" not in report
    for script in ("train_classifier.py", "finetune_gpt2.py", "pretrain_mlm.py"):
        assert script in report
