import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Offline, always: nothing in the tests may depend on a download. Set before
# transformers/datasets are imported, since they read these at import.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
# Runs are compared to the bit: MKL on one thread, so that how it splits a matrix product cannot
# change their last bits (see tests/helpers.py: offline_env).
os.environ["MKL_NUM_THREADS"] = "1"
# A datasets cache (and the token files beside it) of this session's own: the tests neither read
# what an earlier session left nor fill the user's cache.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="hf-datasets-tests-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the scripts
sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers

import helpers  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    return helpers.make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def toy_files(tmp_path_factory):
    """A learnable sentiment toy task: 400 training rows, 30 validation rows."""
    d = tmp_path_factory.mktemp("toy")
    return helpers.write_csv(d / "train.csv", helpers.toy_rows(400, seed=1)), helpers.write_csv(
        d / "dev.csv", helpers.toy_rows(30, seed=2)
    )
