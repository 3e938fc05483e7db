"""Kill a run anywhere, run the same command again, and it ends where the uninterrupted run ends:
the same best/ weights, the same metrics, the same final step. Here the moment that used to break
it (a kill during the last evaluation, after the last step's checkpoint), made on purpose. Kills
at random moments of every script, many of them, are tests/kill_anywhere.py's (seeded: a failure
names the seed that replays it): CI runs it after the suite, whose ten minutes it would not fit."""

import json

import pytest
import torch
from kill_anywhere import weights_differ
from safetensors.torch import save_file
from test_train_classifier import argv, newest_state

import train_classifier


class Killed(BaseException):
    """Stands for SIGKILL in a run called in-process: no `except Exception` catches it, so nothing
    after the point it is raised at runs (no save, no export)."""


@pytest.mark.parametrize("epochs", [1, 2])
def test_a_kill_during_the_last_evaluation_is_evaluated_on_the_next_run(
    tiny_bert, toy_files, tmp_path, monkeypatch, epochs
):
    """The last step's checkpoint is saved (--checkpointing_steps divides the steps), then the
    run dies in its last evaluation (an out-of-memory, a preemption). The re-run must evaluate
    and export that step: a one-epoch run used to fail on every re-run (no eval_results.json), a
    longer one to end with the previous epoch's model."""
    extra = ["--max_train_samples", 160, "--num_train_epochs", epochs, "--checkpointing_steps", 10]  # 10 an epoch
    train_classifier.main(argv(tiny_bert, *toy_files, tmp_path / "whole", *extra))

    real_evaluation, evaluations = train_classifier.run_evaluation, []

    def killed_in_the_last_evaluation(*args, **kwargs):
        evaluations.append(1)
        if len(evaluations) == epochs:
            raise Killed
        return real_evaluation(*args, **kwargs)

    monkeypatch.setattr(train_classifier, "run_evaluation", killed_in_the_last_evaluation)
    killed = tmp_path / "killed"
    with pytest.raises(Killed):
        train_classifier.main(argv(tiny_bert, *toy_files, killed, *extra))
    monkeypatch.undo()
    assert newest_state(killed)["completed_steps"] == 10 * epochs  # the last step's checkpoint is there

    train_classifier.main(argv(tiny_bert, *toy_files, killed, *extra))
    whole, again = tmp_path / "whole", killed
    assert (again / "best" / "model.safetensors").read_bytes() == (whole / "best" / "model.safetensors").read_bytes()
    results = [json.loads((out / "eval_results.json").read_text()) for out in (again, whole)]
    assert results[0] == results[1]
    assert newest_state(again)["evaluated_step"] == 10 * epochs
    # Finished now: a third run trains and evaluates nothing more.
    state = train_classifier.main(argv(tiny_bert, *toy_files, killed, *extra))
    assert state.completed_steps == 10 * epochs


def test_a_mismatch_names_the_tensors_that_differ(tmp_path):
    """kill_anywhere.py's report of a run that ended otherwise: each tensor of best/ and the newest
    checkpoint that differs, by its largest difference (a bug moves many by much; the last bits of
    a matrix product, a few by 1e-8); equal ones are not named."""
    weights = {"a": torch.zeros(3), "b": torch.ones(2)}
    for run, b in (("whole", weights["b"]), ("killed", weights["b"] + torch.tensor([0.0, 0.5]))):
        for folder in (tmp_path / run / "best", tmp_path / run / "checkpoints" / "step_00000002"):
            folder.mkdir(parents=True)
            save_file(weights | {"b": b}, folder / "model.safetensors")
    (tmp_path / "whole" / "checkpoints" / "step_00000001").mkdir()  # older: not compared
    assert weights_differ(tmp_path / "whole", tmp_path / "killed") == {"best/b": "0.5", "final/b": "0.5"}
