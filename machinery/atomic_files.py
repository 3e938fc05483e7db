"""Files and folders that appear whole or not at all: JSON written and renamed, folders swapped in
with two renames that a crash between cannot lose, deletes that empty files first (Google Drive's
trash counts against the quota).

Tests (in tests/, unless named otherwise):
- test_faults.py::test_a_crash_between_the_two_renames_of_a_swap_loses_nothing
- test_faults.py::test_rotation_keeps_the_newest_and_empties_files_before_deleting
- test_scale_out.py::test_no_resume_empties_files_before_deleting_them"""

import contextlib
import json
import os
import shutil
from pathlib import Path


def write_json(path, obj):
    """Written under a temporary name, then renamed: a kill midway leaves the old file or the new
    one, never half of one (a re-run reads it)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def delete_tree(path):
    """Delete a folder. Files are emptied first: Google Drive keeps deleted files in its trash
    for 30 days and counts them against the quota, but an empty file costs nothing."""
    for f in Path(path).rglob("*"):
        if f.is_file():
            with contextlib.suppress(OSError):
                os.truncate(f, 0)
    shutil.rmtree(path, ignore_errors=True)


def swap_in(tmp, final):
    """Move a finished folder into place; the old one goes only once the new one is there. A
    crash between the two renames leaves only .old-<name>, which recover_swaps puts back."""
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_folder(final.parent)  # the renames themselves on disk, not only the files
    delete_tree(old)


def recover_swaps(folder):
    """Put back each .old-<name> folder whose <name> is missing: a crash came between swap_in's
    two renames."""
    for old in Path(folder).glob(".old-*") if Path(folder).is_dir() else []:
        final = old.with_name(old.name.removeprefix(".old-"))
        if not final.exists():
            old.rename(final)
            print(f"warning: {final} was being replaced when the last run stopped; the previous one is back")


def fsync_folder(folder):
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_pretrained_whole(obj, folder, last):
    """obj.save_pretrained(folder) (a tokenizer, a model), its files written into a temporary
    folder and moved in with `last` moved last: a folder that has `last` has the rest too, even
    after a kill midway (the folder is reused when it has `last`)."""
    folder = Path(folder)
    tmp = folder / ".tmp-save"
    delete_tree(tmp)
    obj.save_pretrained(tmp)
    for file in tmp.iterdir():
        if file.name != last:
            file.replace(folder / file.name)
    (tmp / last).replace(folder / last)
    tmp.rmdir()
