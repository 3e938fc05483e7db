"""A script run as a command: bad input, or a full or read-only disk, ends it with one line on
stderr that names the problem and the fix, and exit code 2, never a traceback, never costing a
checkpoint; the output folder's lock and the signal handlers are given back however it ends (a
notebook keeps Ctrl-C).

Tests (in tests/, unless named otherwise):
- test_every_script.py::test_bad_input_sweep
- test_every_script.py::test_a_run_called_in_process_gives_the_signals_back
- test_train_classifier.py::test_bad_input_from_the_command_line_has_no_traceback
- test_faults.py::test_full_disk_keeps_the_previous_checkpoint"""

import os
import sys

from tqdm.auto import tqdm

from machinery.batch_finder import train_with_a_batch_that_fits
from machinery.errors import STORAGE_ERRORS, UserError
from machinery.flags import command_line
from machinery.output_lock import OutputLock
from machinery.signals import StopSignals


def run(train, parse, script_name, argv=None):
    """train(parse(argv)), with a UserError (or a full or unwritable disk) turned into one line on
    stderr and exit code 2. The command line is written down for the model card."""
    try:
        args = parse(argv)
        args.command = command_line(script_name, sys.argv[1:] if argv is None else argv, args.hub_token)
        if args.auto_find_batch_size:
            return train_with_a_batch_that_fits(train, args)
        return train(args)
    except UserError as err:
        message, one_process = str(err), err.one_process
    except OSError as err:
        if err.errno not in STORAGE_ERRORS:
            raise
        one_process = False
        message = (
            f"cannot write {err.filename or 'the output'} ({err.strerror}); free some space or pass "
            "another --output_dir, then run the same command again (complete checkpoints are intact)"
        )
    finally:
        OutputLock.release_held()
        StopSignals.restore()
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()  # so the message starts on a line of its own
    if one_process or os.environ.get("RANK", "0") == "0":  # several processes stop alike: the first says why
        print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2) from None
