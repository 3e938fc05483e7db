"""What the three training scripts share, written once.

Read a script first (train_classifier.py is the shortest): it shows the training
loop. This module holds what sits around every loop and is the same in each:

- the command-line flags they all take (named as in Hugging Face's examples),
- where outputs go (a local folder, or Google Drive inside Colab),
- the Accelerator: device, mixed precision, processes, gradient accumulation,
- checkpoints: atomic saves, automatic exact resume, rotation, signals,
- the evaluation loop, metrics, throughput and logging,
- clear one-line errors for bad input.

Nothing here knows about a particular script's model or data.
"""

import argparse
import atexit
import codecs
import contextlib
import errno
import glob
import json
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import DistributedType, broadcast_object_list, set_seed
from accelerate.utils import load as accelerate_load

# Colab mounts Google Drive here; outputs default to a folder inside it.
DRIVE_MOUNT = "/content/drive"
DRIVE_ROOT = f"{DRIVE_MOUNT}/MyDrive"
DRIVE_FOLDER = "lm-training"

CHECKPOINTS = "checkpoints"
STATE_FILE = "training_state.json"  # written last: a checkpoint without it is incomplete
LOCK_FILE = ".lock"  # in --output_dir while a run uses it


# ---------------------------------------------------------------------------
# User errors: one line, exit code 2, no traceback.
# ---------------------------------------------------------------------------


class UserError(Exception):
    """Bad input or a bad setting: the message names the problem and the fix."""


# Errors of the disk, not of the program: a full disk or Drive quota, a read-only place.
STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def run(train_fn, args):
    """Call train_fn(args); turn a UserError (or a full or unwritable disk) into one line
    on stderr and exit code 2. The output folder's lock is released however it ends."""
    try:
        return train_fn(args)
    except UserError as err:
        user_error(str(err))
    except OSError as err:
        if err.errno not in STORAGE_ERRORS:
            raise
        user_error(
            f"cannot write {err.filename or 'the output'} ({err.strerror}); free some space or pass "
            "another --output_dir, then run the same command again (complete checkpoints are intact)"
        )
    finally:
        OutputLock.release_held()
        restore_signal_handlers()


# What SIGTERM and SIGINT did before a run caught them, to give back when it ends: a
# notebook that calls main() keeps its own Ctrl-C ("interrupt the kernel") afterwards.
PREVIOUS_SIGNAL_HANDLERS = {}


def restore_signal_handlers():
    while PREVIOUS_SIGNAL_HANDLERS:
        sig, handler = PREVIOUS_SIGNAL_HANDLERS.popitem()
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def main_print(*args):
    """print() on the main process only, from anywhere once the Accelerator exists."""
    PartialState().print(*args)


def user_error(message):
    from tqdm.auto import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()  # so the message starts on a line of its own
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2) from None


# ---------------------------------------------------------------------------
# Flags every script takes.
# ---------------------------------------------------------------------------


def build_parser(description):
    """The shared flags. Each script adds its own and sets its defaults."""
    p = argparse.ArgumentParser(description=description)
    a = p.add_argument
    a("--model_name_or_path", help="hub name or local directory of the model to start from")
    a("--dataset_name", help="hub data set (used when no --train_file is given)")
    a("--dataset_config_name", help="configuration of --dataset_name")
    a("--train_file", help="local training file")
    a("--validation_file", help="local validation file")
    a(
        "--validation_split_percentage",
        type=int,
        default=10,
        help="with no validation file: percent of the training data held out",
    )
    a(
        "--output_dir",
        help="where checkpoints and the model go "
        f"(default: outputs/<script>, or {DRIVE_ROOT}/{DRIVE_FOLDER}/<script> in Colab with Drive)",
    )
    a("--drive", action="store_true", help="Colab: put outputs on Google Drive (mounting it if needed)")
    a("--per_device_train_batch_size", type=int, default=8)
    a("--per_device_eval_batch_size", type=int, default=32)
    a("--learning_rate", type=float, default=5e-5)
    a("--weight_decay", type=float, default=0.0)
    a("--max_grad_norm", type=float, default=1.0, help="clip gradients to this norm (0: off)")
    a("--num_train_epochs", type=int, default=3)
    a("--max_train_steps", type=int, help="total optimizer steps; overrides --num_train_epochs")
    a("--gradient_accumulation_steps", type=int, default=1)
    a(
        "--lr_scheduler_type",
        default="linear",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
    )
    a("--num_warmup_steps", type=int, default=0, help="warmup, in optimizer steps")
    a("--seed", type=int, default=42)
    a(
        "--mixed_precision",
        default="auto",
        choices=["auto", "no", "fp16", "bf16"],
        help="auto: bf16 where supported, fp16 on older GPUs (T4), none on CPU",
    )
    a("--checkpointing_steps", type=int, default=0, help="also save every N optimizer steps (0: off)")
    a("--save_every_minutes", type=float, default=10.0, help="also save every N minutes (0: off)")
    a("--keep_last", type=int, default=2, help="how many checkpoints to keep")
    a("--resume_from_checkpoint", help="resume from this checkpoint instead of the newest one")
    a("--no_resume", action="store_true", help="start fresh, deleting the checkpoints in --output_dir")
    a("--logging_steps", type=int, default=10, help="log the training loss every N optimizer steps")
    a("--report_to", default="none", help="tensorboard, wandb, ... or all (Accelerate's trackers)")
    a(
        "--torch_compile",
        action="store_true",
        help="compile the model with torch.compile (pays off on GPUs with fixed shapes: the LM scripts' packed blocks)",
    )
    a(
        "--dataloader_num_workers",
        type=int,
        help="processes preparing batches (default: 2 on a GPU, so the GPU never waits; 0 on CPU)",
    )
    a("--max_train_samples", type=int, help="truncate the training set (quick runs)")
    a("--max_eval_samples", type=int, help="truncate the validation set (quick runs)")
    return p


def check_args(args):
    """Settings that can never work get one clear line before anything is touched."""
    positive = [
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "keep_last",
        "logging_steps",
    ]
    for name in positive:
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.max_train_steps is None and args.num_train_epochs < 1:
        raise UserError(f"--num_train_epochs must be at least 1 (got {args.num_train_epochs})")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise UserError(f"--max_train_steps must be at least 1 (got {args.max_train_steps})")
    if not 0 < args.validation_split_percentage < 100:
        raise UserError("--validation_split_percentage must be between 1 and 99")


# ---------------------------------------------------------------------------
# Where outputs go: a local folder, or Google Drive in Colab.
# ---------------------------------------------------------------------------


def in_colab():
    return "COLAB_RELEASE_TAG" in os.environ or "google.colab" in sys.modules


def mount_drive():
    """Make sure Google Drive is mounted; only Colab can do that."""
    if os.path.isdir(DRIVE_ROOT):
        return
    if not in_colab():
        raise UserError("--drive works only inside Google Colab; drop it, or pass --output_dir")
    try:
        from google.colab import drive

        drive.mount(DRIVE_MOUNT)
    except Exception:  # a `!python` subprocess cannot ask for Drive permission
        raise UserError(
            "Google Drive is not mounted: run `from google.colab import drive; "
            f"drive.mount('{DRIVE_MOUNT}')` in a notebook cell, then this command again"
        ) from None


def resolve_output_dir(args, script_name):
    """--output_dir, else a folder on Drive when in Colab with Drive mounted, else ./outputs."""
    if args.drive:
        mount_drive()
    if args.output_dir:
        return Path(args.output_dir)
    if args.drive or (in_colab() and os.path.isdir(DRIVE_ROOT)):
        return Path(DRIVE_ROOT) / DRIVE_FOLDER / script_name
    return Path("outputs") / script_name


class OutputLock:
    """One run per output folder. Two runs writing checkpoints into the same folder
    would wreck each other's, so the second one refuses to start.

    The lock is a file naming the host and process that holds it, touched every
    HEARTBEAT seconds while the run lives. A run killed with SIGKILL (or a Colab
    runtime that vanished) cannot remove it, so a lock is taken over when its process
    is gone (same machine) or its heartbeat is older than STALE seconds (another
    machine, e.g. an earlier Colab runtime writing to the same Drive folder)."""

    HEARTBEAT = 20
    STALE = 120
    held = None

    def __init__(self, output_dir):
        self.path = Path(output_dir) / LOCK_FILE
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self.stop = threading.Event()

    def acquire(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(
                f"cannot create --output_dir {self.path.parent} ({err.strerror}); pass a writable folder"
            ) from None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                self.check_holder()
                continue
            except OSError as err:
                raise UserError(
                    f"cannot write in --output_dir {self.path.parent} ({err.strerror}); pass a writable folder"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            break
        else:
            raise UserError(f"could not lock {self.path}; another run keeps taking it, or remove the file")
        OutputLock.held = self
        threading.Thread(target=self.heartbeat, daemon=True).start()
        atexit.register(OutputLock.release_held)

    def check_holder(self):
        """The lock exists: refuse if its run is alive, else remove it (taken over next try)."""
        try:
            holder = json.loads(self.path.read_text())
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile
        except (OSError, ValueError):
            holder, age = {}, time.time() - self.path.stat().st_mtime  # being written, or garbage
        same_host = holder.get("host") == self.me["host"]
        if holder == self.me:
            alive = False  # our own, left by an earlier call in this process
        elif same_host:
            alive = age < self.STALE and process_exists(holder.get("pid"))
        else:
            alive = age < self.STALE
        if alive:
            who = f"process {holder.get('pid')} on {holder.get('host')}" if holder else "another run"
            raise UserError(
                f"{self.path.parent} is in use by {who} (alive {age:.0f} s ago); wait for it to finish or stop it, "
                "or pass another --output_dir"
            )
        print(f"warning: taking over the lock of a run that is gone ({holder or 'unreadable lock'})", file=sys.stderr)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def heartbeat(self):
        while not self.stop.wait(self.HEARTBEAT):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self):
        self.stop.set()
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.path.read_text()) == self.me:
                self.path.unlink()

    @classmethod
    def release_held(cls):
        if cls.held is not None:
            cls.held.release()
            cls.held = None


def process_exists(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # exists but belongs to someone else, or unknown: assume alive
    return True


def lock_output_dir(accelerator, output_dir):
    """The main process takes the output folder's lock; every process stops if it cannot."""
    error = [None]
    if accelerator.is_main_process:
        try:
            OutputLock(output_dir).acquire()
        except UserError as err:
            error = [str(err)]
    if accelerator.num_processes > 1:
        broadcast_object_list(error)
    if error[0] is not None:
        if accelerator.is_main_process:
            raise UserError(error[0])
        raise SystemExit(2)


# ---------------------------------------------------------------------------
# Plain-text data (the language-model scripts).
# ---------------------------------------------------------------------------

TEXT_EXTENSIONS = (".txt", ".raw", ".text")


def input_files(pattern, flag, extensions):
    """The files a data flag names (a path, or a glob such as "books/*.txt"), each checked
    to be a non-empty UTF-8 file with one of `extensions`."""
    paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [Path(pattern)]
    if not paths:
        raise UserError(f"file not found: no file matches {pattern}; check the path or pattern given to {flag}")
    for path in paths:
        if path.is_dir():
            raise UserError(
                f"{flag} {path} is a directory, not a file; pass the file itself (a glob such as '{path}/*' works)"
            )
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
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                line += chunk[: err.start].count(b"\n")
                raise UserError(
                    f"{flag} {path} is not UTF-8 text (byte 0x{chunk[err.start]:02x} at offset {offset + err.start}, "
                    f"line {line}); convert it, e.g. `iconv -f latin1 -t utf-8 {path.name} > utf8.txt`"
                ) from None
            line += chunk.count(b"\n")
            offset += len(chunk)


def first_line(err, limit=200):
    """An exception's message as one short line for a one-line error; its type when the
    message is empty (some loaders raise bare exceptions)."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def from_pretrained(loader, name, what="model"):
    """`loader(name)` (an AutoModel/AutoTokenizer `from_pretrained`), with one clear line
    when `name` is neither a model directory nor a hub name that can be reached."""
    try:
        return loader(name)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(
            f"--model_name_or_path {name}: cannot load a {what} from it ({first_line(err)}); pass a hub name, "
            "or a folder saved with save_pretrained (config.json, weights and tokenizer files)"
        ) from None


# Where a hub data set keeps its validation data (MNLI: validation_matched).
VALIDATION_SPLITS = ("validation", "validation_matched", "valid", "dev")


def load_hub_dataset(name, config_name=None):
    """The train split and the validation split (None if the set has none) of
    `datasets.load_dataset(name, config_name)` (or of a folder saved with `save_to_disk`),
    with one clear line when the hub cannot be reached or has no such data set (offline,
    a typo, a missing config name)."""
    import datasets

    try:
        if (Path(name) / "dataset_dict.json").exists():  # a folder written by DatasetDict.save_to_disk
            raw = datasets.load_from_disk(name)
        else:
            raw = datasets.load_dataset(name, config_name)
    except (OSError, ValueError) as err:  # OSError: FileNotFoundError and network errors
        raise UserError(
            f"--dataset_name {name}: cannot load it ({first_line(err)}); check the name and the network, "
            "or pass local files with --train_file and --validation_file"
        ) from None
    if "train" not in raw:
        raise UserError(f"--dataset_name {name} has no 'train' split (it has {list(raw)}); pass local files instead")
    return raw["train"], next((raw[split] for split in VALIDATION_SPLITS if split in raw), None)


def load_text_data(args, keep_linebreaks=True):
    """Train and validation `datasets.Dataset`s with one `text` row per line of text:
    local files (--train_file, globs allowed), or a hub data set (--dataset_name).

    keep_linebreaks leaves the "\n" at the end of each line, as hub text sets such as
    WikiText have it, so a packed token stream keeps the text's line structure."""
    import datasets

    def load_files(pattern, flag):
        files = input_files(pattern, flag, TEXT_EXTENSIONS)
        return datasets.load_dataset("text", data_files=files, split="train", keep_linebreaks=keep_linebreaks)

    if args.train_file:
        train = load_files(args.train_file, "--train_file")
        validation = load_files(args.validation_file, "--validation_file") if args.validation_file else None
        names = {"train": args.train_file, "validation": args.validation_file or args.train_file}
    else:
        train, validation = load_hub_dataset(args.dataset_name, args.dataset_config_name)
        names = {"train": args.dataset_name, "validation": args.dataset_name}
    if validation is None:
        train, validation = split_off_validation(train, args)
    for split, data in (("train", train), ("validation", validation)):
        if not any(line.strip() for line in data["text"]):
            raise UserError(f"{names[split]}: the {split} text is empty; give it some text")
    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples:
        validation = validation.select(range(min(args.max_eval_samples, len(validation))))
    return train, validation


def split_off_validation(train, args):
    """Hold out the last --validation_split_percentage of the lines (contiguous, so held-out
    text is not interleaved with training text)."""
    n_val = max(1, len(train) * args.validation_split_percentage // 100)
    if len(train) < 2:
        raise UserError(
            "the training text has fewer than 2 lines: too little to hold out validation text; "
            "add text or pass --validation_file"
        )
    return train.select(range(len(train) - n_val)), train.select(range(len(train) - n_val, len(train)))


def group_texts(examples, block_size):
    """For `Dataset.map(batched=True)`: concatenate the token lists of a batch of lines and
    cut them into blocks of exactly `block_size` tokens, so no compute goes to padding.
    The tail that does not fill a block is dropped, once per map batch: map with
    batch_size=None to lose only the final partial block of the whole text.
    """
    concatenated = {k: [t for seq in examples[k] for t in seq] for k in examples}
    total = (len(next(iter(concatenated.values()))) // block_size) * block_size
    return {k: [seq[i : i + block_size] for i in range(0, total, block_size)] for k, seq in concatenated.items()}


# ---------------------------------------------------------------------------
# Device, precision, processes.
# ---------------------------------------------------------------------------


def choose_mixed_precision(requested):
    """bf16 where the hardware has it, fp16 (with loss scaling) on older GPUs such as
    Colab's T4, full precision on CPU. An explicit flag, or `accelerate launch
    --mixed_precision`, wins."""
    if requested != "auto":
        return requested
    launched_with = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched_with != "no":
        return launched_with
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def make_accelerator(args, output_dir):
    if torch.cuda.is_available():
        # TF32 matmuls: ~free speed on Ampere and newer, precision loss irrelevant for training.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    report_to = None if args.report_to == "none" else args.report_to
    # Accelerate keeps its settings (precision, compilation, accumulation) in process-wide
    # state that the first Accelerator fixes. A second run in the same Python process (a
    # notebook calling main() twice) would silently keep the first run's: clear them.
    # The process group and device (PartialState) stay.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=choose_mixed_precision(args.mixed_precision),
        # torch.compile at prepare(): fuses kernels; the first steps are slow while it compiles.
        dynamo_backend="inductor" if getattr(args, "torch_compile", False) else "no",
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=report_to,
        project_dir=str(output_dir),
        # We step the scheduler ourselves, once per optimizer step. Left to Accelerate,
        # a prepared scheduler steps once per process, so warmup and decay would be
        # counted in the wrong unit on several GPUs.
        step_scheduler_with_optimizer=False,
        # The shuffle order of epoch e depends only on (seed, e): a resumed run sees
        # exactly the batches the interrupted one would have seen.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and accelerator.num_processes == 1:
        # torchrun on a machine without GPUs: each process would train alone, all
        # writing the same files.
        raise UserError(
            f"{world_size} processes were launched but each runs alone; on CPU set "
            "ACCELERATE_USE_CPU=1 (or use `accelerate launch --cpu`)"
        )
    lock_output_dir(accelerator, output_dir)
    set_seed(args.seed)
    return accelerator


def data_generator(seed):
    """Give each DataLoader its own generator, so iterating one never draws from the
    global RNG (which dropout uses, and which checkpoints restore)."""
    return torch.Generator().manual_seed(seed)


def loader_options(args, device):
    """DataLoader options: on a GPU, worker processes build batches ahead and pinned
    memory makes the copy to the GPU asynchronous."""
    workers = args.dataloader_num_workers
    if workers is None:
        workers = 2 if device.type == "cuda" else 0
    return {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0}


def make_optimizer(model, args, device):
    """AdamW without weight decay on biases and normalisation weights (the 1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    fused = device.type == "cuda"  # one kernel for all parameters instead of one per tensor
    return torch.optim.AdamW(groups, lr=args.learning_rate, fused=fused)


def describe_training(accelerator, args, num_epochs, total_steps, steps_per_epoch):
    """The line a run starts with: its length, its global batch, where it runs."""
    per_device, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    processes = accelerator.num_processes
    return (
        f"Training for {num_epochs} epochs, {total_steps} optimizer steps ({steps_per_epoch} per epoch), "
        f"global batch {per_device * accumulation * processes} ({per_device} per device x {accumulation} "
        f"accumulated x {processes} process(es)), {accelerator.device}, mixed precision: {accelerator.mixed_precision}"
    )


def training_steps(batches_per_epoch, args):
    """Optimizer steps per epoch, in total, and the number of epochs that takes.

    `batches_per_epoch` is per process (len of the prepared dataloader). A partial
    accumulation at the end of an epoch still makes an optimizer step."""
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps:
        total_steps = args.max_train_steps
    else:
        total_steps = args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    return steps_per_epoch, total_steps, num_epochs


# ---------------------------------------------------------------------------
# Training state and checkpoints.
# ---------------------------------------------------------------------------


@dataclass
class TrainingState:
    """Where training stands. Saved inside every checkpoint, so progress never has to
    be guessed from folder names."""

    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # micro-batches of the current epoch already trained on (per process)
    completed_steps: int = 0  # optimizer steps, over all epochs
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    log_history: list = field(default_factory=list)


# Flags that may change when a run resumes: they set how long it trains and how it saves,
# logs and runs, not what it learns. Every other flag must match the checkpoint's (each
# script adds its own harmless ones, such as the demo's prompt).
MAY_CHANGE_ON_RESUME = (
    "num_train_epochs",
    "max_train_steps",
    "output_dir",
    "drive",
    "resume_from_checkpoint",
    "no_resume",
    "checkpointing_steps",
    "save_every_minutes",
    "keep_last",
    "logging_steps",
    "report_to",
    "per_device_eval_batch_size",
    "mixed_precision",
    "torch_compile",
    "dataloader_num_workers",
)
# These three may change together when their product, the global batch, stays the same.
BATCH_GEOMETRY = ("num_processes", "per_device_train_batch_size", "gradient_accumulation_steps")


class Checkpointer:
    """Saves and finds checkpoints in <output_dir>/checkpoints.

    A checkpoint is a folder written by `accelerator.save_state`: the model weights
    (safetensors), optimizer, scheduler, gradient scaler and sampler states, one
    random_states_<process>.pkl per process (under FSDP or DeepSpeed, sub-folders of
    shards), plus training_state.json with the progress, the settings and the size of
    every file. It is written under a temporary name and renamed when complete, so a
    crash mid-save never leaves a newest checkpoint that cannot load.
    """

    def __init__(self, accelerator, output_dir, args, extra_settings, may_change=()):
        self.accelerator = accelerator
        self.dir = Path(output_dir) / CHECKPOINTS
        self.args = args
        # Settings a resumed run must share with the run that wrote the checkpoint.
        harmless = set(MAY_CHANGE_ON_RESUME) | set(may_change)
        self.fingerprint = {k: v for k, v in vars(args).items() if k not in harmless}
        self.fingerprint.update(extra_settings, num_processes=accelerator.num_processes)
        self.last_save_time = time.monotonic()
        self.signal_received = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            PREVIOUS_SIGNAL_HANDLERS.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        # Only note it: the loop saves at the next optimizer step, then exits.
        # A second signal acts at once, as usual.
        self.signal_received = signum
        signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)

    # -- finding -----------------------------------------------------------

    def complete_checkpoints(self):
        """(state, path) for every checkpoint that is whole, oldest first; damaged ones
        are skipped with a warning."""
        found = []
        if not self.dir.is_dir():
            return found
        for path in self.dir.iterdir():
            if not path.is_dir() or path.name.startswith((".tmp", ".old")):
                continue
            try:
                meta = json.loads((path / STATE_FILE).read_text())
                for name, size in meta["files"].items():
                    if (path / name).stat().st_size != size:
                        raise ValueError(f"{name} has the wrong size")
                found.append((meta, path))
            except (OSError, ValueError, KeyError) as err:
                self.accelerator.print(f"warning: skipping damaged checkpoint {path} ({err})")
        # Newest = saved last (a run resumed from an older checkpoint makes newer-step
        # ones stale), then by progress.
        found.sort(key=lambda mp: (mp[0].get("serial", 0), mp[0]["state"]["completed_steps"], mp[0]["state"]["epoch"]))
        return found

    def resume(self):
        """Load the newest complete checkpoint (or --resume_from_checkpoint) into the
        prepared objects; return its TrainingState, or a fresh one."""
        if self.args.no_resume:
            if self.accelerator.is_main_process and self.dir.exists():
                delete_tree(self.dir)
            self.accelerator.wait_for_everyone()
            return TrainingState()
        candidates = self.complete_checkpoints()
        if self.args.resume_from_checkpoint:
            wanted = Path(self.args.resume_from_checkpoint).resolve()
            candidates = [(m, p) for m, p in candidates if p.resolve() == wanted]
            if not candidates:
                raise UserError(
                    f"--resume_from_checkpoint {wanted} is not a complete checkpoint; "
                    f"pick one in {self.dir}, or drop the flag"
                )
        failed = []
        for meta, path in reversed(candidates):
            saved = meta["fingerprint"]
            self.check_fingerprint(saved, path)
            try:
                self.load(path, same_processes=saved["num_processes"] == self.accelerator.num_processes)
            except Exception as err:  # whole in size but unreadable, or not safe to unpickle
                reason = first_line(err, limit=300)
                self.accelerator.print(f"warning: could not load checkpoint {path} ({reason}); trying an older one")
                failed.append(path)
                continue
            state = TrainingState(**meta["state"])
            if saved["gradient_accumulation_steps"] != self.args.gradient_accumulation_steps:
                # Same global batch, other split: the same optimizer steps of this epoch are done.
                steps_done = math.ceil(state.batch_in_epoch / saved["gradient_accumulation_steps"])
                state.batch_in_epoch = steps_done * self.args.gradient_accumulation_steps
            # Accelerate counts micro-batches since the epoch began to know when to step.
            self.accelerator.step = state.batch_in_epoch
            self.accelerator.print(
                f"Resumed from {path}: epoch {state.epoch}, "
                f"step {state.completed_steps}, batch {state.batch_in_epoch} of the epoch"
            )
            return state
        if failed:
            # Never start over silently on top of checkpoints: rotation would delete them.
            raise UserError(
                f"no checkpoint in {self.dir} could be loaded (tried {', '.join(p.name for p in failed)}); "
                "move them away to keep them, or pass --no_resume to start fresh"
            )
        return TrainingState()

    def load(self, path, same_processes=True):
        """accelerator.load_state, which unpickles only tensors and plain data (torch's
        weights_only), so a planted pickle cannot run code. Accelerate quietly skips
        random states it cannot load; we check they load, since exact resume needs them
        (on another number of processes, a process without its own file keeps its seed)."""
        rng_file = path / f"random_states_{self.accelerator.process_index}.pkl"
        if same_processes or rng_file.exists():
            try:
                accelerate_load(rng_file)
            except Exception as err:
                raise ValueError(f"{rng_file.name} cannot be loaded safely: {first_line(err, limit=None)}") from None
        self.accelerator.load_state(str(path))

    def check_fingerprint(self, saved, path):
        """Refuse a checkpoint made with settings that change what is learned. The batch
        may be split otherwise (processes x per-device batch x accumulation) if its global
        size stays: each optimizer step then sees the same examples as before."""
        changed = [f"{k}: {saved[k]!r} -> {v!r}" for k, v in self.fingerprint.items() if k in saved and saved[k] != v]
        other = [c for c in changed if c.split(":")[0] not in BATCH_GEOMETRY]
        if other:
            raise UserError(
                f"the checkpoint in {path.parent} was made with other settings ({'; '.join(other)}); "
                "use the same settings to resume, or --no_resume / another --output_dir to start fresh"
            )
        if not changed:
            return
        old, new = ([fp[k] for k in BATCH_GEOMETRY] for fp in (saved, self.fingerprint))
        if math.prod(old) != math.prod(new):
            raise UserError(
                f"the checkpoint in {path.parent} was made with another global batch ({'; '.join(changed)}: "
                f"{math.prod(old)} -> {math.prod(new)} examples per optimizer step); "
                f"{batch_advice(math.prod(old), *new)} (it was made on {old[0]} process(es)); "
                "or --no_resume / another --output_dir to start fresh"
            )
        sharded = self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        if sharded and old[0] != new[0]:
            raise UserError(
                f"the checkpoint in {path.parent} holds FSDP/DeepSpeed shards of {old[0]} process(es); "
                f"resume it on {old[0]} process(es), or --no_resume to start fresh"
            )
        self.accelerator.print(
            f"note: the checkpoint was made with {' x '.join(map(str, old))} (processes x per-device batch x "
            f"accumulation), this run uses {' x '.join(map(str, new))}: the same {math.prod(new)} examples per "
            "optimizer step, from the same step and place in the data; random streams (dropout, masking) go on "
            "from process 0's"
        )

    # -- saving ------------------------------------------------------------

    def save_due(self, state):
        """After an optimizer step: is a save due (steps, minutes, or a signal)?

        Step saves are the same on every process. The clock and signals are not, so
        with several processes they are compared (a collective operation, which waits
        for the devices) only every --logging_steps steps, when the loop syncs anyway."""
        steps = self.args.checkpointing_steps
        due_by_steps = bool(steps and state.completed_steps % steps == 0)
        minutes = self.args.save_every_minutes
        due = due_by_steps or bool(minutes and time.monotonic() - self.last_save_time >= 60 * minutes)
        due = due or self.signal_received is not None
        if self.accelerator.num_processes > 1:
            if state.completed_steps % self.args.logging_steps:
                return due_by_steps
            flag = torch.tensor([float(due)], device=self.accelerator.device)
            due = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        return due

    def save(self, state):
        name = f"step_{state.completed_steps:08d}"
        tmp = self.dir / f".tmp-{name}"
        acc = self.accelerator
        try:
            if acc.is_main_process:
                delete_tree(tmp)
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            acc.save_state(str(tmp))  # every process writes its part: its random state, its shards
            acc.wait_for_everyone()
            if acc.is_main_process:
                files = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in tmp.rglob("*") if f.is_file()}
                serial = max((m.get("serial", 0) for m, _ in self.complete_checkpoints()), default=0) + 1
                meta = {"state": asdict(state), "fingerprint": self.fingerprint, "files": files, "serial": serial}
                write_json(tmp / STATE_FILE, meta)
                for f in tmp.rglob("*"):
                    if f.is_file():
                        fsync(f)
        except OSError:
            # A full disk or Drive: drop the partial save so the space (and the older,
            # complete checkpoints) stay as they were.
            if acc.is_main_process:
                delete_tree(tmp)
            raise
        if acc.is_main_process:
            swap_in(tmp, self.dir / name)  # the same step saved again (at an epoch's end) replaces itself
            self.rotate()
        acc.wait_for_everyone()
        self.last_save_time = time.monotonic()
        return self.dir / name

    def rotate(self):
        """Keep the newest --keep_last complete checkpoints."""
        complete = self.complete_checkpoints()
        for _, path in complete[: -self.args.keep_last]:
            delete_tree(path)
        for path in self.dir.iterdir():  # leftovers of saves that were killed
            if path.name.startswith((".tmp", ".old")):
                delete_tree(path)

    def exit_if_signalled(self, state):
        if self.signal_received is not None:
            name = signal.Signals(self.signal_received).name
            self.accelerator.print(
                f"\n{name} received: saved step {state.completed_steps}. Run the same command again to continue."
            )
            raise SystemExit(128 + self.signal_received)


def batch_advice(global_batch, processes, per_device, accumulation):
    """How to keep a global batch on this many processes."""
    if global_batch % (processes * per_device) == 0:
        split = (per_device, global_batch // (processes * per_device))
    elif global_batch % processes == 0:
        split = (global_batch // processes, 1)
    else:
        return f"{global_batch} examples per step cannot be split over {processes} process(es): use another count"
    return (
        f"to keep {global_batch} on {processes} process(es), pass --per_device_train_batch_size {split[0]} "
        f"--gradient_accumulation_steps {split[1]}"
    )


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")


def fsync(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def delete_tree(path):
    """Delete a folder. Files are emptied first: Google Drive keeps deleted files in its
    trash for 30 days and counts them against the quota, but an empty file costs nothing."""
    for f in Path(path).rglob("*"):
        if f.is_file():
            with contextlib.suppress(OSError):
                os.truncate(f, 0)
    shutil.rmtree(path, ignore_errors=True)


def swap_in(tmp, final):
    """Move a finished folder into place, replacing the old one only once the new one is
    whole: at every moment one of them is complete."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        final.rename(old)
        tmp.rename(final)
        delete_tree(old)
    else:
        tmp.rename(final)


def export_model(accelerator, model, tokenizer, path):
    """Save a Hugging Face model directory (safetensors + config + tokenizer) that
    `from_pretrained` and `pipeline` load; swapped in atomically.

    Every process takes part: under FSDP or DeepSpeed ZeRO-3 each holds a shard of the
    weights, and `get_state_dict` gathers the full ones (on the main process)."""
    path = Path(path)
    try:
        state_dict = accelerator.get_state_dict(model)
    except ValueError as err:  # ZeRO-3 without stage3_gather_16bit_weights_on_model_save
        raise UserError(
            f"cannot gather the model's weights to export them ({first_line(err)}); set "
            "stage3_gather_16bit_weights_on_model_save: true in the DeepSpeed config (as configs/deepspeed_zero3.yaml)"
        ) from None
    if accelerator.is_main_process:
        tmp = path.with_name(f".tmp-{path.name}")
        delete_tree(tmp)
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        swap_in(tmp, path)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------
# Evaluation, metrics, throughput, logging.
# ---------------------------------------------------------------------------


@torch.no_grad()
def evaluate(accelerator, model, dataloader, per_example):
    """Run `per_example(model, batch)` -> dict of tensors with one row per example over
    the whole dataloader; return them concatenated over all batches and processes.

    `gather_for_metrics` drops the examples that the last batch repeats to keep
    processes even, so metrics are exact for any number of processes. Returning
    per-example values (not per-batch means) keeps a small last batch from skewing
    averages."""
    model.eval()
    parts, dtypes = {}, {}
    for batch in dataloader:
        out = accelerator.gather_for_metrics(per_example(model, batch))
        for k, v in out.items():
            # Kept as Python numbers, not as many small CPU tensors: on a CPU those would
            # sit between the freed big buffers of each batch (logits) and keep the
            # allocator from returning them (GBs over a long evaluation).
            parts.setdefault(k, []).extend(v.cpu().tolist())
            dtypes[k] = v.dtype
    model.train()
    return {k: torch.tensor(v, dtype=dtypes[k]) for k, v in parts.items()}


def load_metric(name, fallback):
    """An `evaluate` metric, or `fallback` with the same `compute(...)` when the hub
    cannot be reached (evaluate fetches metric code from the hub on first use)."""
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        try:
            import evaluate

            return evaluate.load(name).compute
        except Exception:
            pass
    return fallback


class Throughput:
    """Counts tokens on the device (no host sync per step); reports tokens/s over all
    processes when asked, and on a GPU the model FLOPs utilization (MFU)."""

    def __init__(self, accelerator, flops_per_token=None):
        self.accelerator = accelerator
        self.tokens = torch.zeros((), device=accelerator.device, dtype=torch.long)
        self.start = time.perf_counter()
        self.flops_per_token = flops_per_token
        peak = peak_flops(accelerator.device, accelerator.mixed_precision)
        # Peak of all processes together: each process has its own device.
        self.peak = peak * accelerator.num_processes if peak else None

    def add(self, num_tokens):
        self.tokens += num_tokens

    def pause(self):
        """From here to resume() (evaluating, saving) is not training: it does not count."""
        self.paused_at = time.perf_counter()

    def resume(self):
        self.start += time.perf_counter() - self.paused_at

    def tokens_per_second(self):
        total = self.accelerator.reduce(self.tokens.clone(), reduction="sum").item()
        elapsed = time.perf_counter() - self.start
        self.tokens.zero_()
        self.start = time.perf_counter()
        return total / max(elapsed, 1e-9)

    def report(self):
        """{"tokens_per_second": ..., and "mfu" (0..1) where the device's peak is known}."""
        tps = self.tokens_per_second()
        out = {"tokens_per_second": tps}
        if self.peak and self.flops_per_token:
            out["mfu"] = tps * self.flops_per_token / self.peak
        return out


def flops_per_token(model, seq_len):
    """Training FLOPs per token, as nanoGPT and the PaLM paper count them: 6 per weight
    that takes part in a matrix product (2 forward, 4 backward), plus attention's
    12 x layers x width x sequence length. Embedding lookups are not matrix products;
    an output layer tied to the embeddings is. Counted before `prepare`, while every
    weight is whole (FSDP and ZeRO-3 split them)."""
    matmul = model.num_parameters(exclude_embeddings=True)
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        matmul += head.weight.numel()
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    return 6 * matmul + 12 * layers * width * seq_len


# Dense (no sparsity) peak tensor-core FLOP/s per GPU, by name: bf16/fp16, and TF32 for fp32.
PEAK_FLOPS = {
    "H200": (989e12, 494e12),
    "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "L4": (121e12, 60e12),
    "A10G": (70e12, 35e12),
    "T4": (65e12, 8e12),  # no bf16: fp16
    "V100": (125e12, 15.7e12),
}


def peak_flops(device, mixed_precision):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32) in PEAK_FLOPS.items():
        if key in name:
            return half if mixed_precision in ("bf16", "fp16") else tf32
    return None


def peak_memory(device):
    """Peak GPU memory allocated by tensors since the start, in GiB (None on CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def progress_postfix(entry):
    """What the progress bar shows after the step counter."""
    postfix = {"loss": f"{entry['train_loss']:.4f}", "lr": f"{entry['learning_rate']:.2e}"}
    postfix["tok/s"] = f"{entry['tokens_per_second']:.0f}"
    if "mfu" in entry:
        postfix["mfu"] = f"{100 * entry['mfu']:.1f}%"
    return postfix


def mean_over_processes(accelerator, values):
    """Mean of a list of 0-d tensors on this process, averaged over processes."""
    local = torch.stack(values).float().mean()
    return accelerator.reduce(local, reduction="mean").item()


def log_metrics(accelerator, state, metrics):
    """Record metrics in the training state (saved with checkpoints) and the trackers."""
    entry = {"step": state.completed_steps, "epoch": state.epoch, **metrics}
    state.log_history.append(entry)
    accelerator.log(metrics, step=state.completed_steps)
    return entry


def plot_history(log_history, path, eval_keys=("eval_loss",)):
    """loss.png: the training loss and the eval metrics against optimizer steps, from
    the log the run keeps anyway (also in log_history.json). Losses on the left axis,
    other metrics (accuracy, perplexity, ...) on the right."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed (Colab subprocess, servers, CI)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    other = None
    for key in ("train_loss", *dict.fromkeys(eval_keys)):
        points = [(e["step"], e[key]) for e in log_history if key in e]
        if not points:
            continue
        if key.endswith("loss"):
            ax.plot(*zip(*points), "-" if key == "train_loss" else "o-", label=key.replace("_", " "))
        else:
            other = other or ax.twinx()
            other.plot(*zip(*points), "s--", color="tab:green", label=key.replace("_", " "))
            other.set_ylabel(key.replace("_", " "))
            other.legend(loc="upper right")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def improved(value, best, greater_is_better):
    return best is None or (value > best if greater_is_better else value < best)


def params_summary(model):
    n = sum(p.numel() for p in model.parameters())
    return f"{n:,} parameters"
