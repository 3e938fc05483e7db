"""Fine-tune a pretrained encoder for sentence or sentence-pair classification.

    python train_classifier.py                       # bert-base-uncased on GLUE MRPC
    python train_classifier.py --train_file train.csv --validation_file dev.csv
    accelerate launch train_classifier.py ...        # any number of GPUs or TPU cores

Local files (CSV, TSV or JSON lines) have a `text` column, or `sentence1` and
`sentence2`, and a `label` column of integers or strings. Re-running the same
command continues from the newest checkpoint in --output_dir. The best model
(by --metric_for_best_model) is exported to <output_dir>/best.
"""

import argparse
import csv
import re

import datasets
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    get_scheduler,
    pipeline,
)
from transformers.trainer_pt_utils import get_length_grouped_indices

import common

EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl")

# Where the text and the label are, by column name: the first layout whose columns are
# all there wins. GLUE's files as its download script writes them, and GLUE on the hub.
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
ID_NAME = re.compile(r"(.*[\s_#-])?(id|idx|index|guid)", re.IGNORECASE)  # never text


def parse_args(argv=None):
    parser = common.build_parser(__doc__.split("\n")[0])
    parser.add_argument(
        "--text_columns", nargs="+", help="the text column, or two for sentence pairs (default: found by name)"
    )
    parser.add_argument("--label_column", help="the label column (default: found by name)")
    parser.add_argument("--max_seq_length", type=int, default=128, help="truncate longer inputs to this many tokens")
    parser.add_argument(
        "--pad_to_max_length",
        action="store_true",
        help="pad every batch to --max_seq_length instead of to its longest example",
    )
    parser.add_argument(
        "--group_by_length",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="batch examples of similar length together, so little padding is computed (on by default)",
    )
    parser.add_argument(
        "--metric_for_best_model",
        choices=["accuracy", "f1", "pearsonr", "spearmanr", "loss"],
        help="picks best/ (default: accuracy; pearsonr for regression)",
    )
    parser.add_argument(
        "--early_stopping_patience",
        type=int,
        default=0,
        help="stop after this many evaluations without improvement (0: never)",
    )
    parser.add_argument(
        "--eval_only", action="store_true", help="only evaluate --model_name_or_path on the validation data"
    )
    parser.set_defaults(
        model_name_or_path="bert-base-uncased",
        dataset_name="nyu-mll/glue",
        dataset_config_name="mrpc",
        learning_rate=5e-5,
        per_device_train_batch_size=8,
    )
    args = parser.parse_args(argv)
    if args.text_columns and len(args.text_columns) > 2:
        parser.error("--text_columns takes one column, or two for sentence pairs")
    return args


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def load_local_file(pattern, flag):
    """A CSV, TSV or JSON-lines file as a `datasets.Dataset`. CSV and TSV columns are read
    as text (labels are parsed later, once, from all rows), under the names in the header
    row, or column1, column2, ... for files without one (GLUE's CoLA)."""
    files = common.input_files(pattern, flag, EXTENSIONS)
    kind, options = "json", {}
    if files[0].lower().endswith((".csv", ".tsv")):
        kind, options = "csv", table_options(files, flag)
    try:
        return datasets.load_dataset(kind, data_files=files, split="train", **options)
    except Exception as err:
        cause = err.__cause__ or err
        raise common.UserError(
            f"{pattern}: rows could not be parsed as {kind.upper()} "
            f"({type(cause).__name__}: {common.first_line(cause)}); fix the file"
        ) from None


def table_options(files, flag):
    # TSV files (GLUE's among them) have quote characters inside sentences: no quoting.
    delimiter, quoting = ("\t", csv.QUOTE_NONE) if files[0].lower().endswith(".tsv") else (",", csv.QUOTE_MINIMAL)
    firsts = set()
    for path in files:
        with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: MRPC's files start with a BOM
            firsts.add(tuple(next(csv.reader(f, delimiter=delimiter, quoting=quoting), [])))
    if len(firsts) > 1:
        raise common.UserError(f"{flag} matches files with different first rows; give files with one layout")
    first = firsts.pop()
    # A header names columns; a first row with a number in it is data (CoLA has no header).
    has_header = not any(is_number(value) for value in first)
    names = [(value.strip() if has_header else "") or f"column{i}" for i, value in enumerate(first, 1)]
    return {
        "delimiter": delimiter,
        "quoting": quoting,
        "column_names": names,
        "skiprows": int(has_header),
        "features": datasets.Features({name: datasets.Value("string") for name in names}),
        "keep_default_na": False,  # "NA", "null" or "None" in a sentence are words, not missing values
    }


def is_number(value):
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def find_columns(data, args, where):
    """The text column(s) and the label column: the flags, else the first known layout,
    else Hugging Face's rule made safer (the one or two columns that hold text)."""
    found = data.column_names
    for flag, names in (("--text_columns", args.text_columns or []), ("--label_column", [args.label_column])):
        missing = [name for name in names if name is not None and name not in found]
        if missing:
            raise common.UserError(f"{where}: {flag} {' '.join(missing)}: no such column; the columns are {found}")
    layout = next(((t, lab) for t, lab in LAYOUTS if all(c in found for c in (*t, lab))), None)
    label = args.label_column or (layout and layout[1]) or next((lab for _, lab in LAYOUTS if lab in found), None)
    if label is None:
        known = " or ".join(dict.fromkeys(repr(lab) for _, lab in LAYOUTS if not lab.startswith("column")))
        raise common.UserError(f"{where}: no label column ({known}) among {found}; pass --label_column NAME")
    texts = args.text_columns or (layout and list(layout[0]))
    if not texts:
        sample = data.select(range(min(len(data), 100)))
        texts = [
            c
            for c in found
            if c != label and not ID_NAME.fullmatch(c) and not all(is_number(v) for v in sample[c] if v != "")
        ]
        if len(texts) not in (1, 2):
            raise common.UserError(
                f"{where}: cannot tell which of {found} hold the text; pass --text_columns NAME [NAME2]"
                + ("" if args.label_column else f" (and --label_column, '{label}' is used now)")
            )
    return list(texts), label


def load_data(args):
    """Train and validation splits with the text columns and a `label` column; the names
    of the text and label columns found; the label names (None for regression: labels
    with fractions, as STS-B's scores)."""
    if args.train_file:
        train = load_local_file(args.train_file, "--train_file")
        validation = load_local_file(args.validation_file, "--validation_file") if args.validation_file else None
        where = {"train": args.train_file, "validation": args.validation_file or args.train_file}
    else:
        train, validation = common.load_hub_dataset(args.dataset_name, args.dataset_config_name)
        where = {"train": args.dataset_name, "validation": args.dataset_name}
    if validation is None:
        if len(train) < 2:
            raise common.UserError(
                f"{where['train']} has {len(train)} rows: too few to hold out validation data; "
                "add rows or pass --validation_file"
            )
        split = train.train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
        train, validation = split["train"], split["test"]

    splits = {}
    for split, data in (("train", train), ("validation", validation)):
        if len(data) == 0:
            raise common.UserError(f"{where[split]}: the {split} data is empty; give it some rows")
        columns, label = find_columns(data, args, where[split])
        if split == "validation" and (columns, label) != splits["train"][1]:
            raise common.UserError(
                f"{where['validation']}: text {columns} and label '{label}' differ from the training data's "
                f"{splits['train'][1]}; use the same layout"
            )
        data = data.select_columns([*columns, label])
        if label != "label":
            data = data.rename_column(label, "label")
        splits[split] = (drop_broken_rows(data, columns, where[split]), (columns, label))
    train, validation = splits["train"][0], splits["validation"][0]
    columns, label = splits["train"][1]

    if isinstance(train.features["label"], datasets.ClassLabel):  # hub data sets name their labels
        label_names = train.features["label"].names
    else:
        train, validation, label_names = encode_labels(train, validation, where)

    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples:
        validation = validation.select(range(min(args.max_eval_samples, len(validation))))
    common.main_print(
        f"Data: {len(train):,} training and {len(validation):,} validation rows; "
        f"text {' + '.join(repr(c) for c in columns)}, label '{label}'"
    )
    return train, validation, columns, label, label_names


def drop_broken_rows(data, columns, where):
    """Rows with neither a label nor all their text are lines cut short (GLUE's QQP files
    have a few, where a question holds a line break): dropped, and said so. A row with its
    text but no label is a mistake in the data: refused in encode_labels."""
    rows = zip(data["label"], *(data[c] for c in columns))
    broken = [i for i, (label, *texts) in enumerate(rows) if is_blank(label) and any(map(is_blank, texts))]
    if broken:
        common.main_print(
            f"note: {where}: skipped {len(broken)} broken row(s) with neither a label nor all their text "
            f"(first: data row {broken[0] + 1})"
        )
        data = data.select(sorted(set(range(len(data))) - set(broken)))
    return data


def is_blank(value):
    return value is None or str(value).strip() == ""


def encode_labels(train, validation, where):
    """Labels as the model wants them. Numbers with a fraction (STS-B's similarity scores)
    are a regression target: float32, and None for the label names. Anything else (whole
    numbers, strings) is classification: ids 0..n-1 in sorted order, the names kept."""
    for split, data in (("train", train), ("validation", validation)):
        blanks = [i for i, v in enumerate(data["label"]) if is_blank(v)]
        if blanks:
            raise common.UserError(
                f"{where[split]}: {len(blanks)} rows have an empty label (first: data row "
                f"{blanks[0] + 1}); fill them in or remove those rows"
            )
    values = set(train["label"]) | set(validation["label"])
    if all(is_number(v) for v in values):
        numbers = {v: float(v) for v in values}
        if any(not x.is_integer() for x in numbers.values()):
            features = train.features.copy()
            features["label"] = datasets.Value("float32")

            def to_float(batch):
                return {"label": [numbers[v] for v in batch["label"]]}

            return (*(d.map(to_float, batched=True, features=features) for d in (train, validation)), None)
        names = {v: str(int(x)) for v, x in numbers.items()}  # "1", 1 and 1.0 are all the label "1"
        order = sorted(set(names.values()), key=int)
    else:
        names = {v: str(v) for v in values}
        order = sorted(set(names.values()))
    unseen = sorted({names[v] for v in validation["label"]} - {names[v] for v in train["label"]})
    if unseen:
        raise common.UserError(
            f"{where['validation']}: labels never seen in training: {unseen[:10]}; "
            "the model can only predict labels that the training data has"
        )
    if len(order) < 2:
        raise common.UserError(f"{where['train']}: only one label ({order[0]!r}); classification needs two or more")
    to_id = {v: order.index(name) for v, name in names.items()}

    def encode(batch):
        return {"label": [to_id[v] for v in batch["label"]]}

    features = train.features.copy()
    features["label"] = datasets.ClassLabel(names=order)
    return (*(d.map(encode, batched=True, features=features) for d in (train, validation)), order)


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Shuffle, then sort each run of about 50 batches by length, so that a batch holds
    examples of similar length and dynamic padding has little left to pad. The order
    depends only on (seed, epoch), so a resumed run sees the same batches."""

    def __init__(self, lengths, batch_size, seed):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch):  # called through the prepared dataloader's set_epoch
        self.epoch = epoch

    def __len__(self):
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


def compute_metrics(predictions, references, num_labels):
    """Classification: accuracy and F1 (binary F1 for two classes, macro F1 for more).
    Regression (one output): Pearson and Spearman correlation, what GLUE reports for STS-B."""
    if num_labels == 1:
        pearson = common.load_metric(
            "pearsonr", lambda predictions, references: {"pearsonr": float(pearsonr(references, predictions)[0])}
        )
        spearman = common.load_metric(
            "spearmanr", lambda predictions, references: {"spearmanr": float(spearmanr(references, predictions)[0])}
        )
        return {
            **pearson(predictions=predictions, references=references),
            **spearman(predictions=predictions, references=references),
        }
    average = "binary" if num_labels == 2 else "macro"
    accuracy = common.load_metric(
        "accuracy", lambda predictions, references: {"accuracy": float(accuracy_score(references, predictions))}
    )
    f1 = common.load_metric(
        "f1", lambda predictions, references, average: {"f1": float(f1_score(references, predictions, average=average))}
    )
    return {
        **accuracy(predictions=predictions, references=references),
        **f1(predictions=predictions, references=references, average=average),
    }


def run_evaluation(accelerator, model, eval_dataloader, num_labels):
    def per_example(model, batch):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return {"logits": logits.float(), "labels": batch["labels"]}

    out = common.evaluate(accelerator, model, eval_dataloader, per_example)
    # Mean over examples, not over batches: a small last batch weighs what it holds.
    if num_labels == 1:  # regression: the one output is the prediction
        predictions = out["logits"][:, 0]
        loss = F.mse_loss(predictions, out["labels"].float()).item()
    else:
        loss = F.cross_entropy(out["logits"], out["labels"]).item()
        predictions = out["logits"].argmax(dim=-1)
    return {"loss": loss, **compute_metrics(predictions.tolist(), out["labels"].tolist(), num_labels)}


def choose_metric(args, num_labels):
    """--metric_for_best_model, defaulting to accuracy (pearsonr for regression)."""
    allowed = ["pearsonr", "spearmanr", "loss"] if num_labels == 1 else ["accuracy", "f1", "loss"]
    metric = args.metric_for_best_model or allowed[0]
    if metric not in allowed:
        kind = "regression (float labels)" if num_labels == 1 else "classification"
        raise common.UserError(
            f"--metric_for_best_model {metric} does not apply to {kind}; use one of {', '.join(allowed)}"
        )
    return metric


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def train(args):
    common.check_args(args)
    output_dir = common.resolve_output_dir(args, "train_classifier")
    accelerator = common.make_accelerator(args, output_dir)

    # Data: tokenize once (batched, cached by `datasets`), pad each batch only to its
    # own longest example (dynamic padding).
    with accelerator.main_process_first():
        train_data, eval_data, columns, label_column, label_names = load_data(args)
    tokenizer = common.from_pretrained(AutoTokenizer.from_pretrained, args.model_name_or_path, "tokenizer")
    config = common.from_pretrained(AutoConfig.from_pretrained, args.model_name_or_path, "model configuration")
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions and args.max_seq_length > max_positions:
        accelerator.print(f"note: the model has {max_positions} positions; using --max_seq_length {max_positions}")
        args.max_seq_length = max_positions
    if tokenizer.pad_token is None:  # GPT-style models have no padding token
        tokenizer.pad_token = tokenizer.eos_token

    num_labels = len(label_names) if label_names else 1  # one output for regression
    args.metric_for_best_model = choose_metric(args, num_labels)

    def tokenize(batch):
        encoded = tokenizer(*(batch[c] for c in columns), truncation=True, max_length=args.max_seq_length)
        if encoded.encodings:  # a fast tokenizer keeps what truncation cut off in `overflowing`
            encoded["truncated"] = [bool(e.overflowing) for e in encoded.encodings]
        return encoded

    with accelerator.main_process_first():
        train_data, eval_tokenized = (
            data.map(tokenize, batched=True, remove_columns=[c for c in data.column_names if c != "label"])
            for data in (train_data, eval_data)
        )
    if "truncated" in train_data.column_names:
        counts = [(sum(d["truncated"]), len(d)) for d in (train_data, eval_tokenized)]
        if counts[0][0] or counts[1][0]:
            accelerator.print(
                f"note: --max_seq_length {args.max_seq_length} truncates {counts[0][0]:,} of {counts[0][1]:,} "
                f"training ({counts[0][0] / counts[0][1]:.1%}) and {counts[1][0]:,} of {counts[1][1]:,} validation "
                f"examples ({counts[1][0] / counts[1][1]:.1%}); raise it to keep them whole"
            )
        train_data, eval_tokenized = (d.remove_columns("truncated") for d in (train_data, eval_tokenized))

    # Multiples of 8 let tensor cores work on GPUs under mixed precision.
    pad_to = 8 if accelerator.mixed_precision != "no" else None
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to)
    if args.pad_to_max_length:  # fixed shapes (what TPUs want), at the cost of computing on padding
        collator = DataCollatorWithPadding(tokenizer, padding="max_length", max_length=args.max_seq_length)
    loader_options = common.loader_options(args, accelerator.device)
    if args.group_by_length and not args.pad_to_max_length:
        # Grouped by global batch (all processes, all accumulation steps): the same order for
        # any split of it, so a run can resume on another number of processes.
        batch_size = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        sampler = LengthGroupedSampler([len(ids) for ids in train_data["input_ids"]], batch_size, args.seed)
        shuffle = {"sampler": sampler}
    else:
        shuffle = {"shuffle": True}
    train_dataloader = DataLoader(
        train_data,
        collate_fn=collator,
        batch_size=args.per_device_train_batch_size,
        generator=common.data_generator(args.seed),
        **shuffle,
        **loader_options,
    )
    eval_dataloader = DataLoader(
        eval_tokenized, collate_fn=collator, batch_size=args.per_device_eval_batch_size, **loader_options
    )

    # Model: a new classification head on the pretrained encoder.
    if label_names:
        head = {"id2label": dict(enumerate(label_names)), "label2id": {n: i for i, n in enumerate(label_names)}}
    else:
        head = {"problem_type": "regression"}  # mean-squared error on the one output
    model = common.from_pretrained(
        lambda name: AutoModelForSequenceClassification.from_pretrained(name, num_labels=num_labels, **head),
        args.model_name_or_path,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    task = f"{num_labels} labels" if label_names else "regression"
    accelerator.print(f"{args.model_name_or_path}: {common.params_summary(model)}, {task}")

    if args.eval_only:
        model, eval_dataloader = accelerator.prepare(model, eval_dataloader)
        metrics = run_evaluation(accelerator, model, eval_dataloader, num_labels)
        accelerator.print(f"eval: {format_metrics(metrics)}")
        if accelerator.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            common.write_json(output_dir / "eval_results.json", metrics)
        return metrics

    flops_per_token = common.flops_per_token(model, args.max_seq_length)  # counted while the weights are whole
    optimizer = common.make_optimizer(model, args, accelerator.device)
    model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader
    )

    # Steps are counted after `prepare`: the dataloader is now this process's share.
    steps_per_epoch, total_steps, num_epochs = common.training_steps(len(train_dataloader), args)
    lr_scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps, num_training_steps=total_steps
    )
    lr_scheduler = accelerator.prepare(lr_scheduler)  # so checkpoints save and restore it

    # Resume: reload the newest complete checkpoint, if any.
    settings = {"columns": [*columns, label_column], "labels": label_names}
    checkpointer = common.Checkpointer(
        accelerator, output_dir, args, settings, ["early_stopping_patience", "eval_only"]
    )
    state = checkpointer.resume()
    greater_is_better = args.metric_for_best_model != "loss"
    best_dir = output_dir / "best"

    if args.report_to != "none":
        accelerator.init_trackers("train_classifier", config=vars(args) | {"output_dir": str(output_dir)})

    def finished():
        return state.completed_steps >= total_steps or state.stopped_early

    if finished():
        accelerator.print(
            f"Training already finished in {output_dir} ({state.completed_steps} steps); "
            "raise --num_train_epochs or --max_train_steps to train further."
        )
    else:
        accelerator.print(common.describe_training(accelerator, args, num_epochs, total_steps, steps_per_epoch))

    progress_bar = tqdm(total=total_steps, initial=state.completed_steps, disable=not accelerator.is_main_process)
    throughput = common.Throughput(accelerator, flops_per_token)
    losses = []
    model.train()
    while not finished():
        train_dataloader.set_epoch(state.epoch)  # the epoch's shuffle depends only on seed and epoch
        batches = train_dataloader
        if state.batch_in_epoch:  # resuming mid-epoch: skip what was already trained on
            batches = accelerator.skip_first_batches(train_dataloader, state.batch_in_epoch)
        for batch in batches:
            if state.completed_steps >= total_steps:
                break
            # accumulate(): gradients are synced and the optimizer steps only every
            # --gradient_accumulation_steps batches (and at the end of the epoch).
            with accelerator.accumulate(model):
                outputs = model(**batch)
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    lr_scheduler.step()  # once per optimizer step (fp16 may skip a step on overflow)
                optimizer.zero_grad()
            state.batch_in_epoch += 1
            losses.append(outputs.loss.detach())
            throughput.add(batch["attention_mask"].sum())

            if not accelerator.sync_gradients:
                continue
            # An optimizer step was taken.
            state.completed_steps += 1
            progress_bar.update(1)
            if state.completed_steps % args.logging_steps == 0:
                # .item() waits for the device, so it happens only every --logging_steps steps.
                entry = common.log_metrics(
                    accelerator,
                    state,
                    {
                        "train_loss": common.mean_over_processes(accelerator, losses),
                        "learning_rate": lr_scheduler.get_last_lr()[0],
                        **throughput.report(),  # tokens/s, and MFU on a GPU
                    },
                )
                losses = []
                progress_bar.set_postfix(common.progress_postfix(entry))
            if checkpointer.save_due(state):
                throughput.pause()  # saving is not training: keep it out of tokens/s
                checkpointer.save(state)
                throughput.resume()
                checkpointer.exit_if_signalled(state)

        if state.batch_in_epoch == len(train_dataloader):  # the epoch ran to its end
            state.epoch += 1
            state.batch_in_epoch = 0

        # Evaluate, keep the best model, maybe stop early, then checkpoint.
        throughput.pause()  # evaluating and saving are not training either
        metrics = run_evaluation(accelerator, model, eval_dataloader, num_labels)
        common.log_metrics(accelerator, state, {f"eval_{k}": v for k, v in metrics.items()})
        accelerator.print(f"epoch {state.epoch}, step {state.completed_steps}: {format_metrics(metrics)}")
        value = metrics[args.metric_for_best_model]
        if common.improved(value, state.best_metric, greater_is_better):
            state.best_metric, state.best_step = value, state.completed_steps
            state.evals_without_improvement = 0
            common.export_model(accelerator, model, tokenizer, best_dir)
            if accelerator.is_main_process:
                common.write_json(output_dir / "eval_results.json", {"step": state.completed_steps, **metrics})
        else:
            state.evals_without_improvement += 1
            if args.early_stopping_patience and state.evals_without_improvement >= args.early_stopping_patience:
                accelerator.print(
                    f"No improvement in {args.metric_for_best_model} for "
                    f"{state.evals_without_improvement} evaluations: stopping early."
                )
                state.stopped_early = True
        checkpointer.save(state)
        throughput.resume()
        checkpointer.exit_if_signalled(state)
    progress_bar.close()
    accelerator.end_training()
    if common.peak_memory(accelerator.device) is not None:
        accelerator.print(f"Peak GPU memory: {common.peak_memory(accelerator.device):.2f} GiB")

    if accelerator.is_main_process:
        common.write_json(output_dir / "log_history.json", state.log_history)
        metrics = ("eval_loss", f"eval_{args.metric_for_best_model}")
        common.plot_history(state.log_history, output_dir / "loss.png", metrics)
        accelerator.print(
            f"Best {args.metric_for_best_model}: {state.best_metric:.4f} at step {state.best_step}; model in {best_dir}"
        )
        show_predictions(best_dir, eval_data, columns, accelerator.device)
    return state


def format_metrics(metrics):
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def show_predictions(model_dir, eval_data, columns, device, count=5):
    """The exported model, loaded as users will load it, on a few validation examples."""
    classifier = pipeline("text-classification", model=str(model_dir), device=device)
    rows = eval_data.select(range(min(count, len(eval_data))))
    inputs = [{"text": r[columns[0]], "text_pair": r[columns[1]]} if len(columns) == 2 else r[columns[0]] for r in rows]
    regression = classifier.model.config.problem_type == "regression"
    names = classifier.model.config.id2label
    print("\nA few validation examples (predicted / true):")
    # function_to_apply="none": a regression model's raw output is its prediction.
    for row, pred in zip(rows, classifier(inputs, truncation=True, function_to_apply="none" if regression else None)):
        text = " ||| ".join(str(row[c]) for c in columns)
        short = text if len(text) <= 90 else text[:87] + "..."
        guess, true = (
            (f"{pred['score']:.2f}", f"{row['label']:.2f}") if regression else (pred["label"], names[row["label"]])
        )
        print(f"  {guess:>10} / {true:<10} {short}")


def main(argv=None):
    args = parse_args(argv)
    return common.run(train, args)


if __name__ == "__main__":
    main()
