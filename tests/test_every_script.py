"""The never-lose-work promises, proved for each of the three scripts: a damaged newest
checkpoint, SIGTERM / SIGINT, changed settings, and a sweep of the bad input users really feed.
(The shared machinery itself is tested in test_faults.py.)"""

import json
import os
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import helpers
import pytest
import test_finetune_gpt2 as gpt2_tests
import test_pretrain_mlm as mlm_tests
import test_train_classifier as classifier_tests

import finetune_gpt2
import pretrain_mlm
import train_classifier


@dataclass
class Setup:
    name: str
    module: object
    train: Path
    valid: Path
    model: Path | None
    argv: object  # (train, valid, out, *extra) -> argv

    def args(self, out, *extra, train=None, valid=None):
        return self.argv(train or self.train, valid or self.valid, out, *extra)


@pytest.fixture(scope="module")
def setups(tiny_bert, toy_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("every")
    lm_text = d / "train.txt", d / "valid.txt"
    lm_text[0].write_text("\n".join(gpt2_tests.repetitive_lines(300, seed=1)) + "\n")
    lm_text[1].write_text("\n".join(gpt2_tests.repetitive_lines(40, seed=2)) + "\n")
    gpt2 = gpt2_tests.make_tiny_gpt2(d / "gpt2", lm_text[0].read_text().splitlines())

    def classifier_argv(train, valid, out, *extra):
        return classifier_tests.argv(tiny_bert, train, valid, out, "--num_train_epochs", 2, *extra)

    def gpt2_argv(train, valid, out, *extra):
        return gpt2_tests.argv(gpt2, train, valid, out, "--num_train_epochs", 2, *extra)

    def mlm_argv(train, valid, out, *extra):
        return mlm_tests.argv(train, valid, out, "--num_train_epochs", 2, *extra)

    return {
        "train_classifier": Setup("train_classifier", train_classifier, *toy_files, tiny_bert, classifier_argv),
        "finetune_gpt2": Setup("finetune_gpt2", finetune_gpt2, *lm_text, gpt2, gpt2_argv),
        "pretrain_mlm": Setup("pretrain_mlm", pretrain_mlm, *lm_text, None, mlm_argv),
    }


SCRIPTS = ["train_classifier", "finetune_gpt2", "pretrain_mlm"]


@pytest.fixture(scope="module")
def full_runs(setups, tmp_path_factory):
    """Each script trained to the end, uninterrupted, keeping every checkpoint."""
    runs = {}
    for name, s in setups.items():
        out = tmp_path_factory.mktemp(f"full-{name}") / "run"
        s.module.main(s.args(out, "--checkpointing_steps", 4, "--keep_last", 100))
        runs[name] = out
    return runs


def checkpoints(out):
    return sorted((Path(out) / "checkpoints").iterdir())


def final_weights(out):
    return (checkpoints(out)[-1] / "model.safetensors").read_bytes()


def one_error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def fails_cleanly(fn, args, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        fn(args)
    assert info.value.code == 2
    return one_error_line(capsys)


# ---------------------------------------------------------------------------
# Damaged checkpoints, signals, changed settings.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_damaged_newest_checkpoint_is_skipped_and_the_run_ends_the_same(script, setups, full_runs, tmp_path, capsys):
    s, out = setups[script], tmp_path / "run"
    shutil.copytree(full_runs[script], out)
    newest, previous = checkpoints(out)[-1], checkpoints(out)[-2]
    for f in newest.iterdir():  # as if killed while writing: every file cut short
        if f.suffix in (".safetensors", ".bin"):
            with open(f, "r+b") as handle:
                handle.truncate(f.stat().st_size // 2)
    capsys.readouterr()
    s.module.main(s.args(out, "--checkpointing_steps", 4, "--keep_last", 100))
    printed = capsys.readouterr().out
    assert f"skipping damaged checkpoint {newest}" in printed
    steps = state_of(previous)["completed_steps"]
    assert f"Resumed from {previous}: epoch" in printed and f"step {steps}," in printed  # not a fresh start
    assert final_weights(out) == final_weights(full_runs[script])


@pytest.fixture(scope="module")
def stopped_runs(setups, full_runs, tmp_path_factory):
    """One job (tests/launch_worker.py): each script stopped by SIGTERM (a scheduler, Colab's
    stop button) or SIGINT (Ctrl-C) after its first checkpoint, then run again without step
    saves. (SIGKILL at random moments: tests/kill_anywhere.py.)"""
    folder = tmp_path_factory.mktemp("stopped")
    runs = []
    for script, sig in (
        ("train_classifier", signal.SIGTERM),
        ("finetune_gpt2", signal.SIGINT),
        ("pretrain_mlm", signal.SIGTERM),
    ):
        s, signalled = setups[script], folder / script / "signalled"
        argv = s.args(signalled, "--checkpointing_steps", 2)
        runs.append(
            {"script": script, "argv": argv, "name": "signalled", "signal_when_saved": [sig, 1, str(signalled)]}
        )
        runs.append({"script": script, "argv": s.args(signalled), "name": "continued", "out": str(signalled)})
    for run in runs:
        run["engine"] = "one"
    statuses = helpers.launch(runs, folder / "logs")
    return {(r["script"], r["name"]): (r, status) for r, status in zip(runs, statuses)}


def newest_state(out):
    return state_of(checkpoints(out)[-1])


def state_of(checkpoint):
    return json.loads((checkpoint / "training_state.json").read_text())["state"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_stop_signal_saves_and_the_rerun_continues_from_that_step(script, stopped_runs, full_runs):
    (signalled, status), (continued, rerun_status) = (stopped_runs[script, n] for n in ("signalled", "continued"))
    sig = signal.Signals(signalled["signal_when_saved"][0])
    printed = helpers.log_of(signalled)
    assert status == 128 + sig and "Traceback" not in printed, printed[-2000:]
    saved = int(printed.split(f"{sig.name} received: saved step ")[1].split(".")[0])
    # Run again without step saves: the only way to continue from `saved` is the checkpoint the
    # signal wrote.
    assert rerun_status == 0, helpers.log_of(continued)[-2000:]
    assert f"step {saved}," in helpers.log_of(continued).split("Resumed from")[1].splitlines()[0]
    assert final_weights(continued["out"]) == final_weights(full_runs[script])


def test_a_run_called_in_process_gives_the_signals_back(setups, tmp_path):
    """main() called from a notebook catches SIGTERM / SIGINT only while it runs: after it,
    interrupting the kernel works as before, whether the run finished or was stopped."""
    s = setups["pretrain_mlm"]
    caught = []

    def notebook_handler(signum, frame):
        caught.append(signum)

    before = {sig: signal.signal(sig, notebook_handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        s.module.main(s.args(tmp_path / "finished", "--max_train_steps", 2))
        assert [signal.getsignal(sig) for sig in before] == [notebook_handler] * 2

        out = tmp_path / "stopped"

        def terminate_after_the_first_save():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not list(out.glob("checkpoints/step_*")):
                time.sleep(0.002)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=terminate_after_the_first_save, daemon=True).start()
        with pytest.raises(SystemExit) as stopped:
            s.module.main(s.args(out, "--checkpointing_steps", 2))
        assert stopped.value.code == 128 + signal.SIGTERM
        assert caught == []  # the run received it, and saved
        assert [signal.getsignal(sig) for sig in before] == [notebook_handler] * 2
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


CHANGES = {
    "train_classifier": (["--max_seq_length", 16], "max_seq_length: 128 -> 16"),
    "finetune_gpt2": (["--block_size", 16], "block_size: 32 -> 16"),
    "pretrain_mlm": (["--vocab_size", 280], "vocab_size: 300 -> 280"),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_changed_settings_are_refused_and_harmless_ones_allowed(script, setups, full_runs, tmp_path, capsys):
    s, out = setups[script], tmp_path / "run"
    shutil.copytree(full_runs[script], out)
    before = helpers.digest(out)
    extra, expected = CHANGES[script]
    line = fails_cleanly(s.module.main, s.args(out, *extra), capsys)
    assert expected in line and "--no_resume" in line
    other = tmp_path / "other.txt" if script != "train_classifier" else tmp_path / "other.csv"
    shutil.copy(s.train, other)
    line = fails_cleanly(s.module.main, s.args(out, train=other), capsys)
    assert "train_file" in line and str(other) in line
    assert helpers.digest(out) == before
    # A larger epoch count and another save interval: it continues.
    state = s.module.main(s.args(out, "--num_train_epochs", 3, "--save_every_minutes", 5))
    assert state.epoch == 3


class Killed(BaseException):
    """The process died here (as under SIGKILL: no clean-up, the files as they were)."""


@pytest.mark.parametrize("script", ["finetune_gpt2", "pretrain_mlm"])
def test_a_kill_while_writing_tokens_and_a_damaged_token_file_are_made_again(
    script, setups, full_runs, tmp_path, monkeypatch, capsys
):
    import datasets

    from machinery import token_files

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))  # no token file yet
    tokens = tmp_path / "cache" / "lm-tokens"
    s = setups[script]
    args = s.args(tmp_path / "run", "--checkpointing_steps", 4, "--keep_last", 100)
    write = token_files.TokenFile.write

    def killed_before_the_rename(self, encoded, vocabulary_size):
        def die(*_):
            raise Killed

        with monkeypatch.context() as inside:
            inside.setattr(token_files.os, "replace", die)
            write(self, encoded, vocabulary_size)

    monkeypatch.setattr(token_files.TokenFile, "write", killed_before_the_rename)
    with pytest.raises(Killed):
        s.module.main(args)
    assert list(tokens.glob(".tmp-*")) and not list(tokens.glob("[!.]*.npy"))  # half-written, never in place
    monkeypatch.setattr(token_files.TokenFile, "write", write)
    capsys.readouterr()
    s.module.main(args)
    assert "Tokenized the training text" in capsys.readouterr().out  # made again
    assert final_weights(tmp_path / "run") == final_weights(full_runs[script])

    for token_file in tokens.glob("[!.]*.tokens.npy"):  # damaged: cut short
        with open(token_file, "r+b") as f:
            f.truncate(token_file.stat().st_size - 2)
    s.module.main(s.args(tmp_path / "again", "--checkpointing_steps", 4, "--keep_last", 100))
    printed = capsys.readouterr().out
    assert "Tokenized the training text" in printed and "Tokenized the validation text" in printed
    assert final_weights(tmp_path / "again") == final_weights(full_runs[script])
    assert not list(tokens.glob(".tmp-*"))  # the leftovers of the killed run are gone


# ---------------------------------------------------------------------------
# What users really feed: each gets one line and exit code 2, or works.
# ---------------------------------------------------------------------------


def bad_inputs(tmp_path, script):
    """case -> (what to change: dict of train/valid/model/extra, expected: "ok" or words of the
    error)"""
    text = script != "train_classifier"
    ext = ".txt" if text else ".csv"

    def write(name, data):
        path = tmp_path / f"{name}{ext}"
        path.write_bytes(data)
        return path

    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "README.md").write_text("just notes\n")
    good = b"the cat sat on the mat .\n" * 50 if text else b"text,label\nw1 good,pos\nw2 bad,neg\n" * 20
    huge = b"the cat sat on the mat . " * 20_000 + b"\n"  # one 500,000-character line
    cases = {
        "empty file": ({"train": write("empty", b"")}, ["empty"]),
        "non-UTF-8 bytes": (
            {"train": write("latin1", good + ("caf\xe9 " if text else "caf\xe9 good,pos\n").encode("latin-1"))},
            ["not UTF-8 text", "line"],
        ),
        "Windows line endings": ({"train": write("crlf", good.replace(b"\n", b"\r\n"))}, "ok"),
        "directory instead of a file": ({"train": tmp_path}, ["directory"]),
        "model directory that is not a model": ({"model": not_a_model}, ["cannot load", "not-a-model"]),
        # offline (as every test is) or misspelled: the hub cannot give it
        "hub data set that cannot be loaded": ({"dataset": "no-such/wikitxt"}, ["--dataset_name no-such/wikitxt"]),
    }
    if text:
        cases["huge single line"] = ({"train": write("huge", good + huge)}, "ok")
    else:
        cases["quotes and embedded tabs"] = (
            {"train": write("quoted", b'text,label\n"w1, ""good""\tw2",pos\n"w3\tbad, w4",neg\n' * 20)},
            "ok",
        )
        blank = b"text,label\nw1 good,pos\nw2 bad,\nw3 bad,neg\n"
        cases["blank labels"] = ({"train": write("blank", blank)}, ["empty label"])
        long_row = b"text,label\n" + b"w1 " * 200_000 + b"good,pos\n" + b"w2 bad,neg\nw3 good,pos\n" * 10
        cases["huge single line"] = ({"train": write("huge", long_row)}, "ok")
    return cases


def training_samples(s, train, out):
    """What the script should report for a training file, as it reports it: the classifier's rows
    (a quote-aware CSV reader's), GPT-2's blocks of 32 tokens and the masked LM's (from every
    non-blank line, with <s> ... </s>)."""
    import csv

    from transformers import AutoTokenizer

    if s.name == "train_classifier":
        csv.field_size_limit(10**7)  # the huge line's text
        return f"Data: {len(list(csv.DictReader(open(train, newline='', encoding='utf-8')))):,}"
    lines = Path(train).read_text().splitlines(keepends=True)  # "\r\n" read as "\n", as datasets reads it
    if s.name == "finetune_gpt2":
        tokenizer = AutoTokenizer.from_pretrained(s.model)
        return f"{sum(len(tokenizer(line)['input_ids']) for line in lines) // 32:,}"
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokens = sum(len(tokenizer(line.strip("\n"))["input_ids"]) for line in lines if line.strip())
    return f"{tokens // 32:,}"


SWEEP = [
    (script, case)
    for script in SCRIPTS
    for case in [
        "empty file",
        "non-UTF-8 bytes",
        "Windows line endings",
        "directory instead of a file",
        "model directory that is not a model",
        "hub data set that cannot be loaded",
        "huge single line",
        *(["quotes and embedded tabs", "blank labels"] if script == "train_classifier" else []),
    ]
]


@pytest.mark.parametrize("script, case", SWEEP)
def test_bad_input_sweep(script, case, setups, full_runs, tmp_path, capsys):
    s = setups[script]
    change, expected = bad_inputs(tmp_path, script)[case]
    train, valid = change.get("train", s.train), s.valid
    if expected == "ok":
        out = tmp_path / "fresh"
        args = s.argv(train, valid, out, "--max_train_steps", 2)
        if s.name == "pretrain_mlm":
            args += ["--vocab_size", "261", "--min_frequency", "1"]
        if "model" in change:
            args += ["--model_name_or_path", str(change["model"])]
        capsys.readouterr()
        state = s.module.main(args)
        assert state.completed_steps == 2
        # Every row or line was read as written: the count the script reports is the one found here
        # by hand.
        assert re.search(rf"\b{training_samples(s, train, out)} training", capsys.readouterr().out)
        return
    out = tmp_path / "run"  # an existing run: a bad command must not touch its checkpoints
    shutil.copytree(full_runs[script], out)
    before = helpers.digest(out)
    args = s.argv(train, valid, out)
    if "model" in change:
        args += ["--model_name_or_path", str(change["model"])]
    if "dataset" in change:  # no local files: the data set comes from the hub
        for flag in ("--train_file", "--validation_file"):
            i = args.index(flag)
            del args[i : i + 2]
        args += ["--dataset_name", change["dataset"]]
    line = fails_cleanly(s.module.main, args, capsys)
    for word in expected:
        assert word in line, line
    assert helpers.digest(out) == before


@pytest.mark.parametrize("script", ["finetune_gpt2", "pretrain_mlm"])
def test_a_stream_that_gives_no_sample_is_refused_before_training(script, setups, full_runs, tmp_path, capsys):
    """--streaming on a text too short for one block (GPT-2), or of blank lines only, more than the
    1,000 lines tokenized at once (the masked LM): one line saying so, before training. The stream
    used to end each epoch at once, forever; the masked LM crashed on a batch of blank lines."""
    s, out = setups[script], tmp_path / "run"
    out.mkdir()
    for tokenizer_file in full_runs[script].glob("*token*"):  # the masked LM's, trained on real text
        shutil.copy(tokenizer_file, out)
    short = tmp_path / "short.txt"
    short.write_text("the cat sat .\n" if script == "finetune_gpt2" else "\n \n" * 1500)
    line = fails_cleanly(s.module.main, s.args(out, "--streaming", "--max_train_steps", 2, train=short), capsys)
    assert "the training text is too short for one sample" in line, line
    assert not (out / "checkpoints").exists()


# ---------------------------------------------------------------------------
# The loop is the lesson: the same skeleton, in plain sight, in every script.
# ---------------------------------------------------------------------------


def loop_of(script):
    """A script's loop: its epochs, in train() (from `while not common.finished`), then
    train_one_epoch, the batches of one epoch."""
    import ast

    source = (helpers.REPO / f"{script}.py").read_text()
    start = source.index("    while not common.finished(")
    epochs = source[start : source.index("\n\n", start)].splitlines()
    tree = ast.parse(source)
    epoch = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "train_one_epoch")
    return epochs + source.splitlines()[epoch.lineno - 1 : epoch.end_lineno]


def test_the_three_loops_differ_only_where_marked():
    """Every line of the loop is the same in the three scripts, comments included, but the ones
    marked "this script" (the forward pass, what counts as a token, the evaluation). Each effect
    of the loop is a line of its own, in this order: nothing that counts also saves or exits, and
    no epoch ends out of sight."""
    loops = {script: loop_of(script) for script in SCRIPTS}
    for script, loop in loops.items():
        assert 3 <= sum("# this script" in line for line in loop) <= 5, script
    shared = [[line for line in loop if "# this script" not in line] for loop in loops.values()]
    assert shared[0] == shared[1] == shared[2]
    skeleton = ["while not common.finished(", "model.train()", "set_epoch", "EpochBatches(", "train_one_epoch("]
    skeleton += ["state.start_next_epoch()", "run_evaluation(", "best.keep_if_better(", "common.stop_early_if_stuck("]
    skeleton += ["state.evaluated_step =", "checkpoints.save(", "common.stop_if_signalled("]
    skeleton += ["for batch in", "accumulate", "backward", "clip_grad_norm_", "optimizer.step()"]
    skeleton += ["lr_scheduler.step()", "zero_grad()", "state.batch_in_epoch += 1", "progress.add_batch("]
    skeleton += [
        "state.completed_steps += 1",
        "progress.log_if_due(",
        "checkpoints.due(",
        "checkpoints.save(",
        "common.stop_if_signalled(",
    ]
    text, at = "\n".join(loops["train_classifier"]), 0
    for step in skeleton:  # each after the one before
        at = text.index(step, at) + len(step)


def test_each_train_function_fits_one_screen():
    import ast

    for script in SCRIPTS:
        tree = ast.parse((helpers.REPO / f"{script}.py").read_text())
        for function in ("train", "train_one_epoch"):
            node = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == function)
            assert node.end_lineno - node.lineno + 1 <= 60, (script, function)
