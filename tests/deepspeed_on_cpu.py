"""Run a script under Accelerate's DeepSpeed ZeRO on CPU processes (gloo), the stand-in here for
`accelerate launch --config_file configs/deepspeed_zero3.yaml script.py` on GPUs:

    ZERO_STAGE=3 torchrun --nproc_per_node 2 tests/deepspeed_on_cpu.py finetune_gpt2.py ...

Accelerate turns DeepSpeed off for CPU processes (ACCELERATE_USE_CPU, --cpu), and without a GPU
it starts no process group of its own (each process would think it is alone). Here the
environment that `accelerate launch --use_deepspeed` sets is set, and Accelerate's process state
is made first with the gloo backend (the script's Accelerator keeps it), so Accelerate's own
DeepSpeed code runs: `deepspeed.initialize` at `prepare`, ZeRO-sharded `save_state` /
`load_state` (a pytorch_model/ folder of zero_pp_rank_* files), and `get_state_dict` gathering
the full weights (ZeRO-3: zero3_save_16bit_model, as configs/deepspeed_zero3.yaml) for the
export. (tests/launch_worker.py calls use_deepspeed() in the process that runs the script.)"""

import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def use_deepspeed(zero_stage):
    os.environ.pop("ACCELERATE_USE_CPU", None)  # it would switch DeepSpeed off
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator: gloo without oneccl_bindings
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what `accelerate launch --use_deepspeed` sets
    os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"] = str(zero_stage)
    os.environ["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] = "true"
    os.environ["ACCELERATE_DEEPSPEED_ZERO3_INIT"] = "true"  # as configs/deepspeed_zero3.yaml: split as it loads

    import deepspeed.comm.torch  # noqa: F401
    from accelerate.state import PartialState

    # DeepSpeed's shared-memory all-reduce for CPU processes is a C++ op compiled (g++, ninja) at
    # the first init_distributed, about 25 s, and it makes some ZeRO-3 runs abort at exit: plain
    # gloo collectives instead. (`deepspeed.comm.torch` as an attribute is torch itself: patch the
    # module through sys.modules.)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    PartialState(backend="gloo")  # deepspeed.comm.init_distributed("gloo"); the distributed type is DEEPSPEED


if __name__ == "__main__":
    use_deepspeed(os.environ.get("ZERO_STAGE", "3"))
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
