"""What each engine (DeepSpeed, FSDP2, XLA without a TPU) needs before `prepare`, so that
`accelerate launch script.py` works on any of them unchanged: DeepSpeed's batch and clipping
taken from the flags, FSDP2's units, the XLA process index.

Tests (in tests/, unless named otherwise):
- test_launch_paths.py (every engine learns the same model, resumes a kill, exports what it
  evaluated, evaluates whole with --eval_only)
- test_common.py::test_fsdp_units_are_the_transformer_layers_not_the_embeddings"""

import os

from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from machinery.errors import UserError
from machinery.sampling import global_batch_size
from machinery.xla import work_around_xla_gaps


def forget_the_last_run():
    """Accelerate keeps process-wide state that the first Accelerator fixes: a second run in one
    Python process (a notebook calling main() twice) would keep the first run's precision and
    compilation. Clear it (not the processes) before the next Accelerator starts."""
    AcceleratorState._reset_state()
    GradientState._reset_state()


def adapt_to_the_engine(accelerator, args):
    """Right after the Accelerator starts: a launch that cannot work is refused in one line,
    DeepSpeed takes its batch and clipping from the flags, XLA gets its gaps filled."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # torchrun without GPUs: N copies of one run, each training alone, all in one output folder.
    if world_size > 1 and accelerator.num_processes == 1:
        raise UserError(
            f"{world_size} processes were launched but each runs alone; on CPU set "
            "ACCELERATE_USE_CPU=1 (or use `accelerate launch --cpu`)"
        )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator, args)
        if args.eval_only:
            # No engine is built without an optimizer, so nothing would gather weights that ZeRO-3
            # splits as they load (zero3_init_flag): the model loads whole on every process.
            unset_hf_deepspeed_config()
    if accelerator.distributed_type == DistributedType.XLA:
        work_around_xla_gaps(accelerator)


def load_whole_from_now_on(accelerator):
    """At the end of training under DeepSpeed: ZeRO-3 would split a model that from_pretrained
    loads (the demo's, best/) over processes that have ended (it waits for them)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        unset_hf_deepspeed_config()


def configure_deepspeed(accelerator, args):
    """DeepSpeed clips gradients and counts batches itself, from its config, where Accelerate
    fills "auto" with a clipping of 1.0 and a batch taken from the smaller of the dataloaders:
    fill them from the flags instead."""
    plugin = accelerator.state.deepspeed_plugin
    wanted = {
        "gradient_clipping": args.max_grad_norm,  # 0: no clipping, as in the other engines
        "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
        "train_batch_size": global_batch_size(args, accelerator),
    }
    for key, value in wanted.items():
        if plugin.is_auto(key) or key not in plugin.deepspeed_config:
            plugin.deepspeed_config[key] = value
        elif plugin.deepspeed_config[key] != value:
            raise UserError(
                f"the DeepSpeed config sets {key} to {plugin.deepspeed_config[key]}, the flags make it {value}; "
                f'set it to "auto" in the config to take the flags\' value'
            )


def set_fsdp_units(accelerator, model):
    """Under FSDP, the modules it shards as units (gathering each one's weights only while it
    computes): the model's transformer layers. Accelerate's default, the model's
    _no_split_modules, also names BERT's and RoBERTa's embedding modules, whose word embeddings
    Accelerate then shards a second time, and FSDP2 fails. A unit list from the accelerate config
    (fsdp_transformer_layer_cls_to_wrap) is kept."""
    if (
        accelerator.distributed_type != DistributedType.FSDP
        or accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap
    ):
        return
    word_embeddings = model.get_input_embeddings()
    units = [name for name in model._no_split_modules or [] if not holds(model, name, word_embeddings)]
    accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = units or None


def holds(model, class_name, part):
    """Whether the modules of class `class_name` in `model` hold the module `part`."""
    return any(type(m).__name__ == class_name and any(inner is part for inner in m.modules()) for m in model.modules())


def refuse_fsdp_for_roberta_mlm(accelerator):
    """pretrain_mlm.py under FSDP2: one line, rather than an error from its depths."""
    if accelerator.distributed_type == DistributedType.FSDP:
        raise UserError(
            "FSDP2 cannot shard RoBERTa's masked-LM head (its bias is shared between two FSDP units, which torch 2.13 "
            "refuses): use DeepSpeed (configs/deepspeed_zero3.yaml) or DDP (configs/multi_gpu.yaml)"
        )
