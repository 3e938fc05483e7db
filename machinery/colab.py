"""Google Colab: where it mounts Google Drive, and the mount itself when --drive asks for it, so a
Colab user's checkpoints and outputs land on Drive and outlive the runtime.

Tests (in tests/, unless named otherwise):
- test_train_classifier.py::test_drive_outside_colab_says_so
- test_notebook.py::test_notebook_runs_end_to_end"""

import os
import sys

from machinery.errors import UserError

# Colab mounts Google Drive here; outputs default to a folder inside it.
DRIVE_MOUNT, DRIVE_ROOT, DRIVE_FOLDER = "/content/drive", "/content/drive/MyDrive", "lm-training"


def in_colab():
    return "COLAB_RELEASE_TAG" in os.environ or "google.colab" in sys.modules


def mount_drive_if_asked(args):
    """--drive: mount Google Drive if it is not mounted, or say in one line why it cannot be."""
    if not args.drive or os.path.isdir(DRIVE_ROOT):
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
