"""Which checkpoints may be resumed: whole ones only (every file of the size recorded), loaded
without unpickling code, made with the same settings (or the same global batch split otherwise),
an fp16 run resuming a checkpoint saved without fp16.

Tests (in tests/, unless named otherwise):
- test_faults.py (planted pickle, damaged and full-disk checkpoints)
- test_every_script.py::test_changed_settings_are_refused_and_harmless_ones_allowed
- test_scale_out.py::test_another_global_batch_is_refused_with_the_numbers_that_work
- test_train_classifier.py::test_a_checkpoint_saved_without_fp16_resumes_in_fp16"""

import json
import math
import os
from pathlib import Path

from accelerate.utils import SCALER_NAME, DistributedType, broadcast_object_list
from accelerate.utils import load as accelerate_load

from machinery.atomic_files import delete_tree, recover_swaps, write_json
from machinery.errors import UserError, first_line
from machinery.waits import every_process

STATE_FILE = "training_state.json"  # written last: a checkpoint without it is incomplete


# Flags that may change when a run resumes: how long it trains, how it saves, logs and runs, not
# what it learns. Every other flag must match the checkpoint's (a script adds its harmless ones,
# such as its demo's prompt).
MAY_CHANGE_ON_RESUME = """num_train_epochs max_train_steps early_stopping_patience output_dir drive
    checkpointing_steps save_every_minutes keep_last resume_from_checkpoint no_resume logging_steps
    report_to per_device_eval_batch_size dataloader_num_workers mixed_precision torch_compile
    preprocessing_num_workers eval_only test_file auto_find_batch_size push_to_hub hub_model_id hub_token
    hub_private_repo""".split()


# These three may change together when their product, the global batch, stays the same.
BATCH_GEOMETRY = ("num_processes", "per_device_train_batch_size", "gradient_accumulation_steps")


def load_newest(accelerator, folder, settings, args):
    """Load the newest whole checkpoint in `folder` made with `settings` (or
    --resume_from_checkpoint) into the prepared objects: its training state, a dict (None if
    there is none). The main process chooses, and every process loads the same checkpoint: ranks
    that resumed from different steps would train apart (DDP) or wait for each other forever
    (FSDP, DeepSpeed). One that any process cannot load is skipped by all, for the one before."""
    acc, candidates = accelerator, []
    if acc.is_main_process:
        recover_swaps(folder)
        candidates = [(meta, str(path)) for meta, path in whole_checkpoints(folder, acc.print)]
    candidates = [(meta, Path(path)) for meta, path in broadcast_object_list([candidates])[0]]
    if args.resume_from_checkpoint:
        wanted = Path(args.resume_from_checkpoint).resolve()
        candidates = [(m, p) for m, p in candidates if p.resolve() == wanted]
        if not candidates:
            raise UserError(f"--resume_from_checkpoint {wanted} is not a complete checkpoint in {folder}")
    failed = []
    for meta, path in reversed(candidates):
        saved = meta["fingerprint"]
        check_settings(acc, saved, settings, path)
        same_processes = saved["num_processes"] == acc.num_processes
        problems = [p for p in every_process(try_to_load(acc, path, same_processes)) if p]
        if problems:  # on any process: all of them try the one before, together
            acc.print(f"warning: could not load checkpoint {path} ({'; '.join(problems)}); trying an older one")
            failed.append(path.name)
            continue
        state = meta["state"]
        if saved["gradient_accumulation_steps"] != args.gradient_accumulation_steps:
            # The same global batch split otherwise: the same optimizer steps of the epoch are done.
            steps_done = math.ceil(state["batch_in_epoch"] / saved["gradient_accumulation_steps"])
            state["batch_in_epoch"] = steps_done * args.gradient_accumulation_steps
        acc.step = state["batch_in_epoch"]  # Accelerate counts micro-batches to know when to step
        acc.print(
            f"Resumed from {path}: epoch {state['epoch']}, step {state['completed_steps']}, "
            f"batch {state['batch_in_epoch']} of the epoch"
        )
        return state
    if failed:  # never start over on top of checkpoints: rotation would delete them
        raise UserError(
            f"no checkpoint in {folder} could be loaded (tried {', '.join(failed)}); "
            "move them away to keep them, or pass --no_resume to start fresh"
        )
    return None


def write_record(tmp, state, settings, folder):
    """training_state.json in the checkpoint being saved at `tmp`: the training `state`, the
    `settings` it was made with, every file's size (a save killed midway leaves files of other
    sizes) and a serial number (the newest is the one saved last). Then every file is flushed to
    disk, before the folder is renamed."""
    files = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in tmp.rglob("*") if f.is_file()}
    serial = max((m.get("serial", 0) for m, _ in whole_checkpoints(folder)), default=0) + 1
    write_json(tmp / STATE_FILE, {"state": state, "fingerprint": settings, "files": files, "serial": serial})
    for file in [*files, STATE_FILE]:
        with open(tmp / file, "rb") as handle:
            os.fsync(handle.fileno())


def remove_old(folder, keep_last):
    """Keep the newest `keep_last` checkpoints; remove the .tmp/.old folders of saves killed
    midway (recover_swaps put back any that was needed)."""
    old = [path for _, path in whole_checkpoints(folder)[:-keep_last]]
    killed = [path for path in folder.iterdir() if path.name.startswith((".tmp", ".old"))]
    for path in old + killed:
        delete_tree(path)


def whole_checkpoints(folder, warn=None):
    """(metadata, path) of each whole checkpoint in `folder`, oldest first; `warn` hears of the
    damaged ones (a save killed halfway leaves files of the wrong size)."""
    found = []
    for path in folder.iterdir() if folder.is_dir() else []:
        if not path.is_dir() or path.name.startswith((".tmp", ".old")):
            continue
        try:
            meta = json.loads((path / STATE_FILE).read_text())
            for name, size in meta["files"].items():
                if (path / name).stat().st_size != size:
                    raise ValueError(f"{name} has the wrong size")
            found.append((meta, path))
        except (OSError, ValueError, KeyError) as err:
            if warn:
                warn(f"warning: skipping damaged checkpoint {path} ({err})")
    # Newest = saved last (a run resumed from an older checkpoint makes newer-step ones stale).
    return sorted(found, key=lambda mp: (mp[0].get("serial", 0), mp[0]["state"]["completed_steps"]))


def try_to_load(accelerator, path, same_processes=True):
    """Load a checkpoint into the prepared objects; None, or why it could not be loaded (on this
    process). accelerator.load_state unpickles only tensors and plain data (torch's
    weights_only), so a planted pickle cannot run code. It quietly skips random states it cannot
    load; exact resume needs them, so they are checked first (on another number of processes, a
    process without a file of its own keeps its seed)."""
    rng_file = path / f"random_states_{accelerator.process_index}.pkl"
    try:
        if same_processes or rng_file.exists():
            try:
                accelerate_load(rng_file)
            except Exception as err:
                raise ValueError(f"{rng_file.name} cannot be loaded safely: {first_line(err, None)}") from None
        load_state(accelerator, path)
    except Exception as err:  # whole in size but unreadable, or not safe to unpickle
        where = f"process {accelerator.process_index}: " if accelerator.num_processes > 1 else ""
        return where + first_line(err, 300)
    return None


def load_state(accelerator, path):
    """accelerator.load_state, also for a checkpoint saved in another precision. --mixed_precision
    may change on resume (auto picks bf16 on an A100, fp16 on a T4): fp16 has a loss scaler, which
    Accelerate loads from scaler.pt unconditionally, and a checkpoint saved without fp16 has none.
    The scale then starts afresh, as in a new fp16 run (it adapts within a few steps)."""
    scaler = accelerator.scaler
    if scaler is not None and not (path / SCALER_NAME).exists():
        accelerator.print(f"note: {path.name} was saved without fp16 (no {SCALER_NAME}): the loss scale starts afresh")
        accelerator.scaler = None  # for load_state only; the prepared optimizer keeps its own reference
    try:
        accelerator.load_state(str(path))
    finally:
        accelerator.scaler = scaler


def check_settings(accelerator, saved, current, path):
    """Refuse a checkpoint made with settings that change what is learned. The batch may be split
    otherwise (processes x per-device batch x accumulation) if its global size stays: each
    optimizer step then sees the same examples."""
    changed = [key for key, value in current.items() if key in saved and saved[key] != value]
    described = {key: f"{key}: {saved[key]!r} -> {current[key]!r}" for key in changed}
    what_changed = "; ".join(described.values())
    other = "; ".join(described[key] for key in changed if key not in BATCH_GEOMETRY)
    if other:  # a setting that changes what is learned
        raise UserError(
            f"the checkpoint in {path.parent} was made with other settings ({other}); "
            "use the same settings to resume, or --no_resume / another --output_dir to start fresh"
        )
    old = [saved[key] for key in BATCH_GEOMETRY]
    new = [current[key] for key in BATCH_GEOMETRY]
    if old == new:
        return
    if math.prod(old) != math.prod(new):
        raise UserError(
            f"the checkpoint in {path.parent} was made with another global batch ({what_changed}: "
            f"{math.prod(old)} -> {math.prod(new)} examples per optimizer step); {batch_advice(math.prod(old), *new)} "
            f"(it was made on {old[0]} process(es)); or --no_resume / another --output_dir to start fresh"
        )
    if old[0] != new[0] and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise UserError(
            f"the checkpoint in {path.parent} holds FSDP/DeepSpeed shards of {old[0]} process(es); "
            f"resume it on {old[0]} process(es), or --no_resume to start fresh"
        )
    accelerator.print(
        f"note: the checkpoint was made with {' x '.join(map(str, old))} (processes x per-device batch x "
        f"accumulation), this run uses {' x '.join(map(str, new))}: the same {math.prod(new)} examples per "
        "optimizer step, from the same step and place in the data; random streams (dropout, masking) go on "
        "from process 0's"
    )


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
