"""Data and models from where users keep them: local files (a path or a glob, each checked to be a
non- empty UTF-8 file of a known kind), hub data sets and models, folders saved with
save_to_disk, each failure one line that names the flag to fix.

Tests (in tests/, unless named otherwise):
- test_every_script.py::test_bad_input_sweep
- test_real_inputs.py (GLUE's files as GLUE writes them, every GLUE task from the hub)"""

import glob
from pathlib import Path

import datasets

from machinery.errors import UserError, first_line

VALIDATION_SPLITS = ("validation", "validation_matched", "valid", "dev")  # MNLI: validation_matched


TEST_SPLITS = ("test", "test_matched")


def input_files(pattern, flag, extensions):
    """The files a data flag names (a path or a glob: "books/*.txt"), each non-empty UTF-8 with
    one of `extensions`."""
    paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [Path(pattern)]
    if not paths:
        raise UserError(f"file not found: no file matches {pattern}; check the path or pattern given to {flag}")
    for path in paths:
        if path.is_dir():
            raise UserError(f"{flag} {path} is a directory, not a file; pass the file (a glob like '{path}/*' works)")
        if not path.is_file():
            raise UserError(f"file not found: {path}; check the path given to {flag}")
        if path.suffix.lower() not in extensions:
            raise UserError(f"{flag} {path}: unsupported extension '{path.suffix}'; use one of {', '.join(extensions)}")
        if path.stat().st_size == 0:
            raise UserError(f"{flag} {path} is empty; give it some data")
        check_utf8(path, flag)
    return [str(p) for p in paths]


def check_utf8(path, flag):
    """Text must be UTF-8; say where it is not (a Latin-1 or Windows-1252 file, usually)."""
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):  # line by line: b"\n" is never part of a longer UTF-8 character
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(
                    f"{flag} {path} is not UTF-8 text (byte 0x{line[err.start]:02x} at offset {offset + err.start}, "
                    f"line {number}); convert it, e.g. `iconv -f latin1 -t utf-8 {path.name} > utf8.txt`"
                ) from None
            offset += len(line)


def from_pretrained(auto_class, name, what="model", **options):
    """`auto_class.from_pretrained(name, **options)` (an AutoModel... or AutoTokenizer), with one
    clear line when `name` is neither a model folder nor a hub name that can be reached."""
    try:
        return auto_class.from_pretrained(name, **options)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(
            f"--model_name_or_path {name}: cannot load a {what} from it ({first_line(err)}); pass a hub name, "
            "or a folder saved with save_pretrained (config.json, weights and tokenizer files)"
        ) from None


def load_hub_splits(name, config_name=None, streaming=False):
    """Every split of a hub data set or of a folder saved with `save_to_disk` (a DatasetDict);
    one clear line when it cannot be had."""
    try:
        saved = (Path(name) / "dataset_dict.json").exists()  # a folder written by save_to_disk
        if not saved:
            return datasets.load_dataset(name, config_name, streaming=streaming)
        raw = datasets.load_from_disk(name)
    except (OSError, ValueError) as err:  # OSError: FileNotFoundError and network errors
        raise UserError(
            f"--dataset_name {name}: cannot load it ({first_line(err)}); check the name and the network, "
            "or pass local files with --train_file and --validation_file"
        ) from None
    if streaming:
        return datasets.IterableDatasetDict({split: data.to_iterable_dataset() for split, data in raw.items()})
    return raw


def load_hub_dataset(name, config_name=None, streaming=False):
    """The train split and the validation split (None if there is none) of a hub data set or of a
    folder saved with `save_to_disk`."""
    raw = load_hub_splits(name, config_name, streaming)
    if "train" not in raw:
        raise UserError(f"--dataset_name {name} has no 'train' split (it has {list(raw)}); pass local files instead")
    return raw["train"], next((raw[split] for split in VALIDATION_SPLITS if split in raw), None)


def load_hub_test_split(name, config_name=None):
    """The test split of a hub data set (MNLI: test_matched), or a clear line that it has none."""
    raw = load_hub_splits(name, config_name)
    for split in TEST_SPLITS:
        if split in raw:
            return raw[split]
    raise UserError(f"--do_predict: --dataset_name {name} has no 'test' split (it has {list(raw)}); pass --test_file")
