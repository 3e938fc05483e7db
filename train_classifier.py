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
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
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

EXTENSIONS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}


def parse_args(argv=None):
    parser = common.build_parser(__doc__.split("\n")[0])
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
    parser.add_argument("--metric_for_best_model", default="accuracy", choices=["accuracy", "f1", "loss"])
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
    return args


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def load_local_file(path):
    path = Path(path)
    if path.is_dir():
        raise common.UserError(f"{path} is a directory, not a file; pass the data file itself")
    if not path.is_file():
        raise common.UserError(f"file not found: {path}; check the path given to --train_file/--validation_file")
    kind = EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise common.UserError(f"{path}: unsupported extension '{path.suffix}'; use one of {', '.join(EXTENSIONS)}")
    if path.stat().st_size == 0:
        raise common.UserError(f"{path} is empty; give it a header line and rows")
    common.check_utf8(path, "data file")
    options = {}
    if path.suffix.lower() == ".tsv":
        # TSV files (GLUE's among them) have quote characters inside sentences: no quoting.
        options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train", **options)
    except Exception as err:
        cause = err.__cause__ or err
        raise common.UserError(
            f"{path}: rows could not be parsed as {kind.upper()} "
            f"({type(cause).__name__}: {common.first_line(cause)}); fix the file"
        ) from None


def text_columns(dataset, where):
    cols = dataset.column_names
    if "sentence1" in cols and "sentence2" in cols:
        names = ["sentence1", "sentence2"]
    elif "text" in cols:
        names = ["text"]
    else:
        raise common.UserError(f"{where}: needs a 'text' column, or 'sentence1' and 'sentence2'; found {cols}")
    if "label" not in cols:
        raise common.UserError(f"{where}: needs a 'label' column; found {cols}")
    return names


def load_data(args):
    """Train and validation splits with a `label` column, the text columns, and the label names."""
    if args.train_file:
        train = load_local_file(args.train_file)
        where = {"train": args.train_file, "validation": args.validation_file or args.train_file}
        if args.validation_file:
            validation = load_local_file(args.validation_file)
        else:
            if len(train) < 2:
                raise common.UserError(
                    f"{args.train_file} has {len(train)} rows: too few to hold out validation "
                    "data; add rows or pass --validation_file"
                )
            split = train.train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
            train, validation = split["train"], split["test"]
    else:
        raw = common.load_hub_dataset(args.dataset_name, args.dataset_config_name)
        train, validation = raw["train"], raw["validation"]
        where = {"train": args.dataset_name, "validation": args.dataset_name}

    for split, data in (("train", train), ("validation", validation)):
        if len(data) == 0:
            raise common.UserError(f"{where[split]}: the {split} data is empty; give it some rows")
    columns = text_columns(train, where["train"])
    if text_columns(validation, where["validation"]) != columns:
        raise common.UserError("train and validation data have different text columns; use the same layout")

    if isinstance(train.features["label"], datasets.ClassLabel):  # hub data sets name their labels
        label_names = train.features["label"].names
    else:
        train, validation, label_names = encode_labels(train, validation, where)

    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples:
        validation = validation.select(range(min(args.max_eval_samples, len(validation))))
    return train, validation, columns, label_names


def encode_labels(train, validation, where):
    """Map labels (integers or strings) to ids 0..n-1, in sorted order."""
    for split, data in (("train", train), ("validation", validation)):
        blanks = [i for i, v in enumerate(data["label"]) if v is None or str(v).strip() == ""]
        if blanks:
            raise common.UserError(
                f"{where[split]}: {len(blanks)} rows have an empty label (first: data row "
                f"{blanks[0] + 1}); fill them in or remove those rows"
            )
    train_values = sorted(set(train["label"]), key=sort_key)
    unseen = sorted(set(validation["label"]) - set(train_values), key=sort_key)
    if unseen:
        raise common.UserError(
            f"{where['validation']}: labels never seen in training: {unseen[:10]}; "
            "the model can only predict labels that the training data has"
        )
    if len(train_values) < 2:
        raise common.UserError(
            f"{where['train']}: only one label ({train_values[0]!r}); classification needs two or more"
        )
    label_names = [str(v) for v in train_values]
    to_id = {v: i for i, v in enumerate(train_values)}

    def encode(batch):
        return {"label": [to_id[v] for v in batch["label"]]}

    def encode_split(data):
        features = data.features.copy()
        features["label"] = datasets.ClassLabel(names=label_names)
        return data.map(encode, batched=True, features=features)

    return encode_split(train), encode_split(validation), label_names


def sort_key(value):
    return (isinstance(value, str), value)


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
    """Accuracy and F1 (binary F1 for two classes, macro F1 for more)."""
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
    loss = F.cross_entropy(out["logits"], out["labels"]).item()
    predictions = out["logits"].argmax(dim=-1).tolist()
    metrics = compute_metrics(predictions, out["labels"].tolist(), num_labels)
    return {"loss": loss, **metrics}


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
        train_data, eval_data, columns, label_names = load_data(args)
    tokenizer = common.from_pretrained(AutoTokenizer.from_pretrained, args.model_name_or_path, "tokenizer")
    config = common.from_pretrained(AutoConfig.from_pretrained, args.model_name_or_path, "model configuration")
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions and args.max_seq_length > max_positions:
        accelerator.print(f"note: the model has {max_positions} positions; using --max_seq_length {max_positions}")
        args.max_seq_length = max_positions
    if tokenizer.pad_token is None:  # GPT-style models have no padding token
        tokenizer.pad_token = tokenizer.eos_token

    def tokenize(batch):
        texts = [batch[c] for c in columns]
        return tokenizer(*texts, truncation=True, max_length=args.max_seq_length)

    with accelerator.main_process_first():
        keep = ["label"]
        train_data = train_data.map(
            tokenize, batched=True, remove_columns=[c for c in train_data.column_names if c not in keep]
        )
        eval_tokenized = eval_data.map(
            tokenize, batched=True, remove_columns=[c for c in eval_data.column_names if c not in keep]
        )
    train_data = train_data.rename_column("label", "labels")
    eval_tokenized = eval_tokenized.rename_column("label", "labels")

    # Multiples of 8 let tensor cores work on GPUs under mixed precision.
    pad_to = 8 if accelerator.mixed_precision != "no" else None
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to)
    if args.pad_to_max_length:  # fixed shapes (what TPUs want), at the cost of computing on padding
        collator = DataCollatorWithPadding(tokenizer, padding="max_length", max_length=args.max_seq_length)
    loader_options = common.loader_options(args, accelerator.device)
    if args.group_by_length and not args.pad_to_max_length:
        # Sizes are per batch of all processes together: each process gets one of similar lengths.
        batch_size = args.per_device_train_batch_size * accelerator.num_processes
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

    # Model
    num_labels = len(label_names)
    model = common.from_pretrained(
        lambda name: AutoModelForSequenceClassification.from_pretrained(
            name,
            num_labels=num_labels,
            id2label=dict(enumerate(label_names)),
            label2id={label: i for i, label in enumerate(label_names)},
        ),
        args.model_name_or_path,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    accelerator.print(f"{args.model_name_or_path}: {common.params_summary(model)}, {num_labels} labels")

    if args.eval_only:
        model, eval_dataloader = accelerator.prepare(model, eval_dataloader)
        metrics = run_evaluation(accelerator, model, eval_dataloader, num_labels)
        accelerator.print(f"eval: {format_metrics(metrics)}")
        if accelerator.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            common.write_json(output_dir / "eval_results.json", metrics)
        return metrics

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
    fingerprint = {
        k: getattr(args, k)
        for k in (
            "model_name_or_path",
            "train_file",
            "dataset_name",
            "dataset_config_name",
            "max_train_samples",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "seed",
            "max_seq_length",
            "group_by_length",
        )
    }
    fingerprint["labels"] = label_names
    checkpointer = common.Checkpointer(accelerator, output_dir, args, fingerprint)
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
        accelerator.print(
            f"Training {len(train_data)} examples for {num_epochs} epochs, {total_steps} optimizer "
            f"steps ({steps_per_epoch} per epoch), on {accelerator.num_processes} process(es), "
            f"{accelerator.device}, mixed precision: {accelerator.mixed_precision}"
        )

    progress_bar = tqdm(total=total_steps, initial=state.completed_steps, disable=not accelerator.is_main_process)
    throughput = common.Throughput(accelerator, model, args.max_seq_length)
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
    names = classifier.model.config.id2label
    if len(columns) == 2:
        inputs = [{"text": r["sentence1"], "text_pair": r["sentence2"]} for r in rows]
    else:
        inputs = [r["text"] for r in rows]
    print("\nA few validation examples (predicted / true):")
    for row, pred in zip(rows, classifier(inputs, truncation=True)):
        text = " ||| ".join(str(row[c]) for c in columns)
        short = text if len(text) <= 90 else text[:87] + "..."
        print(f"  {pred['label']:>10} / {names[row['label']]:<10} {short}")


def main(argv=None):
    args = parse_args(argv)
    return common.run(train, args)


if __name__ == "__main__":
    main()
