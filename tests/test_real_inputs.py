"""Real inputs work the first time: every GLUE task's files as GLUE's download script writes them
and as the hub has them, other layouts through --text_columns and --label_column, regression,
small corpora, and resume settings that cannot change silently. The fixtures have the exact shape
of the real files (helpers.py)."""

import json
import shutil

import helpers
import pytest
import torch
import transformers
from scipy.stats import pearsonr, spearmanr
from test_train_classifier import argv, checkpoints
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import train_classifier
from machinery import checkpoint_files

# task -> (text columns found, label column found, label names; None for regression)
GLUE_FILES = {
    "cola": (["column4"], "column2", ["0", "1"]),
    "sst2": (["sentence"], "label", ["0", "1"]),
    "mrpc": (["#1 String", "#2 String"], "Quality", ["0", "1"]),
    "qqp": (["question1", "question2"], "is_duplicate", ["0", "1"]),
    "stsb": (["sentence1", "sentence2"], "score", None),
    "mnli": (["sentence1", "sentence2"], "gold_label", ["contradiction", "entailment", "neutral"]),
    "qnli": (["question", "sentence"], "label", ["entailment", "not_entailment"]),
    "rte": (["sentence1", "sentence2"], "label", ["entailment", "not_entailment"]),
    "wnli": (["sentence1", "sentence2"], "label", ["0", "1"]),
}


def load(*args):
    return train_classifier.load_data(train_classifier.parse_args([str(a) for a in args]))


@pytest.mark.parametrize("task", GLUE_FILES)
def test_every_glue_file_is_read_as_glue_writes_it(task, tmp_path, capsys):
    train_file, dev_file = helpers.write_glue_task(task, tmp_path)
    train, dev, columns, label, names = load("--train_file", train_file, "--validation_file", dev_file)
    assert (columns, label, names) == GLUE_FILES[task]
    assert len(dev) == 40
    assert len(train) == 200  # QQP: the broken row's two halves are dropped, and said so
    if task == "qqp":
        assert "skipped 2 broken row(s)" in capsys.readouterr().out
    raw = [line.split("\t") for line in helpers.glue_file_lines(task, 200, 1) if "\t" in line]
    if task != "cola":
        raw = raw[1:]  # the header
    raw = [r for r in raw if len(r) > 4 or task in ("cola", "sst2", "qnli", "rte", "wnli")]
    if task == "qqp":
        raw = [r for r in raw if r[0] != "9999"]
    # Every sentence comes through as written, quotes and "NA" included; labels as ids or floats.
    text_index = {"cola": [3], "sst2": [0], "mrpc": [3, 4], "qqp": [3, 4], "stsb": [7, 8], "mnli": [8, 9]}
    text_index |= {"qnli": [1, 2], "rte": [1, 2], "wnli": [1, 2]}
    for c, i in zip(columns, text_index[task]):
        assert train[c] == [r[i] for r in raw]
    label_index = {"cola": 1, "sst2": 1, "mrpc": 0}.get(task, -1)
    if names is None:
        assert train["label"] == pytest.approx([float(r[label_index]) for r in raw])
    else:
        assert [names[i] for i in train["label"]] == [r[label_index] for r in raw]


@pytest.mark.parametrize("task", helpers.GLUE_HUB)
def test_every_glue_task_from_the_hub(task, tmp_path):
    hub = helpers.glue_hub_dataset(task)
    hub.save_to_disk(tmp_path / "glue")  # what load_dataset("nyu-mll/glue", task) gives, offline
    train, dev, columns, label, names = load("--dataset_name", tmp_path / "glue", "--dataset_config_name", task)
    hub_columns, hub_names = helpers.GLUE_HUB[task]
    assert (columns, label, names) == (hub_columns, "label", hub_names)
    assert len(train) == 200 and len(dev) == 40  # MNLI: validation_matched
    validation = hub["validation_matched" if task == "mnli" else "validation"]
    assert dev[columns[0]] == validation[columns[0]] and dev["label"] == pytest.approx(validation["label"])


def test_a_hub_set_without_validation_gets_one_split_off(tmp_path):
    hub = helpers.glue_hub_dataset("sst2")
    del hub["validation"]
    hub.save_to_disk(tmp_path / "sst2")
    train, dev, *_ = load("--dataset_name", tmp_path / "sst2", "--validation_split_percentage", 10)
    assert (len(train), len(dev)) == (180, 20)
    assert not set(train["sentence"]) & set(dev["sentence"]) - set(train["sentence"][:0])


def test_mrpc_as_glue_ships_it_trains_and_exports_its_labels(tiny_bert, tmp_path):
    train_file, dev_file = helpers.write_glue_task("mrpc", tmp_path / "MRPC", n_train=300)
    out = tmp_path / "out"
    train_classifier.main(argv(tiny_bert, train_file, dev_file, out, "--num_train_epochs", 6))
    results = json.loads((out / "eval_results.json").read_text())
    assert results["accuracy"] >= 0.9  # the label follows a cue word; chance is about 0.5
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1"}


def test_stsb_scores_train_a_regression_model_reported_by_pearson(tiny_bert, tmp_path):
    train_file, dev_file = helpers.write_glue_task("stsb", tmp_path / "STS-B", n_train=300)
    out = tmp_path / "out"
    train_classifier.main(argv(tiny_bert, train_file, dev_file, out, "--num_train_epochs", 10))
    results = json.loads((out / "eval_results.json").read_text())
    history = json.loads((out / "log_history.json").read_text())
    evals = [e for e in history if "eval_pearsonr" in e]
    assert len(evals) == 10 and {"eval_loss", "eval_spearmanr"} <= set(evals[0])
    best = max(evals, key=lambda e: e["eval_pearsonr"])  # best/ is chosen by Pearson
    assert results["step"] == best["step"] and results["pearsonr"] > 0.8

    # The reported numbers are those of the exported model, computed by hand.
    model_dir = out / "best"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [line.split("\t") for line in dev_file.read_text().splitlines()[1:]]
    with torch.no_grad():
        predictions = [model(**tokenizer(r[7], r[8], return_tensors="pt")).logits[0, 0].item() for r in rows]
    scores = [float(r[9]) for r in rows]
    assert results["pearsonr"] == pytest.approx(pearsonr(scores, predictions)[0], abs=1e-5)
    assert results["spearmanr"] == pytest.approx(spearmanr(scores, predictions)[0], abs=1e-5)
    mse = sum((p - s) ** 2 for p, s in zip(predictions, scores)) / len(rows)
    assert results["loss"] == pytest.approx(mse, rel=1e-4)


def test_cola_without_a_header_trains(tiny_bert, tmp_path, capsys):
    train_file, dev_file = helpers.write_glue_task("cola", tmp_path / "CoLA")
    state = train_classifier.main(argv(tiny_bert, train_file, dev_file, tmp_path / "out", "--max_train_steps", 3))
    assert state.completed_steps == 3
    assert "text 'column4', label 'column2'" in capsys.readouterr().out


def test_integer_valued_float_labels_stay_classification(tiny_bert, tmp_path):
    rows = helpers.toy_rows(60, seed=3)
    for r in rows:
        r["label"] = "1.0" if r["label"] == "pos" else "0.0"
    path = helpers.write_csv(tmp_path / "floats.csv", rows)
    *_, names = load("--train_file", path)
    assert names == ["0", "1"]


# ---------------------------------------------------------------------------
# Any other layout: --text_columns / --label_column, and Hugging Face's rule made safer.
# ---------------------------------------------------------------------------


def write_reviews(path, extra_columns):
    rows = []
    for r in helpers.toy_rows(60, seed=4):
        rows.append({"review_id": f"r{len(rows)}", **extra_columns, "review": r["text"], "sentiment": r["label"]})
    return helpers.write_csv(path, rows)


def test_column_flags_pick_any_layout(tiny_bert, tmp_path):
    path = write_reviews(tmp_path / "reviews.csv", {"author": "someone"})
    train, dev, columns, label, names = load(
        "--train_file", path, "--text_columns", "review", "--label_column", "sentiment"
    )
    assert (columns, label, names) == (["review"], "sentiment", ["neg", "pos"])
    state = train_classifier.main(
        argv(tiny_bert, path, path, tmp_path / "out", "--text_columns", "review", "--label_column", "sentiment")
        + ["--max_train_steps", "2"]
    )
    assert state.completed_steps == 2


def test_without_flags_the_one_or_two_text_columns_are_found(tmp_path):
    # Hugging Face's rule takes the first two columns that are not the label: here an id
    # and the text. Ours skips ids and numbers.
    rows = [
        {"id": str(i), "title": r["text"], "year": "2024", "label": r["label"]}
        for i, r in enumerate(helpers.toy_rows(30, 6))
    ]
    path = helpers.write_csv(tmp_path / "titles.csv", rows)
    assert load("--train_file", path)[2:4] == (["title"], "label")
    pairs = [{"question": r["text"], "answer": r["text"][::-1], "label": r["label"]} for r in helpers.toy_rows(30, 7)]
    assert load("--train_file", helpers.write_csv(tmp_path / "qa.csv", pairs))[2:4] == (["question", "answer"], "label")


@pytest.mark.parametrize(
    "extra, words",
    [
        ([], ["no label column", "'label'", "review", "sentiment", "--label_column"]),
        (
            ["--label_column", "sentiment", "--text_columns", "body"],
            ["--text_columns body", "no such column", "review"],
        ),
        (["--label_column", "stars"], ["--label_column stars", "no such column", "sentiment"]),
    ],
)
def test_refusals_name_the_columns_and_the_flag(extra, words, tiny_bert, tmp_path, capsys):
    path = write_reviews(tmp_path / "reviews.csv", {"author": "someone", "country": "here"})
    with pytest.raises(SystemExit) as info:
        train_classifier.main(argv(tiny_bert, path, path, tmp_path / "out", *extra))
    assert info.value.code == 2
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")][0]
    for word in words:
        assert word in line, line


def test_too_many_text_columns_ask_for_the_flag(tiny_bert, tmp_path, capsys):
    path = write_reviews(tmp_path / "reviews.csv", {"author": "someone", "country": "here"})
    with pytest.raises(SystemExit):
        train_classifier.main(argv(tiny_bert, path, path, tmp_path / "out", "--label_column", "sentiment"))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "['review_id', 'author', 'country', 'review', 'sentiment']" in line and "--text_columns" in line


def test_truncation_is_reported_once_as_a_share(tiny_bert, toy_files, tmp_path, capsys):
    train_classifier.main(argv(tiny_bert, *toy_files, tmp_path / "out", "--max_seq_length", 8, "--max_train_steps", 1))
    out = capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    lengths = [len(tokenizer(r["text"])["input_ids"]) for r in helpers.toy_rows(400, seed=1)]
    cut = sum(n > 8 for n in lengths)
    assert 0 < cut < 400
    assert out.count("--max_seq_length 8 truncates") == 1
    assert f"truncates {cut:,} of 400 training ({cut / 400:.1%})" in out


# ---------------------------------------------------------------------------
# Resume settings: what changes training is refused, what does not is allowed.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_run(tiny_bert, toy_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("short") / "run"
    train_classifier.main(argv(tiny_bert, *toy_files, out, "--num_train_epochs", 1))
    return out


REFUSED = {
    "--learning_rate": "1e-3",
    "--lr_scheduler_type": "cosine",
    "--num_warmup_steps": "5",
    "--weight_decay": "0.01",
    "--pad_to_max_length": None,
    "--validation_split_percentage": "20",
    "--max_grad_norm": "0.5",
    "--metric_for_best_model": "f1",
    "--text_columns": "text",
    "--label_column": "label",
}


@pytest.mark.parametrize("flag", REFUSED)
def test_a_setting_that_changes_training_is_refused_on_resume(flag, short_run, tiny_bert, toy_files, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(short_run, out)
    before = helpers.digest(out)
    extra = [flag] + ([REFUSED[flag]] if REFUSED[flag] else [])
    with pytest.raises(SystemExit) as info:
        train_classifier.main(argv(tiny_bert, *toy_files, out, "--num_train_epochs", 2, *extra))
    assert info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{flag[2:]}: " in line and "--no_resume" in line, line
    assert helpers.digest(out) == before


def test_another_validation_file_is_refused_and_harmless_changes_continue(
    short_run, tiny_bert, toy_files, tmp_path, capsys
):
    out = tmp_path / "run"
    shutil.copytree(short_run, out)
    other = tmp_path / "other-dev.csv"
    shutil.copy(toy_files[1], other)
    with pytest.raises(SystemExit):
        train_classifier.main(argv(tiny_bert, toy_files[0], other, out, "--num_train_epochs", 2))
    assert "validation_file: " in capsys.readouterr().err
    harmless = ["--num_train_epochs", 2, "--logging_steps", 3, "--save_every_minutes", 5, "--keep_last", 1]
    harmless += ["--per_device_eval_batch_size", 4, "--early_stopping_patience", 2, "--report_to", "none"]
    state = train_classifier.main(argv(tiny_bert, *toy_files, out, *harmless))
    assert state.epoch == 2 and len(checkpoints(out)) == 1


def test_the_readme_lists_what_may_change_on_resume():
    """The resume table in docs/flags.md (which the README links) names exactly the flags the code
    lets change."""
    flags = (helpers.REPO / "docs" / "flags.md").read_text()
    section = flags.split("## What may change when a run resumes")[1]
    table = next(block for block in section.split("\n\n") if block.startswith("|"))
    cells = [row.split("|")[1] for row in table.splitlines()[2:]]
    may = {flag.strip(" `-") for cell in cells for flag in cell.split(",")}
    expected = set(checkpoint_files.MAY_CHANGE_ON_RESUME) | {
        "early_stopping_patience",
        "do_predict",
        "fill_mask_prompt",
    }
    expected |= {"prompt", "max_new_tokens", "top_k", "top_p", "temperature", "archive"}
    assert may == expected


# ---------------------------------------------------------------------------
# Predictions for test sets: GLUE's test files as its download script writes them, and the hub's
# test splits.
# ---------------------------------------------------------------------------

TEST_TEXT = {"cola": [1], "mrpc": [3, 4], "stsb": [7, 8], "mnli": [8, 9], "qqp": [1, 2]}


@torch.no_grad()
def predicted_by_hand(model_dir, test_file, text_index):
    """Each test row through the exported model, one at a time: its label name, or its score."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [line.split("\t") for line in test_file.read_text(encoding="utf-8").splitlines()[1:]]
    predictions = []
    for row in rows:
        logits = model(**tokenizer(*(row[i] for i in text_index), truncation=True, return_tensors="pt")).logits[0]
        regression = model.config.problem_type == "regression"
        predictions.append(logits[0].item() if regression else model.config.id2label[int(logits.argmax())])
    return [row[0] for row in rows], predictions


@pytest.mark.parametrize("task", TEST_TEXT)
def test_predictions_for_glue_test_files_in_glues_submission_layout(task, tiny_bert, tmp_path):
    train_file, dev_file = helpers.write_glue_task(task, tmp_path / task, n_train=60, n_dev=20)
    test_file = helpers.write_glue_test(task, tmp_path / task, n=25)
    out = tmp_path / "out"
    train_classifier.main(argv(tiny_bert, train_file, dev_file, out, "--max_train_steps", 2, "--test_file", test_file))
    lines = (out / "predictions.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 26
    index, predictions = zip(*(line.split("\t") for line in lines[1:]))
    by_hand = predicted_by_hand(out / "best", test_file, TEST_TEXT[task])
    assert list(index) == by_hand[0] == [str(i) for i in range(25)]  # file order, GLUE's own index
    if GLUE_FILES[task][2] is None:  # STS-B: a score
        assert [float(p) for p in predictions] == pytest.approx(by_hand[1], abs=1e-3)
    else:  # the label names as the training data spells them
        assert list(predictions) == by_hand[1] and set(predictions) <= set(GLUE_FILES[task][2])


def test_eval_only_predicts_and_the_hub_test_split_too(tiny_bert, tmp_path):
    """The hub's MRPC names its labels (`equivalent`); GLUE's submissions, like its files, take
    0 and 1: predictions.tsv has the numbers."""
    hub = helpers.glue_hub_dataset("mrpc")
    hub.save_to_disk(tmp_path / "mrpc")
    data = ["--dataset_name", tmp_path / "mrpc", "--output_dir", tmp_path / "trained", "--max_train_steps", 2]
    train_classifier.main([str(a) for a in ["--model_name_or_path", tiny_bert, *data, "--do_predict"]])
    rows = (tmp_path / "trained" / "predictions.tsv").read_text().splitlines()
    assert rows[0] == "index\tprediction" and [r.split("\t")[0] for r in rows[1:]] == [str(i) for i in range(10)]
    assert {r.split("\t")[1] for r in rows[1:]} <= {"0", "1"}
    # --eval_only on best/: the same predictions, without training
    best = tmp_path / "trained" / "best"
    out = tmp_path / "again"
    train_classifier.main([str(a) for a in [*data[:2], "--model_name_or_path", best, "--output_dir", out, "--eval_only",
                                            "--do_predict"]])  # fmt: skip
    assert (out / "predictions.tsv").read_text() == (tmp_path / "trained" / "predictions.tsv").read_text()
    assert not (out / "checkpoints").exists()


def test_a_test_set_that_cannot_be_predicted_is_refused_before_training(tiny_bert, tmp_path, capsys):
    train_file, dev_file = helpers.write_glue_task("mrpc", tmp_path / "MRPC", n_train=60, n_dev=20)
    no_text = tmp_path / "test.tsv"
    no_text.write_text("index\t#1 ID\t#2 ID\n0\t1\t2\n")  # the sentences are missing
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        train_classifier.main(argv(tiny_bert, train_file, dev_file, out, "--test_file", no_text))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "error: " in err and "Traceback" not in err
    assert "test" in err.splitlines()[-1] and "--text_columns" in err.splitlines()[-1]
    assert not (out / "checkpoints").exists()
    hub = helpers.glue_hub_dataset("rte")
    del hub["test"]
    hub.save_to_disk(tmp_path / "rte")
    with pytest.raises(SystemExit):
        train_classifier.main([str(a) for a in ["--model_name_or_path", tiny_bert, "--dataset_name", tmp_path / "rte",
                                                "--output_dir", out, "--do_predict"]])  # fmt: skip
    assert "has no 'test' split" in capsys.readouterr().err


def test_eval_only_predicts_with_the_model_it_evaluated(tiny_bert, tmp_path):
    """--eval_only on a base model (tiny_bert's config has two labels and no problem_type) for
    STS-B: the predictions are the scores of the regression model just evaluated (its head exists
    only in memory), not labels of the folder's two-label model, nor a sigmoid of the score."""
    train_file, dev_file = helpers.write_glue_task("stsb", tmp_path / "stsb", n_train=60, n_dev=20)
    test_file = helpers.write_glue_test("stsb", tmp_path / "stsb", n=25)
    out = tmp_path / "out"
    train_classifier.main(argv(tiny_bert, train_file, dev_file, out, "--eval_only", "--test_file", test_file))
    rows = [line.split("\t") for line in (out / "predictions.tsv").read_text().splitlines()[1:]]
    scores = [float(prediction) for _, prediction in rows]  # a score, never a label such as LABEL_0
    transformers.set_seed(42)  # as the run's setup() did before it loaded the model (--seed 42)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=1, problem_type="regression")
    model.save_pretrained(tmp_path / "evaluated")
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(tmp_path / "evaluated")
    by_hand = predicted_by_hand(tmp_path / "evaluated", test_file, TEST_TEXT["stsb"])[1]
    assert scores == pytest.approx(by_hand, abs=1e-3)


@pytest.mark.parametrize("task", [task for task, (_, names) in helpers.GLUE_HUB.items() if names])
def test_hub_glue_predictions_are_spelled_as_glue_submissions_take_them(task):
    """CoLA, SST-2, MRPC, QQP and WNLI take numbers, as GLUE's files spell them; MNLI, QNLI and
    RTE take the names. A local file's labels stay as the file spells them, whatever they are."""
    from argparse import Namespace

    from transformers import BertConfig

    from machinery.columns import submission_labels

    names = helpers.GLUE_HUB[task][1]
    config = BertConfig(id2label=dict(enumerate(names)), label2id={name: i for i, name in enumerate(names)})
    hub, local = (
        Namespace(dataset_name="nyu-mll/glue", train_file=None),
        Namespace(dataset_name=None, train_file="t.csv"),
    )
    spelled = [submission_labels(hub, config)[name] for name in names]
    assert spelled == (names if task in ("mnli", "qnli", "rte") else [str(i) for i in range(len(names))])
    assert [submission_labels(local, config)[name] for name in names] == names
