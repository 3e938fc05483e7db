"""Fine-tune a pretrained encoder for sentence or sentence-pair classification (or regression).

    python train_classifier.py                                    # bert-base-uncased on GLUE MRPC
    python train_classifier.py --train_file train.tsv --validation_file dev.tsv   # a GLUE task's
    python train_classifier.py --train_file reviews.csv --text_columns review --label_column stars
    accelerate launch train_classifier.py ...                     # any number of GPUs or TPU cores

Local data is CSV, TSV or JSON lines; the text and label columns are found by name (LAYOUTS) or
given by flag. Labels with fractions (STS-B's scores) make a regression. Re-running the same
command continues from the newest checkpoint in --output_dir; the best model (by
--metric_for_best_model) is exported to <output_dir>/best, and --test_file rows are predicted
with it into <output_dir>/predictions.tsv, in GLUE's submission layout."""

import argparse
import csv
import re
from pathlib import Path

import datasets
import torch.nn.functional as F
from accelerate import PartialState  # print() on the main process only, from anywhere
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, pipeline
from transformers.trainer_pt_utils import get_length_grouped_indices

import common

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
MAY_CHANGE = ["do_predict"]  # flags that may change on resume, besides common.MAY_CHANGE_ON_RESUME
ABOUT = {"pipeline_tag": "text-classification", "task": "classifying sentences or sentence pairs"}  # model card
ID_NAME = re.compile(r"(.*[\s_#-])?(id|idx|index|guid)", re.IGNORECASE)  # never text
# What each metric is without the hub: the same numbers as `evaluate`'s.
METRICS = {
    "accuracy": lambda predictions, references: {"accuracy": float(accuracy_score(references, predictions))},
    "f1": lambda predictions, references, average: {"f1": float(f1_score(references, predictions, average=average))},
    "pearsonr": lambda predictions, references: {"pearsonr": float(pearsonr(references, predictions)[0])},
    "spearmanr": lambda predictions, references: {"spearmanr": float(spearmanr(references, predictions)[0])},
}


def parse_args(argv=None):
    glue_mrpc = {"dataset_name": "nyu-mll/glue", "dataset_config_name": "mrpc"}
    parser = common.build_parser(__doc__, model_name_or_path="bert-base-uncased", **glue_mrpc)
    a = parser.add_argument
    a("--text_columns", nargs="+", help="the text column, or two for sentence pairs (default: found by name)")
    a("--label_column", help="the label column (default: found by name)")
    a("--max_seq_length", type=int, default=128, help="truncate longer inputs to this many tokens")
    a("--pad_to_max_length", action="store_true", help="pad every batch to --max_seq_length (fixed shapes)")
    a("--group_by_length", action=argparse.BooleanOptionalAction, default=True, help="batch similar lengths together")
    a("--metric_for_best_model", choices=[*METRICS, "loss"], help="picks best/ (default: accuracy, or pearsonr)")
    a("--do_predict", action="store_true", help="predict the hub data set's test split into predictions.tsv")
    args = parser.parse_args(argv)
    if args.text_columns and len(args.text_columns) > 2:
        parser.error("--text_columns takes one column, or two for sentence pairs")
    if args.streaming:
        raise common.UserError(
            "--streaming is for the language models' text; the classifier reads its rows whole (to find the labels "
            "and group lengths): drop --streaming"
        )
    return args


def train(args):
    accelerator = common.setup(args, "train_classifier")
    with common.main_process_first(accelerator):  # the main process reads the data; the others read its cache
        train_data, eval_data, columns, label_column, label_names = load_data(args)
        test_data = load_test_data(args, columns)  # checked now: a bad test file must not wait for the training
    metric = choose_metric(args, label_names)
    tokenizer, model, max_seq_length = load_model(args, label_names)
    train_dataloader, eval_dataloader = get_dataloaders(
        args, accelerator, tokenizer, train_data, eval_data, columns, max_seq_length
    )
    if args.eval_only:  # no training: the model as it is, on the validation data (and the test rows predicted)
        metrics = common.evaluate_only(accelerator, args, model, run_evaluation, eval_dataloader)
        if test_data is not None and accelerator.is_main_process:  # by the model just evaluated
            classifier = load_classifier(model, tokenizer, common.pipeline_device(accelerator))
            write_predictions(args, test_data, classifier)
        return metrics

    flops = common.flops_per_token(model, max_seq_length)  # counted now: prepare() may split the weights
    optimizer = common.make_optimizer(model, args, accelerator.device)
    lr_scheduler = common.make_scheduler(accelerator, optimizer, args, train_dataloader)
    common.set_fsdp_units(accelerator, model)  # FSDP only: which layers it shards as units
    # One call for all: an engine (DDP, FSDP, DeepSpeed) wraps the model, its optimizer and its
    # schedule together, and each dataloader learns to give each process its share of every batch.
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler
    )
    # A checkpoint made with other columns or labels is not resumed (common.Checkpointer).
    data = {"columns": [*columns, label_column], "labels": label_names}
    run = common.Run(
        accelerator, args, model=model, tokenizer=tokenizer, lr_scheduler=lr_scheduler,
        train_dataloader=train_dataloader, flops_per_token=flops, settings=data, may_change=MAY_CHANGE,
        metric_for_best_model=metric, about=ABOUT,
    )  # fmt: skip
    run.resume_or_start()  # from the newest checkpoint in --output_dir made with these settings, if any

    for epoch in run.epochs():  # from where a resumed run stands; none if the run had finished
        model.train()  # dropout on (the evaluation at each epoch's end turns it off)
        train_dataloader.set_epoch(epoch)  # the epoch's order depends only on the seed and the epoch
        for batch in run.batches(train_dataloader):  # without those a resumed run already trained on
            with accelerator.accumulate(model):  # an optimizer step every --gradient_accumulation_steps
                outputs = model(**batch)  # this script: the batch holds the labels
                accelerator.backward(outputs.loss)  # scaled for fp16, divided over the accumulated batches
                if accelerator.sync_gradients and args.max_grad_norm:  # a step's last batch: gradients whole
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                # accumulate() makes the optimizer act on each step's last batch only.
                # The schedule is ours to keep: once per optimizer step, not when fp16 skipped one.
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    lr_scheduler.step()
                optimizer.zero_grad()
            run.count_batch(outputs.loss, batch["attention_mask"].sum())  # this script: real tokens, not padding
        run.end_epoch(run_evaluation(accelerator, model, eval_dataloader))  # this script: its metrics

    run.finish()
    if accelerator.is_main_process:  # the demo, once: best/ loaded as users load it
        classifier = load_classifier(str(run.best_dir), None, common.pipeline_device(accelerator))
        if test_data is not None:  # this script: the test rows predicted, not scored (they have no labels)
            write_predictions(args, test_data, classifier)
        show_predictions(classifier, eval_data, columns)
    return run.state


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
        train, validation = common.load_hub_dataset(args.dataset_name, args.dataset_config_name)
        where = {"train": args.dataset_name, "validation": args.dataset_name}
    if validation is None:
        if len(train) < 2:
            raise common.UserError(f"{where['train']} has {len(train)} rows: too few to hold out validation data")
        split = train.train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
        train, validation = split["train"], split["test"]
    columns, label = find_columns(train, args, where["train"], "train")
    if find_columns(validation, args, where["validation"], "validation") != (columns, label):
        raise common.UserError(f"{where['validation']}: its columns differ from the training data's; use one layout")
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
    files = common.input_files(pattern, flag, (".csv", ".tsv", ".json", ".jsonl"))
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
        raise common.UserError(
            f"{pattern}: rows could not be parsed as {kind.upper()} "
            f"({type(cause).__name__}: {common.first_line(cause)}); fix the file"
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
        raise common.UserError(f"{where}: no label column ({known}) among {found}; pass --label_column NAME")
    return find_text_columns(data, args, where, layout, label), label


def check_columns(data, args, where, split):
    """The data's column names, once it has rows and the columns that the flags name (test data
    has no label column to check)."""
    if len(data) == 0:
        raise common.UserError(f"{where}: the {split} data is empty; give it some rows")
    found = data.column_names
    named = {"--text_columns": args.text_columns or []}  # the columns each flag names
    if args.label_column and split != "test":  # (test data has no label)
        named["--label_column"] = [args.label_column]
    for flag, names in named.items():
        missing = [name for name in names if name not in found]
        if missing:
            raise common.UserError(
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
        raise common.UserError(f"{where}: cannot tell which of {found} hold the text; {fix}")
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
        raise common.UserError(
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
            raise common.UserError(
                f"{where['validation']}: labels never seen in training: {unseen[:10]}; "
                "the model can only predict labels that the training data has"
            )
        if len(names) < 2:
            raise common.UserError(f"{where['train']}: only one label ({names[0]!r}); classification needs two or more")
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
        test, where = common.load_hub_test_split(args.dataset_name, args.dataset_config_name), args.dataset_name
    else:
        return None
    found = check_columns(test, args, where, "test")
    texts = find_text_columns(test, args, where, find_layout(found, labelled=False))
    if len(texts) != len(columns):
        raise common.UserError(
            f"{where}: the test data's text is in {texts}, but the model learned from {len(columns)} column(s) "
            f"({columns}); pass --text_columns for the test file's layout"
        )
    index = None  # the rows are numbered from 0 then
    for name in ("index", "idx", "id"):
        if name in test.column_names:
            index = name
            break
    return test, texts, index


def choose_metric(args, label_names):
    """The evaluation metric that picks best/: --metric_for_best_model, else accuracy (pearsonr
    for a regression)."""
    allowed = ["accuracy", "f1", "loss"] if label_names else ["pearsonr", "spearmanr", "loss"]
    metric = args.metric_for_best_model or allowed[0]
    if metric not in allowed:
        kind = "classification" if label_names else "a regression (labels with fractions)"
        raise common.UserError(f"--metric_for_best_model {metric} does not apply to {kind}; use {', '.join(allowed)}")
    return metric


def load_model(args, label_names):
    """The tokenizer; the pretrained encoder with a new head (one output per label, or one for a
    regression); and the sequence length: --max_seq_length, or the model's positions if it has
    fewer."""
    tokenizer = common.from_pretrained(AutoTokenizer, args.model_name_or_path, "tokenizer")
    if tokenizer.pad_token is None:  # GPT-style models have no padding token
        tokenizer.pad_token = tokenizer.eos_token
    if label_names:
        head = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names))}
        head["label2id"] = {name: i for i, name in enumerate(label_names)}
    else:
        head = {"num_labels": 1, "problem_type": "regression"}
    model = common.from_pretrained(AutoModelForSequenceClassification, args.model_name_or_path, **head)
    model.config.pad_token_id = tokenizer.pad_token_id
    max_positions = getattr(model.config, "max_position_embeddings", None) or args.max_seq_length
    # Many hub tokenizers have no limit of their own: best/'s then cuts inputs to what the model
    # takes (pipeline).
    tokenizer.model_max_length = min(tokenizer.model_max_length, max_positions)
    if args.max_seq_length > max_positions:
        PartialState().print(f"note: the model has {max_positions} positions; using --max_seq_length {max_positions}")
    kind = f"{len(label_names)} labels" if label_names else "regression"
    PartialState().print(f"{args.model_name_or_path}: {model.num_parameters():,} parameters, {kind}")
    return tokenizer, model, min(args.max_seq_length, max_positions)


def get_dataloaders(args, accelerator, tokenizer, train_data, eval_data, columns, max_seq_length):
    """Tokenize once (batched, cached by `datasets`; a note says how many inputs max_seq_length
    cuts), and batch with dynamic padding: each batch is padded only to its longest example, and
    similar lengths are batched together. --eval_only tokenizes no training data: it trains none
    (its training dataloader is None)."""

    def tokenize(batch):
        texts = [batch[column] for column in columns]  # one column, or two: a pair
        encoded = tokenizer(*texts, truncation=True, max_length=max_seq_length)
        if encoded.encodings:  # a fast tokenizer keeps what truncation cut off in `overflowing`
            encoded["truncated"] = [bool(e.overflowing) for e in encoded.encodings]
        return encoded

    splits = {"training": train_data, "validation": eval_data}
    if args.eval_only:  # nothing to train on: the training data is not tokenized
        del splits["training"]
    with common.main_process_first(accelerator):  # the main process tokenizes; the others read its cache
        for name, data in splits.items():
            splits[name] = data.map(tokenize, batched=True, remove_columns=columns)
    if "truncated" in splits["validation"].column_names:  # (a fast tokenizer says what it cut)
        shares, total_cut = [], 0
        for name, data in splits.items():
            cut = sum(data["truncated"])
            total_cut += cut
            shares.append(f"{cut:,} of {len(data):,} {name} ({cut / len(data):.1%})")
            splits[name] = data.remove_columns("truncated")
        if total_cut:
            accelerator.print(
                f"note: --max_seq_length {max_seq_length} truncates {' and '.join(shares)} examples; "
                "raise it to keep them"
            )
    train_data, eval_data = splits.get("training"), splits["validation"]
    if accelerator.device.type == "xla" and not args.pad_to_max_length:
        # XLA (TPUs) compiles a graph for each batch shape it meets: one shape for all, without a
        # flag to know (set in args, so checkpoints record it).
        accelerator.print("note: on XLA every batch is padded to --max_seq_length (as --pad_to_max_length)")
        args.pad_to_max_length = True
    if args.pad_to_max_length:  # fixed shapes (what TPUs want), at the cost of computing on padding
        collator = DataCollatorWithPadding(tokenizer, padding="max_length", max_length=max_seq_length)
    else:  # multiples of 8 let tensor cores work on GPUs under mixed precision
        multiple = 8 if accelerator.mixed_precision != "no" else None
        collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple)
    sampler = None
    if train_data is not None and args.group_by_length and not args.pad_to_max_length:
        # Grouped by global batch: the same order for any split of it (resuming on another number of
        # processes).
        batch = common.global_batch_size(args, accelerator)
        sampler = LengthGroupedSampler([len(ids) for ids in train_data["input_ids"]], batch, args.seed)
    train_dataloader, eval_dataloader, _ = common.make_dataloaders(
        args, accelerator, collator, train_data, eval_data, sampler=sampler
    )
    return train_dataloader, eval_dataloader


class LengthGroupedSampler(common.EpochSampler):
    """common.EpochSampler (an order from (seed, epoch) alone, whole global batches) with
    Transformers' grouping: shuffle, then sort each run of about 50 batches by length, so little
    is left to pad."""

    def __init__(self, lengths, global_batch, seed):
        super().__init__(len(lengths), global_batch, seed)
        self.lengths = lengths

    def shuffle(self, generator):
        return get_length_grouped_indices(self.lengths, self.global_batch, generator=generator)


def run_evaluation(accelerator, model, eval_dataloader):
    """Loss and metrics over the validation data: accuracy and F1, or for a regression Pearson
    and Spearman."""
    num_labels = accelerator.unwrap_model(model).config.num_labels

    def per_example(model, batch):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return {"logits": logits.float(), "labels": batch["labels"]}

    out = common.evaluate(accelerator, model, eval_dataloader, per_example)
    # The mean over examples, not over batches: a small last batch weighs what it holds.
    if num_labels == 1:  # a regression: the one output is the prediction
        predictions = out["logits"][:, 0]
        loss = F.mse_loss(predictions, out["labels"].float()).item()
    else:
        predictions = out["logits"].argmax(dim=-1)
        loss = F.cross_entropy(out["logits"], out["labels"]).item()
    return {"loss": loss, **compute_metrics(predictions.tolist(), out["labels"].tolist(), num_labels)}


def compute_metrics(predictions, references, num_labels):
    """Accuracy and F1 (binary for two classes, macro for more), or for a regression (one output)
    Pearson and Spearman correlation, what GLUE reports for STS-B."""
    if num_labels == 1:
        names, options = ("pearsonr", "spearmanr"), {}
    else:
        names, options = ("accuracy", "f1"), {"f1": {"average": "binary" if num_labels == 2 else "macro"}}
    metrics = {}
    for name in names:
        compute = common.load_metric(name, METRICS[name])
        metrics |= compute(predictions=predictions, references=references, **options.get(name, {}))
    return metrics


def load_classifier(model, tokenizer, device):
    """A text-classification pipeline that cuts inputs to what the model takes: `model` a folder
    (best/, loaded as users load it, with its tokenizer: `tokenizer` None), or (--eval_only) the
    model and tokenizer just evaluated, so the predictions are that model's (a hub model's new
    head exists only in memory). For a regression, whose config says so (load_model sets
    problem_type), the pipeline applies no function: the raw output is the prediction."""
    return pipeline("text-classification", model=model, tokenizer=tokenizer, device=device, truncation=True)


def write_predictions(args, test_data, classifier):
    """<output_dir>/predictions.tsv in GLUE's submission layout: `index<TAB>prediction`, one row
    per test row in file order, each label as the training data spells it (its names are in the
    model), or a number for a regression. Written under a temporary name, then renamed."""
    test, columns, index = test_data
    regression = classifier.model.config.problem_type == "regression"
    outputs = classifier(pipeline_inputs(test, columns), batch_size=args.per_device_eval_batch_size)
    path = Path(args.output_dir) / "predictions.tsv"
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("index\tprediction\n")
        for number, (row, output) in enumerate(zip(test, outputs)):
            prediction = f"{output['score']:.4f}" if regression else output["label"]
            f.write(f"{row[index] if index else number}\t{prediction}\n")
    tmp.replace(path)
    print(f"Predictions for the {len(test):,} test rows, by {classifier.model.config.name_or_path}: {path}")


def pipeline_inputs(rows, columns):
    """Rows as text-classification pipelines take them: the text, or a pair."""
    if len(columns) == 2:
        return [{"text": row[columns[0]], "text_pair": row[columns[1]]} for row in rows]
    return [row[columns[0]] for row in rows]


def show_predictions(classifier, eval_data, columns, count=5):
    """The exported model, loaded as users will load it, on a few validation examples."""
    rows = eval_data.select(range(min(count, len(eval_data))))
    regression = classifier.model.config.problem_type == "regression"
    names = classifier.model.config.id2label
    print("\nA few validation examples (predicted / true):")
    for row, pred in zip(rows, classifier(pipeline_inputs(rows, columns))):
        text = " ||| ".join(str(row[c]) for c in columns)
        if regression:
            guess, true = f"{pred['score']:.2f}", f"{row['label']:.2f}"
        else:
            guess, true = pred["label"], names[row["label"]]
        print(f"  {guess:>10} / {true:<10} {text if len(text) <= 90 else text[:87] + '...'}")


def main(argv=None):
    return common.run(train, parse_args, argv)


if __name__ == "__main__":
    main()
