"""One run per output folder: a lock file with a heartbeat, taken over from a run that is gone
(killed, or a Colab runtime that vanished), and checked by every process, so every machine writes
into the same folder.

Tests (in tests/, unless named otherwise):
- test_faults.py (test_second_run_on_the_same_output_dir_refuses, the lock of another machine, of a
  dead process)
- test_scale_out.py::test_every_machine_must_see_the_same_output_folder"""

import atexit
import contextlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from accelerate.utils import (
    broadcast_object_list,
)

from machinery.errors import UserError
from machinery.waits import Waits, every_process

LOCK_FILE = ".lock"  # in --output_dir while a run uses it


class OutputLock:
    """One run per output folder: two runs writing checkpoints into one folder would wreck each
    other's. The lock file names its host and process and is touched every HEARTBEAT seconds. A
    run killed with SIGKILL (or a vanished Colab runtime) cannot remove it, so it is taken over
    when its process is gone (same machine) or its heartbeat is older than STALE seconds (another
    machine, such as an earlier runtime on the same Drive)."""

    HEARTBEAT, STALE = 20, 120
    held = None

    def __init__(self, output_dir):
        self.path = Path(output_dir) / LOCK_FILE
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self.stop = threading.Event()

    def acquire(self):
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create --output_dir {folder} ({err.strerror}); pass a writable one") from None
        for _ in range(3):
            try:
                with open(self.path, "x") as f:  # "x": created only if there is none, atomically
                    json.dump(self.me, f)
            except FileExistsError:
                self.check_holder()
                continue
            except OSError as err:
                raise UserError(
                    f"cannot write in --output_dir {folder} ({err.strerror}); pass a writable one"
                ) from None
            OutputLock.held = self
            threading.Thread(target=self.heartbeat, daemon=True).start()
            atexit.register(OutputLock.release_held)
            return
        raise UserError(f"could not lock {self.path}; another run keeps taking it, or remove the file")

    def check_holder(self):
        """The lock exists: refuse if its run is alive, else remove it (taken over next try)."""
        try:
            age = time.time() - self.path.stat().st_mtime
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return  # released meanwhile
        except (OSError, ValueError):
            holder = {}  # being written, or garbage
        if holder == self.me:
            alive = False  # our own, left by an earlier call in this process
        elif holder.get("host") == self.me["host"]:
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
        pass  # someone else's, or unknown: assume alive
    return True


def lock_output_dir(accelerator, output_dir):
    """The main process of the whole job takes the folder's lock. Then every process looks for
    that lock: each writes its random state (and its shards) into --output_dir, so every machine
    must see the same folder, or a resumed run would find some processes' files missing. Every
    process stops, with one message, if either fails."""
    problem = None
    if accelerator.is_main_process:
        try:
            OutputLock(output_dir).acquire()
        except UserError as err:
            problem = str(err)
    if problem is None and accelerator.is_main_process:
        for old in Path(output_dir).glob(".done-*"):  # main_process_first's, of a job that was killed
            old.unlink(missing_ok=True)
    lock = broadcast_object_list([problem, OutputLock.held and OutputLock.held.me])  # the main process's, to all
    problem, holder = lock
    if holder is not None:
        Waits.job = f"{holder['host']}-{holder['pid']}"
    if problem is None and not accelerator.is_main_process and not sees_lock(Path(output_dir) / LOCK_FILE, holder):
        problem = (
            f"process {accelerator.process_index} on {socket.gethostname()} does not see the lock that the main "
            f"process ({holder['host']}) wrote in {output_dir}: every machine must use one shared --output_dir "
            "(a network file system mounted at the same path)"
        )
    problems = [p for p in every_process(problem) if p is not None]
    if problems:
        OutputLock.release_held()
        raise UserError(problems[0])


def sees_lock(path, holder, wait=30.0):
    """Whether the lock file at `path` is `holder`'s. A network file system may show it some
    seconds late, so a folder that exists is looked at again for `wait` seconds; one that does
    not exist here is no shared folder."""
    deadline = time.monotonic() + wait
    while path.parent.is_dir():
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()) == holder:
                return True
        if time.monotonic() > deadline:
            break
        time.sleep(1.0)
    return False
