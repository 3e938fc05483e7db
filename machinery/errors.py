"""Bad input becomes one line: the message names the problem and the fix, and the run exits with
code 2, never with a traceback, never costing a checkpoint (common.run_script turns these into
that line).

Tests (in tests/, unless named otherwise):
- test_every_script.py::test_bad_input_sweep
- test_train_classifier.py::test_bad_input_gets_one_line_and_keeps_checkpoint
- test_common.py::test_first_line_of_an_error"""

import errno


class UserError(Exception):
    """Bad input or a bad setting: the message names the problem and the fix. `one_process`: only
    this process met it (an out-of-memory), so it says so itself; otherwise the first one does."""

    def __init__(self, message, one_process=False):
        super().__init__(message)
        self.one_process = one_process


STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}  # a full disk or Drive quota, read-only


def first_line(err, limit=200):
    """An exception's message as one short line; its type when the message is empty (some loaders
    raise bare exceptions, and an empty reason says nothing)."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__
