"""The language models' text, of any size: lines from local files or the hub (held-out validation
text when there is none), read once by the first process, tokenized once into token files (or,
with --streaming, as training reads on).

Tests (in tests/, unless named otherwise):
- test_finetune_gpt2.py (packing, validation split, streaming)
- test_every_script.py::test_a_stream_that_gives_no_sample_is_refused_before_training
- test_pretrain_mlm.py (line by line, packed)
- test_scale_out.py::test_processes_wait_for_long_tokenizing_outside_collectives"""

import datasets
from accelerate import PartialState

from machinery.data_files import input_files, load_hub_dataset
from machinery.errors import UserError
from machinery.streaming import StreamedBlocks
from machinery.token_files import TokenSamples, tokenize_to_file
from machinery.waits import main_process_first

TEXTS = (".txt", ".raw", ".text")  # extensions of plain text files


def load_texts(args, accelerator, keep_linebreaks=True):
    """The training, validation and (--test_file, else None) test text, read by the main process
    first: the others then read its cache."""
    with main_process_first(accelerator):
        train, validation = load_text_data(args, keep_linebreaks)
        test = None
        if args.test_file:  # held-out text, scored with best/ after training
            test = load_text_files(args.test_file, "--test_file", keep_linebreaks, args.streaming)
    return train, validation, test


def load_text_data(args, keep_linebreaks=True):
    """Train and validation data sets with one `text` row per line, from local files (globs
    allowed) or the hub. keep_linebreaks leaves each line's "\\n", as WikiText has it, so packed
    text keeps its lines. Without validation text, the last --validation_split_percentage of the
    lines are held out (contiguous, not interleaved). --streaming: see stream_splits."""
    streaming = args.streaming
    if args.train_file:
        train = load_text_files(args.train_file, "--train_file", keep_linebreaks, streaming)
        validation = None
        if args.validation_file:
            validation = load_text_files(args.validation_file, "--validation_file", keep_linebreaks, streaming)
    else:
        train, validation = load_hub_dataset(args.dataset_name, args.dataset_config_name, streaming)
    if streaming:
        return stream_splits(args, train, validation)
    if validation is None:
        if len(train) < 2:
            raise UserError("the training text has fewer than 2 lines: too little to hold out validation text")
        n = len(train) - max(1, len(train) * args.validation_split_percentage // 100)
        train, validation = train.select(range(n)), train.select(range(n, len(train)))
    for split, data, source in (("train", train, args.train_file), ("validation", validation, args.validation_file)):
        if not has_text(data):
            raise UserError(f"{source or args.train_file or args.dataset_name}: the {split} text is empty; add text")
    if args.max_train_samples:
        train = train.take(args.max_train_samples)
    if args.max_eval_samples:
        validation = validation.take(args.max_eval_samples)
    return train, validation


def load_text_files(pattern, flag, keep_linebreaks, streaming=False):
    """The lines of local text files (`pattern`: a file or a glob, given as `flag`), one `text`
    row each; with `streaming`, read as training goes rather than all before it starts."""
    files = input_files(pattern, flag, TEXTS)
    return datasets.load_dataset(
        "text", data_files=files, split="train", keep_linebreaks=keep_linebreaks, streaming=streaming
    )


def stream_splits(args, train, validation):
    """--streaming: the training lines as they are read (a datasets IterableDataset), for text
    larger than the disk, and the first --max_eval_samples validation lines (10,000 unless
    given), which evaluation reads into memory. (check_args has made sure of --max_train_steps.)"""
    if validation is None:  # a percentage of a stream of unknown length cannot be held out
        raise UserError(
            "--streaming cannot hold out --validation_split_percentage of a stream: pass --validation_file, or a data "
            "set with a validation split"
        )
    if args.max_train_samples:
        train = train.take(args.max_train_samples)
    if not args.max_eval_samples:
        PartialState().print(
            "note: --streaming evaluates on the first 10,000 validation lines; --max_eval_samples sets another number"
        )
    return train, validation.take(args.max_eval_samples or 10_000)


def has_text(data):
    """Whether any line holds more than white space; read a batch at a time (never the whole text
    at once)."""
    for batch in data.iter(batch_size=10_000):
        for line in batch["text"]:
            if line.strip():
                return True
    return False


def language_model_samples(args, accelerator, texts, make_samples, what):
    """`make_samples(text, split_name)` of the training, validation and test `texts` (load_texts';
    no training samples with --eval_only, no test samples without test text), made by each
    machine's first process (the others then read its token files), and a line saying how many
    `what` (samples of how many tokens) there are."""
    train_text, eval_text, test_text = texts
    train, test = None, None
    with main_process_first(accelerator, local=True):
        if not args.eval_only:
            train = make_samples(train_text, "training")
        validation = make_samples(eval_text, "validation")
        if test_text is not None:
            test = make_samples(test_text, "test")
    training = "no"  # (--eval_only)
    if train is not None:
        training = "streamed" if args.streaming else f"{len(train):,}"  # (a stream's length is not known)
    accelerator.print(f"{training} training and {len(validation):,} validation {what}")
    return train, validation, test


def token_samples(texts, tokenize, tokenizer, args, split_name, recipe, block_size=None, special_ids=None):
    """A split's samples (TokenSamples), from the token file of `texts` (see tokenize_to_file),
    or with --streaming made as training reads on (StreamedBlocks; the validation and test
    samples are read once, into memory: the validation lines are at most --max_eval_samples)."""
    if args.streaming:
        samples = StreamedBlocks(texts, tokenize, block_size, special_ids)
        if split_name != "training":
            samples = list(samples)  # read once, into memory
        # The training stream is read up to its first sample now: with none, each epoch would end
        # at once and the next begin, forever. (A token file's emptiness is the script's to say.)
        if next(iter(samples), None) is None:
            raise UserError(f"the {split_name} text is too short for one sample; add text, or make the samples shorter")
        return samples
    token_file = tokenize_to_file(texts, tokenize, tokenizer, args, split_name, recipe)
    return TokenSamples(token_file, block_size, special_ids)
