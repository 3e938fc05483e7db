"""A corpus tokenized once into one flat token file on disk (nanoGPT's prepare.py), read through
np.memmap: memory stays flat however large the text, a re-run starts at once, a kill while
writing leaves no file that opens, and writers on several machines sharing a cache leave each
other alone.

Tests (in tests/, unless named otherwise):
- test_every_script.py::test_a_kill_while_writing_tokens_and_a_damaged_token_file_are_made_again
- test_common.py::test_token_file_writers_leave_each_other_alone
- test_common.py::test_tokenizing_maps_into_files_of_its_own
- test_finetune_gpt2.py::test_packing_loses_only_the_final_partial_block
- bench/bench_data_scale.py"""

import contextlib
import hashlib
import json
import os
import socket
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from accelerate import PartialState

from machinery.output_lock import process_exists


def tokenize_to_file(texts, tokenize, tokenizer, args, what, recipe):
    """The TokenFile of `texts` (a `text` column): `tokenize(list of lines)` -> the token ids of
    each line (fewer lists to drop lines). Made once, on --preprocessing_num_workers processes,
    and found again by what determines its content: the text (the data set's fingerprint, which
    changes with the files), the tokenizer and the `recipe`. It lives beside the datasets cache
    (HF_DATASETS_CACHE), which each machine has its own of."""
    key = [texts._fingerprint, tokenizer_fingerprint(tokenizer), recipe]
    name = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]
    token_file = TokenFile(Path(datasets.config.HF_DATASETS_CACHE) / "lm-tokens" / name)
    token_file.tokens_path.parent.mkdir(parents=True, exist_ok=True)
    if token_file.open():
        PartialState().print(f"Tokens of the {what} text: {token_file.num_tokens:,}, from {token_file.tokens_path}")
        return token_file

    def encode(batch):
        return {"input_ids": tokenize(batch["text"])}

    # The ids are stored as the token file will hold them (uint16 for most vocabularies): half
    # the disk of datasets' default int32, for the moment both exist.
    ids = datasets.Value(np.dtype(token_dtype(len(tokenizer))).name)
    features = datasets.Features({"input_ids": datasets.List(ids)})
    started, workers = time.perf_counter(), min(preprocessing_workers(args), max(1, len(texts)))
    text_bytes = texts.data.nbytes  # the text as Arrow holds it, about its size in UTF-8
    # A worker is one process tokenizing on one thread, so N workers use N cores. The fast
    # tokenizer's own threads are switched off meanwhile: they do not mix with forked worker
    # processes, and they would make one "worker" quietly use every core.
    threads = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # The mapped data goes to files of this writer's own, beside the token file: in a cache shared
    # by several machines, another one's files may be read or deleted while it maps the same text.
    cache_file = token_file.tokens_path.with_name(f"{writer_prefix()}{name}.map.arrow")
    try:
        encoded = texts.map(
            encode, batched=True, num_proc=workers if workers > 1 else None, remove_columns=texts.column_names,
            features=features, desc=f"Tokenizing the {what} text ({workers} process{'es' if workers > 1 else ''})",
            cache_file_name=str(cache_file),
        )  # fmt: skip
    finally:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
        if threads is not None:
            os.environ["TOKENIZERS_PARALLELISM"] = threads
    token_file.write(encoded, len(tokenizer))
    for cache in encoded.cache_files:  # the token file has it all now: free the disk
        with contextlib.suppress(OSError):
            os.remove(cache["filename"])
    seconds = time.perf_counter() - started
    print(
        f"Tokenized the {what} text: {token_file.num_tokens:,} tokens from {text_bytes / 1e6:,.1f} MB in "
        f"{seconds:.1f} s ({text_bytes / 1e6 / seconds:.2f} MB/s, {workers} worker(s)); in {token_file.tokens_path}"
    )
    return token_file


def preprocessing_workers(args):
    """--preprocessing_num_workers, else every core this process may use."""
    if args.preprocessing_num_workers:
        return args.preprocessing_num_workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class TokenFile:
    """Every token of a text, one line after the other, in one flat array on disk (uint16 where
    the vocabulary fits, else uint32), as nanoGPT's prepare.py writes a corpus: training reads
    slices of it through np.memmap, so memory stays flat however large the text, and a re-run of
    the same command finds it and starts at once. Two .npy files: <name>.lines.npy, where each
    line starts, and <name>.tokens.npy. Both are filled under temporary names and renamed when
    whole, the tokens last, so a kill while writing leaves no token file that opens; and since a
    .npy header holds the array's length, a file cut short later does not open either."""

    def __init__(self, path):
        self.name = Path(path).name
        self.tokens_path, self.lines_path = Path(f"{path}.tokens.npy"), Path(f"{path}.lines.npy")
        self.tokens, self.line_starts = None, None

    def open(self):
        """Open both arrays, as np.memmap; False if either is missing or cut short (then it is
        made again)."""
        try:
            self.line_starts = np.load(self.lines_path, mmap_mode="r")  # where each line starts, then the end
            self.tokens = np.load(self.tokens_path, mmap_mode="r")  # slicing reads only that slice
        except (OSError, ValueError):
            return False
        return True

    @property
    def num_tokens(self):
        return len(self.tokens)

    def __getstate__(self):  # a DataLoader worker opens the files itself, rather than copying their contents
        return {**self.__dict__, "tokens": None, "line_starts": None}

    def __setstate__(self, state):
        self.__dict__ = state
        self.open()

    def write(self, encoded, vocabulary_size):
        """The `input_ids` of a mapped data set, in order, a batch of lines at a time (never the
        whole text)."""
        folder = self.tokens_path.parent
        folder.mkdir(parents=True, exist_ok=True)
        remove_killed_writers(folder, self.name)
        # How many tokens: the sum of the lines' lengths, which Arrow keeps apart from the ids
        # themselves (the list offsets): counted without reading the ids.
        total = pc.sum(pc.list_value_length(encoded.data.column("input_ids"))).as_py() or 0
        dtype = token_dtype(vocabulary_size)
        tmp = {path: path.with_name(f"{writer_prefix()}{path.name}") for path in (self.lines_path, self.tokens_path)}
        starts = np.lib.format.open_memmap(tmp[self.lines_path], mode="w+", dtype=np.int64, shape=(len(encoded) + 1,))
        tokens = np.lib.format.open_memmap(tmp[self.tokens_path], mode="w+", dtype=dtype, shape=(total,))
        position, line = 0, 0
        for batch in encoded.select_columns(["input_ids"]).with_format("arrow").iter(batch_size=10_000):
            column = batch.column("input_ids").combine_chunks()  # a list of ids per line
            values = column.flatten().to_numpy()  # all of them in one array, without a copy
            tokens[position : position + len(values)] = values
            lengths = np.diff(column.offsets.to_numpy())
            starts[line + 1 : line + 1 + len(lengths)] = position + np.cumsum(lengths)
            position, line = position + len(values), line + len(lengths)
        for array in (starts, tokens):
            array.flush()
        del starts, tokens
        for path, written in tmp.items():  # the line starts, then the tokens: a token file that opens is whole
            os.replace(written, path)
        self.open()


def writer_prefix():
    """Temporary files are named for their writer, `.tmp-<pid>@<host>-`: the datasets cache (and
    the token files in it) may be shared by several machines (an NFS home), whose first processes
    all write the same token file at once."""
    return f".tmp-{os.getpid()}@{socket.gethostname()}-"


def remove_killed_writers(folder, name):
    """Remove the temporary files of `name` that a killed writer left: one of this machine whose
    process is gone, or one of another machine untouched for a day (a live writer's files change
    as it writes; its process cannot be looked up from here)."""
    for old in folder.glob(f".tmp-*-{name}.*"):
        pid, _, rest = old.name.removeprefix(".tmp-").partition("@")
        host = rest[: rest.find(f"-{name}.")]
        with contextlib.suppress(OSError):
            if host == socket.gethostname():
                killed = pid == str(os.getpid()) or not process_exists(pid)
            else:
                killed = time.time() - old.stat().st_mtime > 24 * 3600
            if killed:
                old.unlink()


def token_dtype(vocabulary_size):
    """Two bytes a token where the vocabulary fits (GPT-2's 50,257 does), else four."""
    return np.uint16 if vocabulary_size <= 2**16 else np.uint32


def tokenizer_fingerprint(tokenizer):
    """What makes a tokenizer's ids: its class and its vocabulary, merges and rules
    (tokenizer.json)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}{rules}".encode()).hexdigest()


class TokenSamples(torch.utils.data.Dataset):
    """Training samples read from a TokenFile: blocks of exactly `block_size` tokens cut from the
    one stream (only the final partial block is left out: no padding, every position a
    prediction), or each line as it was tokenized (block_size None). `special_ids`: also give the
    attention mask and which tokens are special (never masked)."""

    def __init__(self, token_file, block_size=None, special_ids=None):
        self.token_file, self.block_size = token_file, block_size
        self.special_ids = None if special_ids is None else np.array(sorted(special_ids))

    def __len__(self):
        if self.block_size:
            return self.token_file.num_tokens // self.block_size
        return len(self.token_file.line_starts) - 1

    def __getitem__(self, index):
        if self.block_size:
            start, end = index * self.block_size, (index + 1) * self.block_size
        else:
            start, end = self.token_file.line_starts[index : index + 2]
        return lm_sample(self.token_file.tokens[start:end], self.special_ids)


def lm_sample(ids, special_ids=None):
    """A language model's sample: its token ids; with `special_ids`, also its attention mask (all
    ones: nothing is padding) and which tokens are special (masking leaves those alone)."""
    ids = np.asarray(ids, dtype=np.int64)
    sample = {"input_ids": torch.from_numpy(ids)}
    if special_ids is not None:
        sample["attention_mask"] = torch.ones_like(sample["input_ids"])
        sample["special_tokens_mask"] = torch.from_numpy(np.isin(ids, special_ids).astype(np.int64))
    return sample
