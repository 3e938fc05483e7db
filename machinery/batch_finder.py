"""--auto_find_batch_size: out of GPU memory, the run goes on from its last checkpoint with half the
per-device batch and twice the accumulation (the same global batch, so the same schedule), and
remembers the size that fits; on several processes they all agree on one size.

Tests (in tests/, unless named otherwise):
- test_train_classifier.py::test_auto_find_batch_size_* (and the out-of-memory in evaluation)
- test_scale_out.py::test_auto_find_batch_size_on_two_processes_agrees_on_one_size"""

import argparse
import contextlib
import json
import os
from pathlib import Path

from accelerate.utils import (
    find_executable_batch_size,
)
from accelerate.utils.memory import should_reduce_batch_size

from machinery.atomic_files import write_json
from machinery.errors import UserError
from machinery.output_lock import OutputLock


def train_with_a_batch_that_fits(train_fn, args):
    """--auto_find_batch_size: Accelerate's find_executable_batch_size runs the training, and
    when the GPU runs out of memory, runs it again with a smaller per-device batch (the largest
    divisor of the first one that halves it at least) and as many more accumulated micro-batches:
    the same global batch, so the same schedule, and the run goes on from its last checkpoint.
    The size that fits goes to <output_dir>/batch_size.json; a re-run starts there. On several
    processes (torchrun and `accelerate launch` set WORLD_SIZE and RANK, read here since no
    Accelerator exists yet) all read one record and start alike, and the one that runs out of
    memory cannot tell the others (they wait for it inside a collective): it writes the smaller
    size down and stops the job; the same command then starts every process with it."""
    first, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    record = Path(args.output_dir) / "batch_size.json"
    rank, processes = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    size, tries = remembered_size(record, first, accumulation, rank), 0

    def smaller():
        """The next size to try: the largest divisor of the first size that is at most half the
        last one (a divisor keeps the global batch whole); 0 when none is left."""
        nonlocal size
        size //= 2
        while size > 0 and first % size:
            size -= 1
        return size

    def remember(batch_size):  # for the next run: it starts with this size
        write_json(record, {"per_device_train_batch_size": batch_size, "global_batch": first * accumulation})

    @find_executable_batch_size(starting_batch_size=size, reduce_batch_size_fn=smaller)
    def train_with(batch_size):
        nonlocal tries
        tries += 1
        OutputLock.release_held()  # the try that ran out of memory held the folder
        steps = accumulation * first // batch_size
        if batch_size != first and rank == 0:  # said and recorded once
            print(
                f"--auto_find_batch_size: per-device batch {batch_size} x {steps} accumulated (the same "
                f"global batch as {first} x {accumulation}), from the last checkpoint"
            )
            record.parent.mkdir(parents=True, exist_ok=True)
            remember(batch_size)
        # The run as if started with these flags; a retry goes on from the checkpoints.
        args_that_fit = argparse.Namespace(**{**vars(args), "per_device_train_batch_size": batch_size})
        args_that_fit.gradient_accumulation_steps, args_that_fit.no_resume = steps, args.no_resume and tries == 1
        if processes == 1:
            return train_fn(args_that_fit)
        try:
            return train_fn(args_that_fit)
        except RuntimeError as err:
            if not should_reduce_batch_size(err) or smaller() == 0:
                raise
            remember(size)  # by this process, the only one that knows; every process writes the same
            again = " (without --no_resume, which would delete them)" if args.no_resume else ""
            raise UserError(
                f"out of memory on process {rank} with a per-device batch of {batch_size}; "
                f"{record} now says {size}: run the same command again{again}, and every process goes on with it "
                "from the last checkpoint",
                one_process=True,
            ) from None

    return train_with()


def remembered_size(record, first, accumulation, rank):
    """The per-device batch that `record` (batch_size.json) says fits this global batch, else
    `first`."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        fits = json.loads(record.read_text())
        if fits["global_batch"] == first * accumulation:
            size = fits["per_device_train_batch_size"]
            if rank == 0:
                print(f"note: {record} says a per-device batch of {size} fits: starting with it")
            return size
    return first


@contextlib.contextmanager
def out_of_memory_in_evaluation():
    """Out of memory while evaluating: one line naming --per_device_eval_batch_size. Evaluation has
    a batch size of its own: --auto_find_batch_size must not shrink the training batch for it (it
    catches out-of-memory errors, not this one)."""
    try:
        yield
    except RuntimeError as err:
        if not should_reduce_batch_size(err):
            raise
        raise UserError(
            "out of memory while evaluating: pass a smaller --per_device_eval_batch_size and run the same command "
            "again (complete checkpoints are intact; the training batch is not the problem)",
            one_process=True,
        ) from None
