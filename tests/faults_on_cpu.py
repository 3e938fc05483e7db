"""Run a script on CPU processes with a fault of a multi-GPU job made to happen, for the tests of
tests/test_scale_out.py:

    OOM_RANK=1 OOM_ABOVE=8 torchrun --nproc_per_node 2 tests/faults_on_cpu.py train_classifier.py
    SLOW_RANK=0 SLOW_SECONDS=8 COLLECTIVE_TIMEOUT=4 torchrun ... faults_on_cpu.py finetune_gpt2.py

OOM_RANK: that process's GPU holds at most OOM_ABOVE examples of a training batch (a larger one
raises CUDA's out-of-memory error). SLOW_RANK: that process takes SLOW_SECONDS longer to tokenize,
as on a corpus of gigabytes, while collectives time out after COLLECTIVE_TIMEOUT seconds (NCCL's
default is 10 minutes)."""

import os
import runpy
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
RANK = os.environ.get("RANK", "0")


def small_gpu(above):
    import torch
    from transformers import PreTrainedModel

    real_call = torch.nn.Module.__call__

    def call(self, *args, **kwargs):
        batch = kwargs.get("input_ids")
        if isinstance(self, PreTrainedModel) and self.training and batch is not None and len(batch) > above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_call(self, *args, **kwargs)

    torch.nn.Module.__call__ = call


def slow_tokenizing(seconds):
    from machinery import token_files

    real_write = token_files.TokenFile.write

    def write(self, *args, **kwargs):
        time.sleep(seconds)
        return real_write(self, *args, **kwargs)

    token_files.TokenFile.write = write


if __name__ == "__main__":
    if os.environ.get("OOM_RANK") == RANK:
        small_gpu(int(os.environ["OOM_ABOVE"]))
    if os.environ.get("SLOW_RANK") == RANK:
        slow_tokenizing(float(os.environ["SLOW_SECONDS"]))
    if "COLLECTIVE_TIMEOUT" in os.environ:  # the script's Accelerator keeps this process group
        from accelerate import PartialState

        PartialState(cpu=True, timeout=timedelta(seconds=float(os.environ["COLLECTIVE_TIMEOUT"])))
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
