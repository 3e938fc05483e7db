"""Faults that really happen to a run, and what they must not cost: the output-folder lock, a
full or unwritable disk, checkpoint rotation, planted pickles, resuming from an older checkpoint.
The checkpoint code is shared (common.py); train_classifier.py with a tiny BERT drives it here."""

import errno
import json
import os
import pickle
import shutil
import socket
import subprocess
import time

import pytest
from test_train_classifier import argv, checkpoints, digest, final_weights, newest_state, start_run

import common
import train_classifier
from machinery import atomic_files, checkpoint_files, errors, output_lock


@pytest.fixture(scope="module")
def trained(tiny_bert, toy_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    train_classifier.main(argv(tiny_bert, *toy_files, out))
    return out


def copy_of(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def one_error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def exits_with_2(fn, *args):
    with pytest.raises(SystemExit) as info:
        fn(*args)
    assert info.value.code == 2


# ---------------------------------------------------------------------------
# Two runs on one output folder.
# ---------------------------------------------------------------------------


def test_second_run_on_the_same_output_dir_refuses(tiny_bert, toy_files, tmp_path, capsys):
    out = tmp_path / "busy"
    first = start_run(argv(tiny_bert, *toy_files, out, "--num_train_epochs", 50))
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints").exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[1][-2000:]
        exits_with_2(train_classifier.main, argv(tiny_bert, *toy_files, out))
        line = one_error_line(capsys)
        assert f"in use by process {first.pid}" in line and "--output_dir" in line
    finally:
        first.kill()
        first.wait()

    # Killed with SIGKILL, the first run could not remove its lock; the next run takes it over.
    assert (out / output_lock.LOCK_FILE).exists()
    state = train_classifier.main(argv(tiny_bert, *toy_files, out, "--max_train_steps", 30))
    assert "taking over the lock" in capsys.readouterr().err
    assert state.completed_steps == 30
    assert not (out / output_lock.LOCK_FILE).exists()  # released at the end


def plant_lock(out, host, pid, age):
    out.mkdir(parents=True, exist_ok=True)
    path = out / output_lock.LOCK_FILE
    path.write_text(json.dumps({"host": host, "pid": pid}))
    os.utime(path, (time.time() - age, time.time() - age))


def test_lock_of_another_machine_counts_while_its_heartbeat_is_fresh(tmp_path, capsys):
    out = tmp_path / "shared-on-drive"
    plant_lock(out, "colab-runtime-1", 123, age=10)
    with pytest.raises(errors.UserError, match="in use by process 123 on colab-runtime-1"):
        output_lock.OutputLock(out).acquire()
    plant_lock(out, "colab-runtime-1", 123, age=output_lock.OutputLock.STALE + 5)  # that runtime died
    lock = output_lock.OutputLock(out)
    lock.acquire()
    assert json.loads((out / output_lock.LOCK_FILE).read_text()) == {"host": socket.gethostname(), "pid": os.getpid()}
    lock.release()
    output_lock.OutputLock.held = None
    assert not (out / output_lock.LOCK_FILE).exists()


def test_lock_of_a_dead_process_on_this_machine_is_taken_over(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "out"
    plant_lock(out, socket.gethostname(), dead.pid, age=1)
    lock = output_lock.OutputLock(out)
    lock.acquire()
    lock.release()
    output_lock.OutputLock.held = None


# ---------------------------------------------------------------------------
# A full disk, an unwritable folder.
# ---------------------------------------------------------------------------


def test_full_disk_keeps_the_previous_checkpoint(trained, tiny_bert, toy_files, tmp_path, monkeypatch, capsys):
    out = copy_of(trained, tmp_path)
    before = digest(out / "checkpoints")
    real_save_state = common.Accelerator.save_state

    def save_state_on_a_full_disk(self, output_dir, **kwargs):
        real_save_state(self, output_dir, **kwargs)  # writes its files, then the disk is full
        with open(os.path.join(output_dir, "model.safetensors"), "r+b") as f:
            f.truncate(100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(output_dir, "optimizer.bin"))

    monkeypatch.setattr(common.Accelerator, "save_state", save_state_on_a_full_disk)
    exits_with_2(train_classifier.main, argv(tiny_bert, *toy_files, out, "--num_train_epochs", 5))
    line = one_error_line(capsys)
    assert "No space left on device" in line and "free some space" in line
    assert digest(out / "checkpoints") == before  # nothing half-written left behind, nothing lost
    assert not (out / output_lock.LOCK_FILE).exists()

    monkeypatch.undo()  # space freed: the same command continues from the last complete checkpoint
    state = train_classifier.main(argv(tiny_bert, *toy_files, out, "--num_train_epochs", 5))
    assert state.completed_steps == 5 * 25


def test_unwritable_output_dir(tiny_bert, toy_files, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    exits_with_2(train_classifier.main, argv(tiny_bert, *toy_files, blocker / "out"))
    line = one_error_line(capsys)
    assert "cannot create --output_dir" in line and "writable" in line


def test_read_only_output_dir(tiny_bert, toy_files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o555)
    if os.geteuid() == 0:  # root writes into read-only folders anyway: the file system refuses as it would refuse
        real_open = open

        def read_only_open(file, mode="r", *args, **kwargs):
            if str(file).startswith(str(out)) and set(mode) & set("wxa+"):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(output_lock, "open", read_only_open, raising=False)  # the open() the lock calls
    try:
        exits_with_2(train_classifier.main, argv(tiny_bert, *toy_files, out))
    finally:
        out.chmod(0o755)
    assert "cannot write in --output_dir" in one_error_line(capsys)
    assert not list(out.iterdir())  # nothing written


# ---------------------------------------------------------------------------
# Rotation.
# ---------------------------------------------------------------------------


def test_rotation_keeps_the_newest_and_empties_files_before_deleting(trained, tiny_bert, toy_files, tmp_path):
    out = copy_of(trained, tmp_path)
    oldest = checkpoints(out)[0]
    # A hard link sees the file's content after the folder is deleted: emptied files
    # are what keeps Google Drive's trash from filling up with old checkpoints.
    kept_link = tmp_path / "link-to-old-optimizer"
    os.link(oldest / "optimizer.bin", kept_link)
    assert kept_link.stat().st_size > 0
    train_classifier.main(argv(tiny_bert, *toy_files, out, "--num_train_epochs", 5, "--keep_last", 1))
    remaining = checkpoints(out)
    assert len(remaining) == 1 and newest_state(out)["completed_steps"] == 5 * 25
    assert not oldest.exists() and kept_link.stat().st_size == 0


def test_resuming_an_older_checkpoint_makes_its_continuation_the_newest(trained, tiny_bert, toy_files, tmp_path):
    out = copy_of(trained, tmp_path)
    older, newer = checkpoints(out)
    assert [
        newest_state(out)["completed_steps"],
        json.loads((older / checkpoint_files.STATE_FILE).read_text())["state"]["completed_steps"],
    ] == [100, 75]
    # Go back to step 75 and train to step 90 instead.
    args = argv(tiny_bert, *toy_files, out, "--max_train_steps", 90)
    state = train_classifier.main(args + ["--resume_from_checkpoint", str(older)])
    assert state.completed_steps == 90
    # The step-100 checkpoint of the abandoned branch is older now: the same command
    # finds the step-90 one, not the one with the most steps.
    saved = {
        p.name: json.loads((p / checkpoint_files.STATE_FILE).read_text())["state"]["completed_steps"]
        for p in checkpoints(out)
    }
    assert saved == {"step_00000090": 90, newer.name: 100}
    state = train_classifier.main(args)
    assert state.completed_steps == 90


def test_a_crash_between_the_two_renames_of_a_swap_loses_nothing(trained, tiny_bert, toy_files, tmp_path, capsys):
    """swap_in renames the old folder away, then the new one in: a crash between the two leaves
    only .old-<name> (and the new one's .tmp- folder). The next run puts the old one back, for a
    checkpoint and for best/."""
    out = copy_of(trained, tmp_path)
    newest = checkpoints(out)[-1]
    newest.rename(newest.with_name(f".old-{newest.name}"))
    (out / "checkpoints" / f".tmp-{newest.name}").mkdir()  # the new one, half written
    (out / "best").rename(out / ".old-best")
    capsys.readouterr()
    state = train_classifier.main(argv(tiny_bert, *toy_files, out, "--num_train_epochs", 5))
    printed = capsys.readouterr()
    assert f"Resumed from {newest}: epoch 4, step 100" in printed.out
    assert f"{newest} was being replaced" in printed.out and f"{out / 'best'} was being replaced" in printed.out
    assert state.completed_steps == 125 and (out / "best" / "model.safetensors").exists()
    assert not list((out / "checkpoints").glob(".*"))


# ---------------------------------------------------------------------------
# Loading never runs code from a checkpoint.
# ---------------------------------------------------------------------------


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(checkpoint, name, obj):
    with open(checkpoint / name, "wb") as f:
        pickle.dump(obj, f)
    meta = json.loads((checkpoint / checkpoint_files.STATE_FILE).read_text())
    meta["files"][name] = (checkpoint / name).stat().st_size  # sizes match: it looks complete
    atomic_files.write_json(checkpoint / checkpoint_files.STATE_FILE, meta)


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl"])
def test_planted_pickle_is_refused_not_executed(name, trained, tiny_bert, toy_files, tmp_path, capsys):
    out = copy_of(trained, tmp_path)
    older, newest = checkpoints(out)
    marker = tmp_path / "pwned"
    plant(newest, name, Payload(marker))
    capsys.readouterr()
    train_classifier.main(argv(tiny_bert, *toy_files, out))
    printed = capsys.readouterr().out
    assert not marker.exists()
    assert f"could not load checkpoint {newest}" in printed and f"Resumed from {older}" in printed
    assert final_weights(out) == final_weights(trained)

    # With no older checkpoint to fall back on, the run stops instead of starting over
    # (which would rotate the checkpoints away).
    shutil.rmtree(out / "checkpoints")
    shutil.copytree(trained / "checkpoints", out / "checkpoints")
    for path in checkpoints(out)[:-1]:
        shutil.rmtree(path)
    plant(checkpoints(out)[0], name, Payload(marker))
    before = digest(out / "checkpoints")
    exits_with_2(train_classifier.main, argv(tiny_bert, *toy_files, out, "--num_train_epochs", 5))
    assert "no checkpoint" in one_error_line(capsys) and not marker.exists()
    assert digest(out / "checkpoints") == before


def test_checkpoint_files_hold_no_pickled_code(trained):
    """Everything the loader unpickles loads with torch's weights_only=True."""
    import torch

    for path in checkpoints(trained)[-1].iterdir():
        if path.suffix in (".bin", ".pkl"):
            from accelerate.utils import load

            assert load(path) is not None, path
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            assert all(isinstance(t, torch.Tensor) for t in load_file(path).values())


def test_resume_on_another_number_of_processes_is_refused_clearly(trained, tiny_bert, toy_files, tmp_path, capsys):
    out = copy_of(trained, tmp_path)
    for path in checkpoints(out):  # as if written by a 2-process run
        meta = json.loads((path / checkpoint_files.STATE_FILE).read_text())
        meta["fingerprint"]["num_processes"] = 2
        atomic_files.write_json(path / checkpoint_files.STATE_FILE, meta)
    before = digest(out / "checkpoints")
    exits_with_2(train_classifier.main, argv(tiny_bert, *toy_files, out, "--num_train_epochs", 5))
    line = one_error_line(capsys)
    assert "num_processes: 2 -> 1" in line and "2 process(es)" in line and "--no_resume" in line
    assert digest(out / "checkpoints") == before
