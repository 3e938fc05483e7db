"""Processes that wait for each other outside a collective: the first process reads or tokenizes
(which can take longer than NCCL's 10-minute timeout) while the others wait for a file it writes.
And every process's value of something, on every engine (XLA included).

Tests (in tests/, unless named otherwise):
- test_scale_out.py::test_processes_wait_for_long_tokenizing_outside_collectives"""

import contextlib
import time
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import (
    broadcast_object_list,
)


class Waits:
    """What main_process_first needs to name its files: the job (its main process's host and pid,
    the same in every process) and how many waits it has had (every process has the same ones)."""

    job, count = None, 0


@contextlib.contextmanager
def main_process_first(accelerator, local=False):
    """The main process (with `local`: each machine's first process) runs the block first, the
    others after it, reading what it made (a datasets cache, a token file, a tokenizer). Like
    Accelerate's main_process_first, except for how the others wait: they look for a file that
    the first one writes into --output_dir (which every process sees) when it is done, once a
    second, instead of waiting inside a collective. Reading or tokenizing gigabytes takes longer
    than a backend waits in one (NCCL: 10 minutes, under DeepSpeed 30) before it aborts the job."""
    if accelerator.num_processes == 1:
        yield
        return
    Waits.count += 1
    first = accelerator.is_local_main_process if local else accelerator.is_main_process
    who = f"machine{accelerator.process_index - accelerator.local_process_index}" if local else "job"
    done = Path(accelerator.project_dir) / f".done-{Waits.job}-{Waits.count}-{who}"
    while not first and not done.exists():
        time.sleep(1.0)
    try:
        yield
    finally:
        if first:  # done, or failed: the others run the block then, and meet the same error
            done.touch()
    accelerator.wait_for_everyone()  # each one's part is done: a short wait
    if first:
        done.unlink(missing_ok=True)


def every_process(obj):
    """Every process's `obj`, in process order, on every process: gather_object for every engine.
    Accelerate's gather_object refuses XLA (TPUs); its broadcast_object_list takes XLA's own path
    (xm.mesh_reduce) there and torch.distributed's elsewhere, so each process broadcasts in turn."""
    return [broadcast_object_list([obj], from_process=i)[0] for i in range(PartialState().num_processes)]
