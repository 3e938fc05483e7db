"""train_classifier.py end to end, on a tiny BERT and a toy task written by the tests."""

import csv
import json
import math
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import helpers
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

import common
import train_classifier
from machinery import checkpoint_files, export

EPOCHS = 4
BATCH = 16  # 400 rows -> 25 optimizer steps per epoch


def argv(model, train, dev, out, *extra):
    base = [
        "--model_name_or_path",
        model,
        "--train_file",
        train,
        "--validation_file",
        dev,
        "--output_dir",
        out,
        "--learning_rate",
        "3e-3",
        "--per_device_train_batch_size",
        BATCH,
        "--per_device_eval_batch_size",
        7,
        "--num_train_epochs",
        EPOCHS,
        "--logging_steps",
        5,
        "--save_every_minutes",
        0,
    ]
    return [str(a) for a in base + list(extra)]


def checkpoints(out):
    return sorted((Path(out) / "checkpoints").iterdir())


def newest_state(out):
    return json.loads((checkpoints(out)[-1] / checkpoint_files.STATE_FILE).read_text())["state"]


def final_weights(out):
    return (checkpoints(out)[-1] / "model.safetensors").read_bytes()


digest = helpers.digest


def eval_entries(state):
    return [e for e in state["log_history"] if "eval_loss" in e]


@pytest.fixture(scope="module")
def trained(tiny_bert, toy_files, tmp_path_factory):
    """One complete training run, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("trained")
    train_classifier.main(argv(tiny_bert, *toy_files, out))
    return out


def test_learns_toy_task(trained):
    results = json.loads((trained / "eval_results.json").read_text())
    assert results["accuracy"] >= 0.9  # chance is 0.5
    state = newest_state(trained)
    assert state["completed_steps"] == EPOCHS * 25 and state["epoch"] == EPOCHS
    losses = [e["train_loss"] for e in state["log_history"] if "train_loss" in e]
    assert losses[-1] < 0.5 * losses[0]
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the curves, drawn headless


def test_exported_model_predicts_in_pipeline(trained):
    classifier = pipeline("text-classification", model=str(trained / "best"))
    predictions = classifier(["w1 w2 good w3", "w4 awful w5 w6", "great w7", "w8 w9 w10 bad"])
    assert [p["label"] for p in predictions] == ["pos", "neg", "pos", "neg"]


def test_inputs_longer_than_the_model_are_cut_to_its_positions(tiny_bert, tmp_path):
    # The tiny BERT has 64 positions and its tokenizer no limit of its own, as many hub models: a
    # long validation row must not crash the demo at the end, and best/ must cut long inputs for
    # pipeline users too.
    rows = helpers.toy_rows(40, seed=7)
    rows[-1]["text"] = " ".join(["w1"] * 100 + ["good"])
    train = helpers.write_csv(tmp_path / "train.csv", rows[:32])
    dev = helpers.write_csv(tmp_path / "dev.csv", rows[32:])
    train_classifier.main(argv(tiny_bert, train, dev, tmp_path / "out", "--max_train_steps", 2))
    best = tmp_path / "out" / "best"
    assert AutoTokenizer.from_pretrained(best).model_max_length == 64
    assert pipeline("text-classification", model=str(best))(" ".join(["w2"] * 200), truncation=True)


def test_metrics_equal_hand_computation(tiny_bert, toy_files, tmp_path):
    # A briefly trained model: imperfect predictions make accuracy and F1 informative.
    train_classifier.main(argv(tiny_bert, *toy_files, tmp_path / "brief", "--max_train_steps", 9))
    model_dir = tmp_path / "brief" / "best"
    # 30 examples in batches of 7: the last batch holds 2, so per-batch averaging would skew the
    # loss.
    metrics = train_classifier.main(argv(model_dir, *toy_files, tmp_path / "out", "--eval_only"))

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    rows = list(csv.DictReader(open(toy_files[1])))
    losses, tp, fp, fn, correct = [], 0, 0, 0, 0
    for row in rows:  # one example at a time: no padding, no batching
        with torch.no_grad():
            logits = model(**tokenizer(row["text"], return_tensors="pt")).logits[0]
        label = model.config.label2id[row["label"]]
        losses.append(-torch.log_softmax(logits, -1)[label].item())
        pred = int(logits.argmax())
        correct += pred == label
        tp += pred == 1 and label == 1
        fp += pred == 1 and label == 0
        fn += pred == 0 and label == 1
    accuracy = correct / len(rows)
    assert 0.2 < accuracy < 0.8 and tp > 0, "the check needs imperfect, mixed predictions"
    assert metrics["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert metrics["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
    assert metrics["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_compute_metrics_matches_hand_computation():
    predictions = [0, 1, 1, 0, 1, 2, 2, 0]
    references = [0, 1, 0, 0, 2, 2, 1, 1]
    m = train_classifier.compute_metrics(predictions, references, num_labels=3)
    assert m["accuracy"] == pytest.approx(4 / 8)
    # per class F1 = 2tp / (2tp + fp + fn): class 0: tp2 fp1 fn1; class 1: tp1 fp2 fn2; class 2: tp1
    # fp1 fn1
    assert m["f1"] == pytest.approx((4 / 6 + 2 / 6 + 2 / 4) / 3)
    binary = train_classifier.compute_metrics([1, 1, 0, 0, 1], [1, 0, 0, 1, 1], num_labels=2)
    assert binary == pytest.approx({"accuracy": 3 / 5, "f1": 2 * 2 / (2 * 2 + 1 + 1)})


def test_metrics_without_network_do_not_hang(monkeypatch):
    # With HF_HUB_OFFLINE unset, `evaluate` tries the hub; without network it must fall back to
    # scikit-learn, quickly.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    used = []
    for name, compute in train_classifier.METRICS.items():
        monkeypatch.setitem(
            train_classifier.METRICS, name, lambda *a, _f=compute, _n=name, **k: used.append(_n) or _f(*a, **k)
        )
    start = time.monotonic()
    m = train_classifier.compute_metrics([1, 0, 1], [1, 1, 1], num_labels=2)
    assert m == pytest.approx({"accuracy": 2 / 3, "f1": 0.8})
    assert used == ["accuracy", "f1"]  # the fallbacks computed them
    assert time.monotonic() - start < 120


def test_finished_run_is_not_trained_again_and_more_epochs_continue(trained, tiny_bert, toy_files, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = digest(out / "checkpoints")
    state = train_classifier.main(argv(tiny_bert, *toy_files, out))
    assert "already finished" in capsys.readouterr().out
    assert digest(out / "checkpoints") == before
    assert state.completed_steps == EPOCHS * 25

    state = train_classifier.main(argv(tiny_bert, *toy_files, out, "--num_train_epochs", EPOCHS + 1))
    assert state.completed_steps == (EPOCHS + 1) * 25 and state.epoch == EPOCHS + 1
    assert newest_state(out)["completed_steps"] == (EPOCHS + 1) * 25

    # --max_train_steps may end a run inside an epoch: the epoch is not over (its batches did not
    # run out), and raised, the run goes on with that epoch's other batches.
    split, steps = tmp_path / "split", EPOCHS * 25 + 10
    shutil.copytree(trained, split)
    more = ["--num_train_epochs", EPOCHS + 1]
    state = train_classifier.main(argv(tiny_bert, *toy_files, split, *more, "--max_train_steps", steps))
    assert state.completed_steps == steps and state.epoch == EPOCHS and state.batch_in_epoch > 0
    batch, _ = state.batch_in_epoch, capsys.readouterr()
    state = train_classifier.main(argv(tiny_bert, *toy_files, split, *more))
    resumed = capsys.readouterr().out.split("Resumed from ")[1].splitlines()[0]
    assert f"epoch {EPOCHS}, step {steps}, batch {batch} of the epoch" in resumed, resumed
    assert state.completed_steps == (EPOCHS + 1) * 25 and state.epoch == EPOCHS + 1


def test_resume_mid_epoch_equals_uninterrupted(tiny_bert, toy_files, tmp_path, capsys):
    full = tmp_path / "full"
    train_classifier.main(argv(tiny_bert, *toy_files, full, "--checkpointing_steps", 7, "--keep_last", 100))
    # Pretend the run died after step 31: only checkpoints up to step 28 (epoch 2, batch 3) exist.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for path in checkpoints(cut):
        if int(path.name.split("_")[1]) > 31:
            shutil.rmtree(path)
    # Progress comes from the checkpoint's own metadata, not from its folder name.
    checkpoints(cut)[-1].rename(cut / "checkpoints" / "my-backup")
    capsys.readouterr()
    train_classifier.main(argv(tiny_bert, *toy_files, cut, "--checkpointing_steps", 7, "--keep_last", 100))
    assert "step 28, batch 3 of the epoch" in capsys.readouterr().out
    assert final_weights(cut) == final_weights(full)
    assert eval_entries(newest_state(cut)) == eval_entries(newest_state(full))


def test_damaged_newest_checkpoint_is_skipped(trained, tiny_bert, toy_files, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    newest, older = checkpoints(out)[-1], checkpoints(out)[-2]
    expected = (newest / "model.safetensors").read_bytes()
    with open(newest / "model.safetensors", "r+b") as f:  # as if killed while writing
        f.truncate(1000)
    capsys.readouterr()
    train_classifier.main(argv(tiny_bert, *toy_files, out))
    printed = capsys.readouterr().out
    assert f"skipping damaged checkpoint {newest}" in printed
    steps = json.loads((older / checkpoint_files.STATE_FILE).read_text())["state"]["completed_steps"]
    assert f"Resumed from {older}: epoch {steps // 25}, step {steps}," in printed  # not a fresh start
    assert final_weights(out) == expected


def start_run(args):
    return subprocess.Popen(
        helpers.script_command("train_classifier.py", *args),
        cwd=helpers.REPO,
        env=helpers.offline_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_scheduler_counts_optimizer_steps_with_accumulation(tiny_bert, toy_files, tmp_path):
    # 100 rows in batches of 8 = 13 batches; accumulating 3 gives 5 optimizer steps per epoch
    # (the last one from a partial accumulation), 10 in all, 4 of them warmup.
    state = train_classifier.main(
        argv(
            tiny_bert,
            *toy_files,
            tmp_path,
            "--max_train_samples",
            100,
            "--per_device_train_batch_size",
            8,
            "--gradient_accumulation_steps",
            3,
            "--num_train_epochs",
            2,
            "--num_warmup_steps",
            4,
            "--logging_steps",
            1,
            "--learning_rate",
            "1e-3",
        )
    )
    assert state.completed_steps == 10
    lrs = {e["step"]: e["learning_rate"] for e in state.log_history if "learning_rate" in e}
    expected = {s: 1e-3 * (s / 4 if s < 4 else (10 - s) / 6) for s in range(1, 11)}
    assert lrs == pytest.approx(expected)


def test_training_steps_arithmetic():
    class A:
        gradient_accumulation_steps, num_train_epochs, max_train_steps = 4, 3, None

    ten_batches = type("Batches", (list,), {"dataset": list(range(80))})(range(10))  # 10 batches
    one_process = SimpleNamespace(num_processes=1)
    assert tuple(common.count_steps(A, one_process, ten_batches)) == (3, 9, 3)  # ceil(10 / 4) = 3 steps per epoch
    A.max_train_steps = 7
    assert tuple(common.count_steps(A, one_process, ten_batches)) == (3, 7, 3)


def test_two_processes_train_and_evaluate_like_one(tiny_bert, toy_files, tmp_path):
    """2 processes x 16 x 3 accumulated, and 1 process x 16 x 6: the same global batch of 96, so
    the same examples in each optimizer step, and (dropout off: each process would draw its own
    masks) the same weights, up to the order of floating-point sums. Then the model evaluated on
    1 and on 2 processes: 30 examples in batches of 7 do not split evenly (the second process
    pads its last batch), and the metrics must not notice."""
    from safetensors.torch import load_file

    model = helpers.without_dropout(tiny_bert, tmp_path / "bert")
    two, one = tmp_path / "two", tmp_path / "one"
    runs = [
        {"script": "train_classifier", "argv": argv(model, *toy_files, two, "--num_train_epochs", 2,
                                                     "--gradient_accumulation_steps", 3)},
        {"script": "train_classifier", "argv": argv(two / "best", *toy_files, tmp_path / "eval2", "--eval_only")},
    ]  # fmt: skip
    for run in runs:
        run["engine"] = "ddp"
    assert helpers.launch(runs, tmp_path / "logs", nproc=2) == [0, 0], helpers.log_of(runs[0])[-2000:]
    assert "16 per device x 3 accumulated x 2 process(es)" in helpers.log_of(runs[0])
    # 400 rows padded to 480, 5 global batches of 96 an epoch.
    state = newest_state(two)
    assert state["completed_steps"] == 10
    assert [e["learning_rate"] for e in state["log_history"] if "learning_rate" in e][-1] == 0.0
    assert {p.name for p in checkpoints(two)[-1].glob("random_states_*")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }

    train_classifier.main(argv(model, *toy_files, one, "--num_train_epochs", 2, "--gradient_accumulation_steps", 6))
    a, b = (load_file(checkpoints(o)[-1] / "model.safetensors") for o in (one, two))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)

    metrics = train_classifier.main(argv(two / "best", *toy_files, tmp_path / "eval1", "--eval_only"))
    assert json.loads((tmp_path / "eval2" / "eval_results.json").read_text()) == pytest.approx(metrics, rel=1e-6)
    assert metrics["accuracy"] == json.loads((two / "eval_results.json").read_text())["accuracy"]


# ---------------------------------------------------------------------------
# Bad input: one line, exit code 2, no traceback, and the existing checkpoint untouched.
# ---------------------------------------------------------------------------


def bad_input(tmp_path, toy_files):
    """name -> (train file, validation file, words the message must contain)"""
    train, dev = toy_files
    d = tmp_path

    def write(name, text):
        (d / name).write_text(text)
        return d / name

    return {
        "missing file": (d / "nope.csv", dev, ["not found", "nope.csv"]),
        "directory": (d, dev, ["not a file"]),
        "extension": (write("train.xlsx", "x"), dev, ["unsupported extension", ".xlsx"]),
        "columns": (write("cols.csv", "sentence,target\na,b\nc,d\n"), dev, ["--label_column", "sentence", "target"]),
        "no label": (write("nolabel.csv", "text,y\na,b\n"), dev, ["'label'"]),
        "empty": (write("empty.csv", "text,label\n"), dev, ["empty"]),
        "unseen labels": (
            train,
            write("dev.csv", "text,label\nw1 good,pos\nw2 meh,neutral\n"),
            ["never seen", "neutral"],
        ),
        "blank label": (
            write("blank.csv", "text,label\nw1 good,pos\nw2 bad,\nw3 bad,neg\n"),
            dev,
            ["empty label", "row 2"],
        ),
        "unparsable": (write("broken.csv", "text,label\nw1 good,pos\nw2,bad,neg,x\n"), dev, ["could not be parsed"]),
    }


CASES = [
    "missing file",
    "directory",
    "extension",
    "columns",
    "no label",
    "empty",
    "unseen labels",
    "blank label",
    "unparsable",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_one_line_and_keeps_checkpoint(case, trained, tiny_bert, toy_files, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = digest(out)
    train, dev, words = bad_input(tmp_path, toy_files)[case]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_classifier.main(argv(tiny_bert, train, dev, out))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.strip().endswith(errors[0]), err
    for word in words:
        assert word in errors[0]
    assert digest(out) == before


def test_bad_input_from_the_command_line_has_no_traceback(tiny_bert, toy_files, tmp_path):
    proc = helpers.run_script(
        "train_classifier.py", *argv(tiny_bert, tmp_path / "missing.tsv", toy_files[1], tmp_path / "out"), check=False
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: file not found")


def test_changed_settings_refuse_to_resume(trained, tiny_bert, toy_files, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = digest(out)
    for flag, value, change in (
        ("--learning_rate", "1e-3", "learning_rate: 0.003 -> 0.001"),  # any setting that changes what is learned
        ("--per_device_train_batch_size", 8, "per_device_train_batch_size: 16 -> 8"),  # or the global batch
    ):
        with pytest.raises(SystemExit) as stop:
            train_classifier.main(argv(tiny_bert, *toy_files, out, flag, value, "--num_train_epochs", 5))
        err = capsys.readouterr().err
        assert stop.value.code == 2 and change in err and "--no_resume" in err, err
    assert digest(out) == before


def test_tsv_pairs_and_integer_labels(tiny_bert, tmp_path, capsys):
    rows = helpers.toy_rows(60, seed=5, pair=True)
    for i, r in enumerate(rows):
        r["label"] = 1 if r["label"] == "pos" else 0
        r["sentence1"] = 'he said "hi' + r["sentence1"]  # a stray quote, as in MRPC
        if i % 10 == 3:
            r["sentence2"] = '"' + r["sentence2"]  # one that starts a field: quoting would read on to the end
    train = helpers.write_csv(tmp_path / "train.tsv", rows[:50], delimiter="\t")
    dev = helpers.write_csv(tmp_path / "dev.tsv", rows[50:], delimiter="\t")
    # csv.DictWriter quoted the fields with quotes in them; write them raw, as GLUE does.
    for path, part in ((train, rows[:50]), (dev, rows[50:])):
        lines = ["sentence1\tsentence2\tlabel"] + [f"{r['sentence1']}\t{r['sentence2']}\t{r['label']}" for r in part]
        path.write_text("\n".join(lines) + "\n")
    train_classifier.main(argv(tiny_bert, train, dev, tmp_path / "out", "--num_train_epochs", 1))
    # Every row read (a quote-aware reader would run rows together at the stray quotes), both
    # sentences as the pair.
    assert "Data: 50 training and 10 validation rows; text 'sentence1' + 'sentence2', label 'label'" in (
        capsys.readouterr().out
    )
    config = json.loads((tmp_path / "out" / "best" / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1"}
    assert math.isfinite(json.loads((tmp_path / "out" / "eval_results.json").read_text())["loss"])


def test_early_stopping_and_tensorboard(tiny_bert, toy_files, tmp_path, capsys):
    # A learning rate of 0 never improves the validation loss: patience 1 stops after the second
    # evaluation.
    args = argv(
        tiny_bert,
        *toy_files,
        tmp_path,
        "--learning_rate",
        0,
        "--metric_for_best_model",
        "loss",
        "--early_stopping_patience",
        1,
        "--report_to",
        "tensorboard",
    )
    state = train_classifier.main(args)
    assert state.stopped_early and state.epoch == 2 and state.best_step == 25
    assert "stopping early" in capsys.readouterr().out
    # TensorBoard got the curves (not only the empty file its writer makes at the start).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "train_classifier")).Reload()
    assert [e.step for e in events.Scalars("eval_loss")] == [25, 50]
    assert [e.step for e in events.Scalars("train_loss")] == list(range(5, 51, 5))
    # Every checkpoint holds the training time so far, not the time when best/ was last exported:
    # the one at step 50 (no improvement since step 25) counts the second epoch too.
    seconds = {}
    for step in (25, 50):
        saved = json.loads((tmp_path / "checkpoints" / f"step_{step:08d}" / "training_state.json").read_text())
        seconds[step] = saved["state"]["train_seconds"]
    assert seconds[50] > seconds[25] > 0
    assert train_classifier.main(args).completed_steps == 50  # stopped runs stay stopped


def test_drive_outside_colab_says_so(tiny_bert, toy_files, capsys):
    with pytest.raises(SystemExit):
        train_classifier.main(argv(tiny_bert, *toy_files, "unused", "--drive"))
    assert "only inside Google Colab" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Finishing the job: the Hub, and a batch size that fits.
# ---------------------------------------------------------------------------


class FakeHub:
    """huggingface_hub.HfApi as common.py calls it, without a network: it records the calls, and
    the one named in `fail` raises what the Hub would."""

    calls, fail = [], None

    def __init__(self, token=None):
        self.token = token

    def whoami(self):
        return self.record("whoami") or {"name": "me"}

    def create_repo(self, repo, private=False, exist_ok=False):
        self.record("create_repo", repo, private)

    def upload_folder(self, repo_id, folder_path, commit_message):
        self.record("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir()))

    def record(self, name, *details):
        if FakeHub.fail == name:
            import requests
            from huggingface_hub.errors import HfHubHTTPError

            response = requests.Response()
            response.status_code = 403 if name == "create_repo" else 503
            raise HfHubHTTPError(f"{response.status_code} the Hub says no", response=response)
        FakeHub.calls.append((name, *details))


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(export.huggingface_hub, "HfApi", FakeHub)
    FakeHub.calls, FakeHub.fail = [], None
    return FakeHub


def test_push_to_hub_uploads_best_with_its_card_and_retries_only_a_failed_upload(
    fake_hub, tiny_bert, toy_files, tmp_path, capsys
):
    out = tmp_path / "my-model"
    args = argv(tiny_bert, *toy_files, out, "--max_train_steps", 3, "--push_to_hub", "--hub_private_repo")
    fake_hub.fail = "upload_folder"
    with pytest.raises(SystemExit) as stop:
        train_classifier.main(args)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and "uploading" in line and "run the same command again" in line, line
    assert fake_hub.calls[:2] == [("whoami",), ("create_repo", "me/my-model", True)]  # at the start, before training
    assert not [call for call in fake_hub.calls if call[0] == "upload_folder"]
    weights = (out / "best" / "model.safetensors").read_bytes()  # the local model is whole

    fake_hub.fail = None
    state = train_classifier.main(args)
    assert "already finished" in capsys.readouterr().out and state.completed_steps == 3  # no training again
    name, repo, files = fake_hub.calls[-1]
    assert (name, repo) == ("upload_folder", "me/my-model") and {"README.md", "loss.png", "model.safetensors"} <= set(
        files
    )
    assert (out / "best" / "model.safetensors").read_bytes() == weights


def test_push_to_hub_is_refused_before_anything_when_it_cannot_happen(fake_hub, tiny_bert, toy_files, tmp_path, capsys):
    for fail, words in (("create_repo", ["may not write there", "--hub_token"]), ("whoami", ["--push_to_hub"])):
        fake_hub.fail, out = fail, tmp_path / fail
        with pytest.raises(SystemExit) as stop:
            train_classifier.main(argv(tiny_bert, *toy_files, out, "--push_to_hub"))
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert stop.value.code == 2 and all(word in line for word in words), line
        assert not out.exists()  # nothing loaded, nothing written


def test_push_to_hub_offline_says_so(tiny_bert, toy_files, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_classifier.main(argv(tiny_bert, *toy_files, tmp_path / "run", "--push_to_hub"))
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_auto_find_batch_size_halves_the_batch_keeps_the_global_one_and_remembers_it(
    tiny_bert, toy_files, tmp_path, monkeypatch, capsys
):
    """A GPU that holds 4 examples at a time (out of memory above, once the third step has
    begun): the run started with 16 x 1 goes on from its checkpoint at step 2 as 4 x 4, and ends
    where 16 x 1 would have (dropout off: the masks depend on how the batch is split)."""
    from safetensors.torch import load_file
    from transformers import BertForSequenceClassification

    model = helpers.without_dropout(tiny_bert, tmp_path / "bert")
    base = ["--max_train_steps", 6, "--checkpointing_steps", 2, "--keep_last", 10]
    train_classifier.main(argv(model, *toy_files, tmp_path / "fits", *base))
    forward, steps = BertForSequenceClassification.forward, []

    def small_gpu(self, **batch):
        if not self.training:  # (evaluation batches are the eval batch size's business)
            return forward(self, **batch)
        steps.append(len(batch["input_ids"]))
        if len(batch["input_ids"]) > 4 and len(steps) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, **batch)

    monkeypatch.setattr(BertForSequenceClassification, "forward", small_gpu)
    out = tmp_path / "small"
    state = train_classifier.main(argv(model, *toy_files, out, *base, "--auto_find_batch_size"))
    printed = capsys.readouterr().out
    assert "per-device batch 8 x 2 accumulated" in printed and "per-device batch 4 x 4 accumulated" in printed
    assert "Resumed from" in printed and "step 2," in printed.split("Resumed from")[-1].splitlines()[0]
    assert state.completed_steps == 6
    a, b = (load_file(checkpoints(o)[-1] / "model.safetensors") for o in (out, tmp_path / "fits"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)
    assert json.loads((out / "batch_size.json").read_text())["per_device_train_batch_size"] == 4
    steps.clear()
    train_classifier.main(argv(model, *toy_files, out, *base, "--auto_find_batch_size", "--max_train_steps", 7))
    assert "a per-device batch of 4 fits: starting with it" in capsys.readouterr().out and max(steps) == 4


def out_of_memory_above(monkeypatch, examples, after_steps=0, training=True):
    """A GPU that holds `examples` examples at a time, in training (or evaluation) batches, once
    `after_steps` training batches have run."""
    from transformers import BertForSequenceClassification

    forward, steps = BertForSequenceClassification.forward, []

    def small_gpu(self, **batch):
        if self.training:
            steps.append(len(batch["input_ids"]))
        if self.training == training and len(batch["input_ids"]) > examples and len(steps) > after_steps:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, **batch)

    monkeypatch.setattr(BertForSequenceClassification, "forward", small_gpu)
    return steps


def test_auto_find_batch_size_retries_from_the_checkpoints_under_no_resume(
    tiny_bert, toy_files, tmp_path, monkeypatch, capsys
):
    """--no_resume clears the folder for the run, not for each retry of it: the retry after an
    out-of-memory goes on from the checkpoints that the first try saved."""
    out_of_memory_above(monkeypatch, 8, after_steps=2)
    args = ["--max_train_steps", 4, "--checkpointing_steps", 2, "--auto_find_batch_size", "--no_resume"]
    state = train_classifier.main(argv(tiny_bert, *toy_files, tmp_path / "run", *args))
    printed = capsys.readouterr().out
    assert "per-device batch 8 x 2 accumulated" in printed
    assert "Resumed from" in printed.split("per-device batch 8 x 2")[-1] and state.completed_steps == 4


def test_out_of_memory_in_evaluation_names_the_eval_batch_and_keeps_the_training_batch(
    tiny_bert, toy_files, tmp_path, monkeypatch, capsys
):
    """Evaluation has a batch size of its own: running out of memory there must not shrink the
    training batch (nor retrain from a checkpoint); it says which flag to lower, and the last
    step's checkpoint is kept for the re-run."""
    out_of_memory_above(monkeypatch, 4, training=False)
    out = tmp_path / "run"
    args = ["--max_train_steps", 2, "--checkpointing_steps", 2, "--auto_find_batch_size"]
    with pytest.raises(SystemExit) as info:
        train_classifier.main(argv(tiny_bert, *toy_files, out, *args))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "out of memory while evaluating: pass a smaller --per_device_eval_batch_size" in err
    assert not (out / "batch_size.json").exists()
    assert json.loads((checkpoints(out)[-1] / checkpoint_files.STATE_FILE).read_text())["state"]["completed_steps"] == 2
    monkeypatch.undo()
    state = train_classifier.main(argv(tiny_bert, *toy_files, out, *args, "--per_device_eval_batch_size", 4))
    assert state.evaluated_step == 2 and (out / "best" / "model.safetensors").exists()


def test_a_checkpoint_saved_without_fp16_resumes_in_fp16(tiny_bert, toy_files, tmp_path, monkeypatch, capsys):
    """auto precision is bf16 on an A100 and fp16 on a T4: a Colab user who gets a T4 after an
    A100 resumes with a fresh loss scaler, not with "pass --no_resume". (A CPU has no fp16 scaler:
    the Accelerator is given the GPU's, a GradScaler on the CPU.)"""
    out = tmp_path / "run"
    train_classifier.main(argv(tiny_bert, *toy_files, out, "--max_train_steps", 2, "--mixed_precision", "bf16"))
    assert not (checkpoints(out)[-1] / "scaler.pt").exists()

    class GPUAccelerator(common.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.mixed_precision == "fp16":
                self.scaler = torch.amp.GradScaler("cpu")

    monkeypatch.setattr(common, "Accelerator", GPUAccelerator)
    state = train_classifier.main(argv(tiny_bert, *toy_files, out, "--max_train_steps", 4, "--mixed_precision", "fp16"))
    printed = capsys.readouterr().out
    assert "Resumed from" in printed and "the loss scale starts afresh" in printed
    assert state.completed_steps == 4 and (checkpoints(out)[-1] / "scaler.pt").exists()
