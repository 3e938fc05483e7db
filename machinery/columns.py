"""The classifier's data: CSV, TSV or JSON-lines files read as their writers meant (GLUE's files
without quoting, a BOM, no header row), the text and label columns found by name or by flag,
broken rows dropped and said so, labels encoded (fractions make a regression), and the test rows
checked before training.

Tests (in tests/, unless named otherwise):
- test_real_inputs.py (every GLUE file and task, column flags, refusals, the hub's GLUE predictions)
- test_train_classifier.py::test_tsv_pairs_and_integer_labels"""

import csv
import re

import datasets
from accelerate import PartialState

from machinery.data_files import input_files, load_hub_dataset, load_hub_test_split
from machinery.errors import UserError, first_line

# Text and label columns by name: the first layout whose columns are all there wins.
# GLUE's files, and GLUE on the hub.
LAYOUTS = [
    # text column(s)                label
    (("sentence1", "sentence2"), "label"),  # MRPC, RTE, WNLI, STS-B on the hub; RTE, WNLI files
    (("sentence1", "sentence2"), "gold_label"),  # MNLI files (dev_matched.tsv has label1-5 too)
    (("sentence1", "sentence2"), "score"),  # STS-B files (a float from 0 to 5: regression)
    (("#1 String", "#2 String"), "Quality"),  # MRPC files
    (("question1", "question2"), "is_duplicate"),  # QQP files
    (("question1", "question2"), "label"),  # QQP on the hub
    (("question", "sentence"), "label"),  # QNLI
    (("premise", "hypothesis"), "label"),  # MNLI on the hub
    (("sentence",), "label"),  # SST-2; CoLA on the hub
    (("text",), "label"),  # the usual CSV
    (("column4",), "column2"),  # CoLA files: no header row; source, label, original mark, sentence
]

# The hub's GLUE names the labels of these tasks, whose files and submissions spell numbers:
# CoLA, SST-2, MRPC, QQP, WNLI (MNLI, QNLI and RTE spell the names in both).
GLUE_NUMBERED_LABELS = (
    ["unacceptable", "acceptable"],
    ["negative", "positive"],
    ["not_equivalent", "equivalent"],
    ["not_duplicate", "duplicate"],
    ["not_entailment", "entailment"],
)

ID_NAME = re.compile(r"(.*[\s_#-])?(id|idx|index|guid)", re.IGNORECASE)  # never text


def load_data(args):
    """Train and validation splits with the text columns and a `label` column; the names of the
    text and label columns found; the label names (None for a regression)."""
    if args.train_file:
        train = load_local_file(args.train_file, "--train_file")
        validation = None
        if args.validation_file:
            validation = load_local_file(args.validation_file, "--validation_file")
        where = {"train": args.train_file, "validation": args.validation_file or args.train_file}
    else:
        train, validation = load_hub_dataset(args.dataset_name, args.dataset_config_name)
        where = {"train": args.dataset_name, "validation": args.dataset_name}
    if validation is None:
        if len(train) < 2:
            raise UserError(f"{where['train']} has {len(train)} rows: too few to hold out validation data")
        split = train.train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
        train, validation = split["train"], split["test"]
    columns, label = find_columns(train, args, where["train"], "train")
    if find_columns(validation, args, where["validation"], "validation") != (columns, label):
        raise UserError(f"{where['validation']}: its columns differ from the training data's; use one layout")
    train = check_rows(train, columns, label, where["train"])
    validation = check_rows(validation, columns, label, where["validation"])
    if isinstance(train.features["label"], datasets.ClassLabel):  # hub data sets name their labels
        label_names = train.features["label"].names
    else:
        train, validation, label_names = encode_labels(train, validation, where)
    if args.max_train_samples:  # quick runs
        train = train.take(args.max_train_samples)
    if args.max_eval_samples:
        validation = validation.take(args.max_eval_samples)
    text = " + ".join(repr(c) for c in columns)
    PartialState().print(
        f"Data: {len(train):,} training and {len(validation):,} validation rows; text {text}, label '{label}'"
    )
    return train, validation, columns, label, label_names


def load_local_file(pattern, flag):
    """A CSV, TSV or JSON-lines file as a `datasets.Dataset`. CSV and TSV cells are read as text
    ("NA" and "null" in a sentence stay words), under the header's names, or column1, column2,
    ... when the first row is data (GLUE's CoLA): a header has no numbers."""
    files = input_files(pattern, flag, (".csv", ".tsv", ".json", ".jsonl"))
    kind, options = "json", {}
    if files[0].lower().endswith((".csv", ".tsv")):
        # TSV files (GLUE's among them) have quote characters inside sentences: no quoting.
        delimiter, quoting = ("\t", csv.QUOTE_NONE) if files[0].lower().endswith(".tsv") else (",", csv.QUOTE_MINIMAL)
        with open(files[0], encoding="utf-8-sig", newline="") as f:  # -sig: MRPC's files start with a BOM
            first = next(csv.reader(f, delimiter=delimiter, quoting=quoting), [])
        header = not any(is_number(value) for value in first)
        names = []
        for number, value in enumerate(first, 1):
            name = value.strip() if header else ""
            names.append(name or f"column{number}")  # a nameless column is still read
        features = datasets.Features({name: datasets.Value("string") for name in names})
        kind, options = "csv", {"delimiter": delimiter, "quoting": quoting, "column_names": names, "features": features}
        options |= {"skiprows": int(header), "keep_default_na": False}
    try:
        return datasets.load_dataset(kind, data_files=files, split="train", **options)
    except Exception as err:
        cause = err.__cause__ or err
        raise UserError(
            f"{pattern}: rows could not be parsed as {kind.upper()} "
            f"({type(cause).__name__}: {first_line(cause)}); fix the file"
        ) from None


def is_number(value):
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def find_columns(data, args, where, split):
    """The text column(s) and the label column: the flags, else the first known layout, else
    Hugging Face's rule made safer (the one or two columns that hold text, not ids)."""
    found = check_columns(data, args, where, split)
    layout = find_layout(found)
    label = args.label_column or find_label(found, layout)
    if label is None:
        known = " or ".join(dict.fromkeys(repr(name) for _, name in LAYOUTS if not name.startswith("column")))
        raise UserError(f"{where}: no label column ({known}) among {found}; pass --label_column NAME")
    return find_text_columns(data, args, where, layout, label), label


def check_columns(data, args, where, split):
    """The data's column names, once it has rows and the columns that the flags name (test data
    has no label column to check)."""
    if len(data) == 0:
        raise UserError(f"{where}: the {split} data is empty; give it some rows")
    found = data.column_names
    named = {"--text_columns": args.text_columns or []}  # the columns each flag names
    if args.label_column and split != "test":  # (test data has no label)
        named["--label_column"] = [args.label_column]
    for flag, names in named.items():
        missing = [name for name in names if name not in found]
        if missing:
            raise UserError(
                f"{where}: {flag} {' '.join(missing)}: no such column in the {split} data; the columns are {found}"
            )
    return found


def find_layout(found, labelled=True):
    """The first known layout whose columns are all there, as (text columns, label column); for
    test data (labelled False), the first whose text columns are."""
    for texts, label in LAYOUTS:
        if not all(name in found for name in texts):
            continue
        if label in found or not labelled:
            return list(texts), label
    return None


def find_label(found, layout):
    """The layout's label column; without a whole layout, the first known label name among the
    columns found."""
    if layout:
        return layout[1]
    for _, label in LAYOUTS:
        if label in found:
            return label
    return None


def find_text_columns(data, args, where, layout, label=None):
    """The text column(s): --text_columns, else the layout's, else the one or two columns that
    hold text, not ids (nor the label: test data has none)."""
    if args.text_columns:
        return list(args.text_columns)
    if layout:
        return layout[0]
    found = data.column_names
    texts = text_like_columns(data, [name for name in found if name != label])
    if len(texts) not in (1, 2):
        fix = "pass --text_columns NAME [NAME2]"
        if label is not None and not args.label_column:  # the label was guessed too: it may be wrong
            fix += f" (and --label_column, '{label}' is used now)"
        raise UserError(f"{where}: cannot tell which of {found} hold the text; {fix}")
    return texts


def text_like_columns(data, candidates):
    """Hugging Face's rule made safer: the columns that hold text, not ids or numbers (in the
    first 100 rows)."""
    sample = data.select(range(min(len(data), 100)))
    return [c for c in candidates if not ID_NAME.fullmatch(c) and not all(map(is_number, sample[c]))]


def check_rows(data, columns, label, where):
    """The text columns and the label, renamed `label`. Rows with neither a label nor all their
    text are lines cut short (GLUE's QQP files have a few, where a question holds a line break):
    dropped, and said so. A row with its text but no label is a mistake in the data: refused."""
    data = data.select_columns([*columns, label]).rename_columns({label: "label"})
    broken, mistakes = [], []
    for number, row in enumerate(data):
        if row["label"] is not None and str(row["label"]).strip():
            continue
        if all(str(row[name] or "").strip() for name in columns):
            mistakes.append(number)  # its text is there: the label was forgotten
        else:
            broken.append(number)  # a line cut in two
    if mistakes:
        raise UserError(
            f"{where}: {len(mistakes)} rows have an empty label (first: data row {mistakes[0] + 1}); "
            "fill them in or remove those rows"
        )
    if broken:
        PartialState().print(
            f"note: {where}: skipped {len(broken)} broken row(s) with neither a label nor all their text "
            f"(first: data row {broken[0] + 1})"
        )
        data = data.select(sorted(set(range(len(data))) - set(broken)))
    return data


def encode_labels(train, validation, where):
    """Labels as the model wants them. Numbers with a fraction (STS-B's scores) are a regression
    target: float32, no label names. Anything else (whole numbers, strings) is classification:
    ids 0..n-1 in sorted order, names kept."""
    values = set(train["label"]) | set(validation["label"])
    if all(map(is_number, values)) and any(not float(v).is_integer() for v in values):
        label, names, encode = datasets.Value("float32"), None, {v: float(v) for v in values}
    else:
        # "1", 1 and 1.0 are all the label "1"; whole numbers sort as numbers, strings as strings.
        name_of = {v: str(int(float(v))) if is_number(v) else str(v) for v in values}
        names = sorted(set(name_of.values()), key=label_order)
        unseen = sorted({name_of[v] for v in validation["label"]} - {name_of[v] for v in train["label"]})
        if unseen:
            raise UserError(
                f"{where['validation']}: labels never seen in training: {unseen[:10]}; "
                "the model can only predict labels that the training data has"
            )
        if len(names) < 2:
            raise UserError(f"{where['train']}: only one label ({names[0]!r}); classification needs two or more")
        label, encode = datasets.ClassLabel(names=names), {v: names.index(name_of[v]) for v in values}
    features = datasets.Features({**train.features, "label": label})

    def to_ids(batch):
        return {"label": [encode[value] for value in batch["label"]]}

    train = train.map(to_ids, batched=True, features=features)
    validation = validation.map(to_ids, batched=True, features=features)
    return train, validation, names


def label_order(name):
    """Numbers in their order (2 before 10), then words in theirs."""
    return (0, float(name), "") if is_number(name) else (1, 0.0, name)


def load_test_data(args, columns):
    """The rows to predict, checked before training: --test_file, or with --do_predict the hub
    data set's test split; None without either. GLUE's test files have no label, and their own
    layout (CoLA's has a header, its training file none): the text columns are found by name as
    for training, the row ids in `index` (hub: `idx`), else counted."""
    if args.test_file:
        test, where = load_local_file(args.test_file, "--test_file"), args.test_file
    elif args.do_predict:
        test, where = load_hub_test_split(args.dataset_name, args.dataset_config_name), args.dataset_name
    else:
        return None
    found = check_columns(test, args, where, "test")
    texts = find_text_columns(test, args, where, find_layout(found, labelled=False))
    if len(texts) != len(columns):
        raise UserError(
            f"{where}: the test data's text is in {texts}, but the model learned from {len(columns)} column(s) "
            f"({columns}); pass --text_columns for the test file's layout"
        )
    index = None  # the rows are numbered from 0 then
    for name in ("index", "idx", "id"):
        if name in test.column_names:
            index = name
            break
    return test, texts, index


def submission_labels(args, config):
    """How predictions.tsv spells each label the model predicts: as the training data does, but as
    numbers for a GLUE task from the hub whose submissions take them (MRPC's `equivalent` is 1)."""
    names = [config.id2label[i] for i in range(config.num_labels)]
    if not args.train_file and names in GLUE_NUMBERED_LABELS:  # without --train_file, load_data read the hub
        return {name: str(i) for i, name in enumerate(names)}
    return {name: name for name in names}
