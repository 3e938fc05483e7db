"""Run a script under Accelerate's FSDP2 on CPU processes (gloo), the stand-in here for `accelerate
launch --config_file configs/fsdp.yaml script.py` on GPUs:

    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 tests/fsdp_on_cpu.py finetune_gpt2.py ...

Accelerate turns FSDP on only for GPUs. Here its state is switched to FSDP right after the script
makes its Accelerator, so Accelerate's own FSDP2 code runs: `fully_shard` at `prepare`, sharded
`save_state` / `load_state` (sub-folders of .distcp files), and `get_state_dict` gathering the
full weights for the export. (tests/launch_worker.py calls use_fsdp2() in the process that runs
the script.)"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accelerate.state import AcceleratorState, PartialState  # noqa: E402
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin  # noqa: E402

import common  # noqa: E402


def use_fsdp2():
    setup = common.setup

    def setup_with_fsdp(args, script_name):
        accelerator = setup(args, script_name)
        PartialState().distributed_type = DistributedType.FSDP
        # AcceleratorState() copies PartialState's settings each time it is made: after the switch.
        AcceleratorState().fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            state_dict_type="SHARDED_STATE_DICT",
            auto_wrap_policy="transformer_based_wrap",  # each of the model's _no_split_modules (GPT2Block, ...)
        )
        assert accelerator.is_fsdp2
        return accelerator

    common.setup = setup_with_fsdp


if __name__ == "__main__":
    use_fsdp2()
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
