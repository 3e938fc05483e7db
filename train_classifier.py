"""Fine-tune a pretrained encoder for sentence or sentence-pair classification (or regression).

    python train_classifier.py                                    # bert-base-uncased on GLUE MRPC
    python train_classifier.py --train_file train.tsv --validation_file dev.tsv   # a GLUE task's
    python train_classifier.py --train_file reviews.csv --text_columns review --label_column stars
    accelerate launch train_classifier.py ...                     # any number of GPUs or TPU cores

Local data is CSV, TSV or JSON lines; the text and label columns are found by name (GLUE's among
them: machinery/columns.py) or given by flag. Labels with fractions (STS-B's scores) make a
regression. Re-running the same command continues from the newest checkpoint in --output_dir; the
best model (by --metric_for_best_model) is exported to <output_dir>/best, and --test_file rows are
predicted with it into <output_dir>/predictions.tsv, in GLUE's submission layout."""

import argparse
from pathlib import Path

import torch.nn.functional as F
from accelerate import PartialState  # print() on the main process only, from anywhere
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, pipeline
from transformers.optimization import get_scheduler
from transformers.trainer_pt_utils import get_length_grouped_indices

import common
from machinery import engines, evaluation, flags, throughput, xla
from machinery.columns import load_data, load_test_data, submission_labels
from machinery.data_files import from_pretrained
from machinery.errors import UserError
from machinery.sampling import EpochSampler, global_batch_size
from machinery.waits import main_process_first

MAY_CHANGE = ["do_predict"]  # flags that may change on resume, besides the shared ones
ABOUT = {"pipeline_tag": "text-classification", "task": "classifying sentences or sentence pairs"}  # model card
# What each metric is without the hub: the same numbers as `evaluate`'s.
METRICS = {
    "accuracy": lambda predictions, references: {"accuracy": float(accuracy_score(references, predictions))},
    "f1": lambda predictions, references, average: {"f1": float(f1_score(references, predictions, average=average))},
    "pearsonr": lambda predictions, references: {"pearsonr": float(pearsonr(references, predictions)[0])},
    "spearmanr": lambda predictions, references: {"spearmanr": float(spearmanr(references, predictions)[0])},
}


def parse_args(argv=None):
    glue_mrpc = {"dataset_name": "nyu-mll/glue", "dataset_config_name": "mrpc"}
    parser = flags.build_parser(__doc__, model_name_or_path="bert-base-uncased", **glue_mrpc)
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
        raise UserError(
            "--streaming is for the language models' text; the classifier reads its rows whole (to find the labels "
            "and group lengths): drop --streaming"
        )
    return args


def train(args):
    accelerator = common.setup(args, "train_classifier")  # the device, its precision, the processes
    with main_process_first(accelerator):  # the main process reads the data; the others read its cache
        # Text column(s), `label` (renamed; other columns dropped), label names (None: regression).
        train_data, eval_data, columns, label_column, label_names = load_data(args)
        test_data = load_test_data(args, columns)  # (rows, text columns, id column), checked now, or None
    metric = choose_metric(args, label_names)
    tokenizer, model, max_seq_length = load_model(args, label_names)
    train_dataloader, eval_dataloader = get_dataloaders(
        args, accelerator, tokenizer, train_data, eval_data, columns, max_seq_length
    )
    if args.eval_only:  # no training: the model as it is, on the validation data (and the test rows predicted)
        return evaluate_only(args, accelerator, model, tokenizer, eval_dataloader, test_data)

    steps = common.count_steps(args, accelerator, train_dataloader)  # optimizer steps: per epoch, in all
    optimizer = common.make_optimizer(model, args, accelerator.device)
    lr_scheduler = get_scheduler(args.lr_scheduler_type, optimizer, args.num_warmup_steps, steps.total)
    flops = throughput.flops_per_token(model, max_seq_length)  # counted now: prepare() may split the weights
    engines.set_fsdp_units(accelerator, model)  # FSDP only: which layers it shards as units
    # One call for all: an engine (DDP, FSDP, DeepSpeed) wraps the model, its optimizer and its
    # schedule together, and each dataloader learns to give each process its share of every batch.
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler
    )
    # Resuming a checkpoint of other flags, columns or labels is refused: its head would not fit.
    data = {"columns": [*columns, label_column], "labels": label_names}
    checkpoints = common.Checkpoints(accelerator, args, data, MAY_CHANGE)
    best = common.BestModel(accelerator, args, model, tokenizer, metric, ABOUT)  # best/: by --metric_for_best_model
    state = checkpoints.resume()  # the newest whole checkpoint (made with other settings: refused), or step 0
    progress = common.Progress(accelerator, args, state, steps, flops)  # the plan, the bar, the logs
    common.catch_stop_signals()  # from here on, SIGTERM and Ctrl-C ask the loop to save, then stop

    while not common.finished(state, steps):  # the same in each script but for lines marked "this script"
        model.train()  # dropout on (the evaluation turns it off)
        train_dataloader.set_epoch(state.epoch)  # the epoch's order depends only on the seed and the epoch
        batches = common.EpochBatches(accelerator, train_dataloader, state, steps, args.seed)  # this script: as is
        train_one_epoch(args, accelerator, model, optimizer, lr_scheduler, batches, state, checkpoints, progress)
        if batches.ran_out:  # all the epoch's batches were used (--max_train_steps may end a run mid-epoch)
            state.start_next_epoch()
        with progress.paused():  # evaluating and saving are not training: left out of tokens/s
            metrics = run_evaluation(accelerator, model, eval_dataloader)  # this script: its metrics
            progress.log_evaluation(metrics)
            best.keep_if_better(state, metrics)  # exports best/ when the metric improves
            common.stop_early_if_stuck(accelerator, args, state, best.metric_name)  # ends the while if so
            state.evaluated_step = state.completed_steps  # in the checkpoint: this step is evaluated
            checkpoints.save(state)
        common.stop_if_signalled(accelerator, state)  # SIGTERM or Ctrl-C came meanwhile: saved, now stop

    progress.bar.close()
    common.finish(accelerator, args, state, best)  # log_history.json, loss.png, best/'s card
    if accelerator.is_main_process:  # the demo, once: best/ loaded as users load it
        classifier = load_classifier(str(best.dir), None, xla.pipeline_device(accelerator))
        if test_data is not None:  # this script: the test rows predicted, not scored (they have no labels)
            write_predictions(args, test_data, classifier)
        show_predictions(classifier, eval_data, columns)
    return state


def train_one_epoch(args, accelerator, model, optimizer, lr_scheduler, batches, state, checkpoints, progress):
    """The rest of one epoch, and each optimizer step's bookkeeping. Lines marked "this script"
    are the only ones that differ between the three scripts' loops."""
    for batch in batches:
        with accelerator.accumulate(model):  # an optimizer step every --gradient_accumulation_steps
            outputs = model(**batch)  # this script: the batch holds the labels
            accelerator.backward(outputs.loss)  # scaled for fp16, divided over the accumulated batches
            if accelerator.sync_gradients and args.max_grad_norm:  # a step's last batch: gradients whole
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            # accumulate() makes step() and zero_grad() act on each step's last batch only.
            # The schedule is ours to keep: once per optimizer step, not when fp16 skipped one.
            optimizer.step()
            if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                lr_scheduler.step()
            optimizer.zero_grad()
        state.batch_in_epoch += 1  # a resumed run skips the batches counted here
        progress.add_batch(outputs.loss, batch["attention_mask"].sum())  # this script: real tokens, not padding
        if not accelerator.sync_gradients:
            continue  # a micro-batch of an accumulation: no optimizer step yet
        state.completed_steps += 1
        progress.log_if_due(lr_scheduler)  # the bar moves; the loss is logged every --logging_steps
        if checkpoints.due(state):  # every --checkpointing_steps, --save_every_minutes, or on a signal
            with progress.paused():  # saving is not training either
                checkpoints.save(state)
            common.stop_if_signalled(accelerator, state)  # SIGTERM or Ctrl-C: saved, now stop


def evaluate_only(args, accelerator, model, tokenizer, eval_dataloader, test_data):
    """--eval_only: the model as it is (prepared there) on the validation data, its metrics in
    eval_results.json; the test rows predicted by it."""
    metrics = evaluation.evaluate_only(accelerator, args, model, run_evaluation, eval_dataloader)
    if test_data is not None and accelerator.is_main_process:  # by the model just evaluated
        classifier = load_classifier(model, tokenizer, xla.pipeline_device(accelerator))
        write_predictions(args, test_data, classifier)
    return metrics


def choose_metric(args, label_names):
    """The evaluation metric that picks best/: --metric_for_best_model, else accuracy (pearsonr
    for a regression)."""
    allowed = ["accuracy", "f1", "loss"] if label_names else ["pearsonr", "spearmanr", "loss"]
    metric = args.metric_for_best_model or allowed[0]
    if metric not in allowed:
        kind = "classification" if label_names else "a regression (labels with fractions)"
        raise UserError(f"--metric_for_best_model {metric} does not apply to {kind}; use {', '.join(allowed)}")
    return metric


def load_model(args, label_names):
    """The tokenizer; the pretrained encoder with a new head (one output per label, or one for a
    regression); and the sequence length: --max_seq_length, or the model's positions if it has
    fewer."""
    tokenizer = from_pretrained(AutoTokenizer, args.model_name_or_path, "tokenizer")
    if tokenizer.pad_token is None:  # GPT-style models have no padding token
        tokenizer.pad_token = tokenizer.eos_token
    if label_names:
        head = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names))}
        head["label2id"] = {name: i for i, name in enumerate(label_names)}
    else:
        head = {"num_labels": 1, "problem_type": "regression"}
    model = from_pretrained(AutoModelForSequenceClassification, args.model_name_or_path, **head)
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
    with main_process_first(accelerator):  # the main process tokenizes; the others read its cache
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
        batch = global_batch_size(args, accelerator)
        sampler = LengthGroupedSampler([len(ids) for ids in train_data["input_ids"]], batch, args.seed)
    return common.make_dataloaders(args, accelerator, collator, train_data, eval_data, sampler=sampler)[:2]


class LengthGroupedSampler(EpochSampler):
    """EpochSampler (each epoch's order from (seed, epoch) alone, padded to whole global batches),
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

    out = common.eval_loop(accelerator, model, eval_dataloader, per_example)
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
        compute = evaluation.load_metric(name, METRICS[name])
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
    per test row in file order, each label as the training data (or GLUE: submission_labels)
    spells it, a number for a regression. Written under a temporary name, then renamed."""
    test, columns, index = test_data
    regression = classifier.model.config.problem_type == "regression"
    spelling = submission_labels(args, classifier.model.config)  # label -> as predictions.tsv writes it
    outputs = classifier(pipeline_inputs(test, columns), batch_size=args.per_device_eval_batch_size)
    path = Path(args.output_dir) / "predictions.tsv"
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("index\tprediction\n")
        for number, (row, output) in enumerate(zip(test, outputs)):
            prediction = f"{output['score']:.4f}" if regression else spelling[output["label"]]
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
    return common.run_script(train, parse_args, argv)


if __name__ == "__main__":
    main()
