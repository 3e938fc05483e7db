"""What the three training scripts share, written once. Read a script first: its loop is the lesson.

Here, first, what a script's train() calls around its loop, in the order it calls it: the flags,
setup() (the Accelerator: device, precision, processes), the dataloaders, the optimizer and its
schedule, Run (the bookkeeping around the loop: counting, logging, checkpointing, keeping the best
model), the evaluation loop, and run(), which turns bad input into one line. After a banner: reading
data of any size, then the machinery that keeps work safe (the output folder's lock, stop signals,
checkpoints, the export and its model card, the Hub, throughput), which a reader following a loop
may skip. Nothing here knows a script's model or data."""

import argparse
import atexit
import collections
import contextlib
import errno
import glob
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pyarrow.compute as pc
import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (
    SCALER_NAME,
    DistributedType,
    broadcast_object_list,
    find_executable_batch_size,
    find_tied_parameters,
    is_torch_xla_available,
    retie_parameters,
    set_seed,
)
from accelerate.utils import load as accelerate_load
from accelerate.utils.memory import should_reduce_batch_size
from matplotlib.figure import Figure
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from transformers.pytorch_utils import id_tensor_storage

# Colab mounts Google Drive here; outputs default to a folder inside it.
DRIVE_MOUNT, DRIVE_ROOT, DRIVE_FOLDER = "/content/drive", "/content/drive/MyDrive", "lm-training"


class UserError(Exception):
    """Bad input or a bad setting: the message names the problem and the fix. `one_process`: only
    this process met it (an out-of-memory), so it says so itself; otherwise the first one does."""

    def __init__(self, message, one_process=False):
        super().__init__(message)
        self.one_process = one_process


STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}  # a full disk or Drive quota, read-only


# ---- The flags every script takes.
class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default once: a help text that says its own default ("default:
    every core") keeps it, rather than getting a second "(default: None)" after it."""

    def _get_help_string(self, action):
        if "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(docstring, **defaults):
    """The flags every script takes (names as in Hugging Face's examples), with its `defaults`;
    it adds its own."""
    description = docstring.split("\n")[0]
    p = argparse.ArgumentParser(description=description, formatter_class=HelpWithDefaults)
    a = p.add_argument
    a("--model_name_or_path", help="hub name or local folder of the model to start from")
    a("--dataset_name", help="hub data set, or a folder saved with save_to_disk (when no --train_file)")
    a("--dataset_config_name", help="configuration of --dataset_name")
    a("--train_file", help="local training data")
    a("--validation_file", help="local validation data")
    a("--test_file", help="local test data, scored (or, for the classifier, predicted) with best/ after training")
    a("--validation_split_percentage", type=int, default=10, help="held out when there is no validation data")
    a("--max_train_samples", type=int, help="use only this many training samples (quick runs)")
    a("--max_eval_samples", type=int, help="use only this many validation samples (quick runs)")
    a("--preprocessing_num_workers", type=int, help="tokenizing processes, one core each (default: every core)")
    a(
        "--streaming",
        action="store_true",
        help="read the data as training goes (larger than the disk); needs --max_train_steps",
    )
    a("--output_dir", help=f"checkpoints and the model (default: outputs/<script>, in Colab {DRIVE_ROOT}/...)")
    a("--drive", action="store_true", help="Colab: put the outputs on Google Drive")
    a("--per_device_train_batch_size", type=int, default=8, help="batch size per GPU or process")
    a("--per_device_eval_batch_size", type=int, default=32, help="evaluation batch size per GPU or process")
    a("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    a("--learning_rate", type=float, default=5e-5, help="AdamW's peak learning rate")
    a("--weight_decay", type=float, default=0.0, help="AdamW's decay (never on biases and norms)")
    a("--max_grad_norm", type=float, default=1.0, help="clip gradients to this norm (0: off)")
    schedules = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]
    a("--lr_scheduler_type", default="linear", choices=schedules, help="how the learning rate changes")
    a("--num_warmup_steps", type=int, default=0, help="warmup, in optimizer steps")
    a("--num_train_epochs", type=int, default=3, help="epochs to train")
    a("--max_train_steps", type=int, help="optimizer steps to train; overrides --num_train_epochs")
    a("--early_stopping_patience", type=int, default=0, help="stop after N evaluations without improvement (0: never)")
    a("--seed", type=int, default=42, help="model initialization, data order, dropout")
    a("--mixed_precision", default="auto", choices=["auto", "no", "fp16", "bf16"], help="auto: bf16, fp16 on a T4")
    a("--torch_compile", action="store_true", help="compile the model (pays off on GPUs, fixed shapes, long runs)")
    a("--dataloader_num_workers", type=int, help="processes preparing batches (default: 2 on a GPU, 0 on CPU)")
    a("--checkpointing_steps", type=int, default=0, help="also save every N optimizer steps (0: off)")
    a("--save_every_minutes", type=float, default=10.0, help="also save every N minutes (0: off)")
    a("--keep_last", type=int, default=2, help="checkpoints to keep")
    a("--resume_from_checkpoint", help="resume from this checkpoint folder instead of the newest")
    a("--no_resume", action="store_true", help="start fresh, deleting the checkpoints in --output_dir")
    a("--logging_steps", type=int, default=10, help="log the training loss every N optimizer steps")
    a("--report_to", default="none", help="tensorboard, wandb, ... or all (Accelerate's trackers)")
    a("--eval_only", action="store_true", help="only evaluate --model_name_or_path (and --test_file), no training")
    a("--auto_find_batch_size", action="store_true", help="on a GPU out of memory: halve the batch, accumulate twice")
    a("--push_to_hub", action="store_true", help="upload best/ with its model card to the Hugging Face Hub at the end")
    a("--hub_model_id", help="the Hub repository (default: <your user>/<the output folder's name>)")
    a("--hub_token", help="a Hub token that may write there (default: the one `hf auth login` saved)")
    a("--hub_private_repo", action="store_true", help="make the Hub repository private")
    p.set_defaults(**defaults)
    return p


def check_args(args):
    """Settings that can never work get one clear line before anything is touched."""
    length = "num_train_epochs" if args.max_train_steps is None else "max_train_steps"
    sizes = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
    for name in (*sizes, length, "keep_last", "logging_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if not 0 < args.validation_split_percentage < 100:
        raise UserError("--validation_split_percentage must be between 1 and 99")
    if args.streaming and args.max_train_steps is None:
        raise UserError("--streaming needs --max_train_steps: a stream's length is not known before it ends")


# ---- Device, precision and processes.
def setup(args, script_name):
    """Check the flags, start the Accelerator (device, precision, processes), check that
    --push_to_hub can upload, lock the output folder, seed, start the trackers."""
    check_args(args)
    if torch.cuda.is_available():
        # TF32 matmuls: ~free speed on Ampere and newer, precision loss irrelevant for training
        # (cuDNN has it already).
        torch.backends.cuda.matmul.allow_tf32 = True
    # Accelerate keeps process-wide state that the first Accelerator fixes: a second run in one
    # Python process (a notebook calling main() twice) would keep the first run's precision and
    # compilation. Clear it, not the processes.
    if is_torch_xla_available() and not is_torch_xla_available(check_is_tpu=True) and "LOCAL_RANK" not in os.environ:
        # XLA without a TPU (torch_xla's CPU or GPU client), one process that no launcher started:
        # Accelerate reads the process's local index from LOCAL_RANK there (-1 when unset), and
        # then no process is the first of its machine: nothing would be printed.
        os.environ["LOCAL_RANK"] = "0"
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=choose_mixed_precision(args.mixed_precision),
        # torch.compile at prepare(): fuses kernels; the first steps are slow while it compiles.
        dynamo_backend="inductor" if args.torch_compile else "no",
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
        # One scheduler step per optimizer step; Accelerate's default (one per process) would
        # miscount warmup and decay.
        step_scheduler_with_optimizer=False,
        # --streaming: each process reads the stream and keeps its share of each batch (its place in
        # the stream is then known in every process, and batches stay where the script wants them:
        # on the CPU for masking).
        dataloader_config=DataLoaderConfiguration(
            dispatch_batches=False if args.streaming else None,
            # A GPU's batches come from pinned memory: copy them without making the CPU wait for the
            # copy.
            non_blocking=torch.cuda.is_available(),
        ),
    )
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
    if args.push_to_hub:  # before any data or model is loaded: an upload that cannot happen stops the run now
        problem = broadcast_object_list([hub_problem(args) if accelerator.is_main_process else None])[0]
        if problem:
            raise UserError(problem)
    lock_output_dir(accelerator, args.output_dir)
    set_seed(args.seed)
    if args.report_to != "none":  # the settings, without a secret
        accelerator.init_trackers(script_name, config={k: v for k, v in vars(args).items() if k != "hub_token"})
    return accelerator


def work_around_xla_gaps(accelerator):
    """On XLA (TPUs): three things that assume other devices, made to work."""
    # transformers' from_pretrained turns on hub kernels (kernels.kernelize) by default; they have
    # none for XLA, and model.train() then raises "Unsupported device type 'xla'". Its own switch
    # turns them off for every model this process loads (the demo's pipeline too).
    os.environ["USE_HUB_KERNELS"] = "0"
    # Accelerate's save_state and load_state read each prepared dataloader's .dataset
    # (save_accelerator_state and load_accelerator_state in accelerate/checkpointing.py, 1.16),
    # which its XLA wrapper, MpDeviceLoaderWrapper, lacks: lend it the wrapped DataLoaderShard's.
    # (tests/test_xla.py says when Accelerate no longer needs this.)
    from accelerate.data_loader import MpDeviceLoaderWrapper

    if not hasattr(MpDeviceLoaderWrapper, "dataset"):
        MpDeviceLoaderWrapper.dataset = property(lambda loader: loader.dataloader.dataset)
    # load_state reads a checkpoint's weights with safetensors' load_model, which looks for tensors
    # that share memory in the model's own state_dict: XLA tensors have no memory it can point at
    # ("Attempted to access the data pointer on an invalid python storage").
    accelerator.register_load_state_pre_hook(load_models_from_the_cpu)


def load_models_from_the_cpu(models, input_dir):
    """Accelerate's load_state, for the weights (model.safetensors, model_1.safetensors, ...): read
    into CPU memory, copied into the models wherever they are, as strict as safetensors' load_model:
    every weight loaded, a tied one under any of its names (Accelerate saves it once on a CPU,
    under each name on XLA). The models are then taken off the list Accelerate loads itself."""
    for i, model in enumerate(models):
        weights = load_file(Path(input_dir) / f"model{f'_{i}' if i else ''}.safetensors")
        missing, unexpected = model.load_state_dict(weights, strict=False)
        tied = {name: group for group in find_tied_parameters(model) for name in group}
        missing = [name for name in missing if not set(tied.get(name, ())) & set(weights)]
        if missing or unexpected:
            raise RuntimeError(
                f"the checkpoint's weights do not fit the model: missing {missing}, unexpected {unexpected}"
            )
    models.clear()


def choose_mixed_precision(requested):
    """--mixed_precision, else what `accelerate launch --mixed_precision` set, else (auto) the
    best for this device."""
    if requested != "auto":
        return requested
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no") != "no":
        return os.environ["ACCELERATE_MIXED_PRECISION"]
    # Accelerate runs on XLA wherever torch_xla is installed (a TPU, or its CPU client in tests);
    # its TPU launcher sets no precision: bf16 is the TPU's own.
    if is_torch_xla_available():
        return auto_mixed_precision("xla")
    if torch.cuda.is_available():
        return auto_mixed_precision("cuda", torch.cuda.get_device_capability())
    return auto_mixed_precision("cpu")


def auto_mixed_precision(device_type, capability=None):
    """bf16 on TPUs and on GPUs of compute capability 8.0 or more (A100, L4, H100), which compute
    in it natively. fp16 with loss scaling on older GPUs (Colab's T4 is 7.5, a V100 7.0): they
    have no bf16 units, and torch.cuda.is_bf16_supported() says yes there only because it counts
    slow emulation. "no" on a CPU."""
    if device_type == "xla":
        return "bf16"
    if device_type == "cuda":
        return "bf16" if tuple(capability) >= (8, 0) else "fp16"
    return "no"


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


# ---- Batches, the optimizer and its schedule.
def make_dataloaders(
    args, accelerator, collate_fn, train_data, eval_data, test_data=None, sampler=None, eval_collate_fn=None
):
    """The training DataLoader (None without training data: --eval_only), in an EpochSampler's
    order or `sampler`'s, and the evaluation ones (the test one None without test data), in
    order. `eval_collate_fn`: another collate_fn for evaluation. Every DataLoader has a generator
    of its own: without one, each new pass over it draws a seed from the global random state,
    which dropout uses and checkpoints restore, so a resumed run (one pass more) would drop other
    units. On a GPU, worker processes build the next batches while it computes, into pinned
    memory, which it copies from faster (not for a stream: its place is kept in this process)."""
    on_gpu = accelerator.device.type == "cuda"
    workers = 2 if on_gpu else 0
    if args.dataloader_num_workers is not None:
        workers = args.dataloader_num_workers
    options = {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": on_gpu}

    def loader(data, batch_size, collate, **more_options):
        """A DataLoader with a generator of its own; None without data."""
        if data is None:
            return None
        return DataLoader(data, batch_size, collate_fn=collate, generator=torch.Generator(), **more_options)

    train_options = dict(options)
    if isinstance(train_data, torch.utils.data.IterableDataset):  # a stream: it keeps its place in this process
        train_options = {"pin_memory": on_gpu}
    elif train_data is not None:  # (no training data: --eval_only)
        batch = global_batch_size(args, accelerator)
        train_options["sampler"] = sampler or EpochSampler(len(train_data), batch, args.seed)
    eval_collate_fn = eval_collate_fn or collate_fn
    train = loader(train_data, args.per_device_train_batch_size, collate_fn, **train_options)
    evaluation = loader(eval_data, args.per_device_eval_batch_size, eval_collate_fn, **options)
    test = loader(test_data, args.per_device_eval_batch_size, eval_collate_fn, **options)
    return train, evaluation, test


def global_batch_size(args, accelerator):
    """Examples per optimizer step: per device x processes x accumulated micro-batches."""
    return args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps


class EpochSampler(torch.utils.data.Sampler):
    """The training order. Each epoch's shuffle depends only on (seed, epoch): a resumed run sees
    the same batches. It is padded with the epoch's first samples to a whole number of global
    batches, so every optimizer step sees one full global batch, split any way over processes and
    accumulation: a run may resume on another split of the same global batch and end at the same
    weights. (Without it, 2 processes would pad the last batch with repeated samples while 1
    process accumulating 2 would average a half batch.) So every epoch is also a whole number of
    optimizer steps: no micro-batch is carried over an epoch's end, and a run resumed from a
    checkpoint saved at that end (a kill during its evaluation) starts the next epoch as an
    uninterrupted run does. Its own generator, never the global random state that dropout uses
    and checkpoints restore."""

    def __init__(self, num_samples, global_batch, seed):
        self.num_samples, self.global_batch, self.seed, self.epoch = num_samples, global_batch, seed, 0

    def set_epoch(self, epoch):  # called through the prepared dataloader's set_epoch
        self.epoch = epoch

    def shuffle(self, generator):
        """This epoch's order of the samples (a subclass may group them)."""
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self):
        order = torch.as_tensor(self.shuffle(torch.Generator().manual_seed(self.seed + self.epoch)))
        padding = order[torch.arange(len(self) - len(order)) % len(order)]
        for part in torch.cat([order, padding]).split(65_536):  # Python ints a slice at a time: constant memory
            yield from part.tolist()

    def __len__(self):
        return math.ceil(self.num_samples / self.global_batch) * self.global_batch


def flops_per_token(model, seq_len):
    """Training FLOPs per token as nanoGPT and the PaLM paper count them: 6 per weight in a
    matrix product (2 forward, 4 backward), plus attention's 12 x layers x width x sequence
    length. Embedding lookups are no matrix products; an output layer tied to the embeddings is.
    Counted before `prepare`, which splits weights under FSDP, and from each weight's whole
    shape, which ZeRO-3 splits as the model loads."""
    embeddings = {id(module.weight) for module in model.modules() if isinstance(module, torch.nn.Embedding)}
    matmul = sum(math.prod(full_shape(p)) for p in model.parameters() if id(p) not in embeddings)
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        matmul += math.prod(full_shape(head.weight))
    # Hugging Face configs map these names (GPT-2's n_layer, n_embd too); where one is missing, no
    # attention term.
    layers, width = getattr(model.config, "num_hidden_layers", 0), getattr(model.config, "hidden_size", 0)
    return 6 * matmul + 12 * layers * width * seq_len


def full_shape(param):
    """A weight's shape. DeepSpeed ZeRO-3 splits weights over the processes as the model loads:
    each then holds an empty tensor here, and its whole shape is in `ds_shape`."""
    return getattr(param, "ds_shape", param.shape)


def make_optimizer(model, args, device):
    """AdamW without weight decay on biases and normalization weights (the 1-D tensors); fused on
    a GPU: one kernel for all parameters instead of one per tensor. On XLA (TPUs) the model is put
    on the device first, its tied weights tied again (see to_xla)."""
    if device.type == "xla":
        to_xla(model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if len(full_shape(p)) >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if len(full_shape(p)) < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.learning_rate, fused=device.type == "cuda")


def to_xla(model, device):
    """Move `model` to an XLA device, a weight shared by two modules still one parameter (GPT-2's
    and RoBERTa's output layer is their input embeddings). Moving to XLA makes every module's
    parameters anew, one module at a time (their tensors cannot change device in place), so a
    shared one becomes two, and only the first is trained: the model is no longer GPT-2.
    Accelerate's prepare() ties them again only for devices named "tpu", and torch_xla's are named
    "xla"; so the model is moved here, with Accelerate's own calls, and prepare() finds it there."""
    tied = find_tied_parameters(model)
    model.to(device)
    retie_parameters(model, tied)


def make_scheduler(accelerator, optimizer, args, train_dataloader):
    """The learning-rate schedule, counted in optimizer steps. Made before `prepare`, which must
    see it with the model and the optimizer (DeepSpeed drives it from its engine then, and
    checkpoints hold it), so the training batches per process are counted here: the EpochSampler
    makes them divide exactly."""
    batches = batches_per_process(train_dataloader, accelerator.num_processes)
    _, total_steps, _ = training_steps(batches, args)  # (steps per epoch and epochs are Run's to tell)
    return get_scheduler(args.lr_scheduler_type, optimizer, args.num_warmup_steps, total_steps)


def batches_per_process(dataloader, num_processes=1):
    """Batches an epoch gives each process: a dataloader before `prepare` gives them all
    (num_processes splits them); a stream (--streaming) has no length (None)."""
    # On XLA a prepared dataloader is Accelerate's MpDeviceLoaderWrapper, which has no .dataset:
    # the DataLoaderShard it wraps (its .dataloader) has.
    dataloader = getattr(dataloader, "dataloader", dataloader)
    if isinstance(dataloader.dataset, torch.utils.data.IterableDataset):
        return None
    return len(dataloader) // num_processes


def training_steps(batches_per_epoch, args):
    """Optimizer steps per epoch, in total, and the number of epochs that takes.
    `batches_per_epoch` is per process (the prepared dataloader's length). EpochSampler makes an
    epoch a whole number of optimizer steps; were it not, a partial accumulation at the epoch's
    end would still make a step (the ceil). A stream (None) is one epoch of --max_train_steps,
    unless it ends first."""
    if batches_per_epoch is None:
        return args.max_train_steps, args.max_train_steps, 1
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    total_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    return steps_per_epoch, total_steps, math.ceil(total_steps / steps_per_epoch)


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


# ---- The bookkeeping around the loop.
@dataclass
class TrainingState:
    """Where training stands, saved in every checkpoint (never guessed from folder names)."""

    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # micro-batches of the current epoch already trained on (per process)
    completed_steps: int = 0  # optimizer steps, over all epochs
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    evaluated_step: int | None = None  # the step of the last epoch-end evaluation, done and exported
    log_history: list = field(default_factory=list)
    stream_position: dict | None = None  # --streaming: where in the stream the used blocks end (StreamedBlocks)
    train_seconds: float = 0.0  # time spent in this run and the ones it resumed (for the model card)


class Run:
    """The bookkeeping around a training loop: where training stands (TrainingState), counting
    batches and optimizer steps, logging and checkpointing when due, and at each epoch's end
    keeping the best model. Made with what it keeps track of; resume_or_start() then loads the
    newest checkpoint. `metric_for_best_model` picks best/ (for a loss, lower is better);
    `settings`, `may_change`: see Checkpointer; `stream`: a StreamedBlocks (--streaming);
    `about`: the pipeline tag and the task, for the model card."""

    def __init__(
        self, accelerator, args, *, model, tokenizer, lr_scheduler, train_dataloader, flops_per_token, settings,
        may_change=(), metric_for_best_model="loss", stream=None, about,
    ):  # fmt: skip
        self.accelerator, self.args = accelerator, args
        self.model, self.tokenizer, self.lr_scheduler = model, tokenizer, lr_scheduler
        self.flops_per_token, self.stream, self.about = flops_per_token, stream, about
        self.metric = metric_for_best_model
        self.output_dir = Path(args.output_dir)
        self.best_dir = self.output_dir / "best"
        batches = batches_per_process(train_dataloader)
        self.steps_per_epoch, self.total_steps, self.num_epochs = training_steps(batches, args)
        self.checkpointer = Checkpointer(accelerator, self.output_dir, args, settings, may_change)

    def resume_or_start(self):
        """Load the newest checkpoint in --output_dir made with these settings (or start at step
        0), say what the run will do, and from now on let SIGTERM and Ctrl-C save a checkpoint
        before the run stops."""
        if self.accelerator.is_main_process:
            recover_swaps(self.output_dir)  # best/, if a crash came while it was replaced
        self.state = self.checkpointer.resume()
        self.started, self.seconds_before = time.monotonic(), self.state.train_seconds
        if self.stream is not None:  # --streaming: the stream goes on from the checkpoint's place in it
            # Places kept: the blocks of 8 micro-batches of every process. The DataLoader reads at
            # most 2 of them ahead of those trained on (the one it hands out and the next).
            keep = 8 * self.args.per_device_train_batch_size * self.accelerator.num_processes
            self.stream.start_at(self.state.stream_position, keep)
        StopSignals.catch()
        self.say_plan()
        self.progress = Progress(self.accelerator, self, self.lr_scheduler, self.flops_per_token)

    def say_plan(self):
        """One line on what the run will do: how long, with which batch, where, in which precision
        (or that it had finished)."""
        acc, args, state = self.accelerator, self.args, self.state
        if self.finished():
            acc.print(
                f"Training already finished in {self.output_dir} ({state.completed_steps} steps); "
                "raise --num_train_epochs or --max_train_steps to train further."
            )
            return
        per_device, accumulated = args.per_device_train_batch_size, args.gradient_accumulation_steps
        acc.print(
            f"Training for {self.num_epochs} epochs, {self.total_steps} optimizer steps ({self.steps_per_epoch} per "
            f"epoch), global batch {global_batch_size(args, acc)} ({per_device} per device x {accumulated} "
            f"accumulated x {acc.num_processes} process(es)), {acc.device}, mixed precision: {acc.mixed_precision}"
        )

    def finished(self):
        """A run is finished when its last evaluation and export are done, not when its last
        optimizer step is: a run killed between the two (its last step's checkpoint was saved)
        evaluates again when it is re-run, exactly as the uninterrupted run did."""
        state = self.state
        if state.stopped_early:
            return True
        return state.completed_steps >= self.total_steps and state.evaluated_step == state.completed_steps

    def epochs(self):
        """The epochs still to train, from where a resumed run stands (none if it is finished)."""
        while not self.finished():
            yield self.state.epoch

    def batches(self, dataloader):
        """This epoch's batches, without those a resumed run already trained on, up to the last
        step."""
        done = self.state.batch_in_epoch
        if done and self.stream is None:  # (a stream starts where the checkpoint says)
            dataloader = self.accelerator.skip_first_batches(dataloader, done)
        for batch in dataloader:
            if self.state.completed_steps >= self.total_steps:
                break
            seed_xla_for_batch(self.accelerator, self.args.seed, self.state)
            yield batch
        else:  # no break: the epoch ran to its end
            self.state.epoch, self.state.batch_in_epoch, self.state.stream_position = self.state.epoch + 1, 0, None
        self.progress.throughput.pause()  # evaluating and saving are not training: out of tokens/s

    def count_batch(self, loss, num_tokens):
        """Count a batch trained on, and the optimizer step it may complete; after a step, log
        every --logging_steps and checkpoint when one is due. epochs() and batches() go by these
        counts."""
        self.state.batch_in_epoch += 1
        self.progress.add(loss, num_tokens)
        if self.accelerator.sync_gradients:  # an optimizer step was taken (not just accumulated)
            self.state.completed_steps += 1
            self.progress.step()
            if self.save_due():
                self.progress.throughput.pause()
                self.save_checkpoint()  # exits here if a signal asked for the save
                self.progress.throughput.resume()

    def save_due(self):
        """Step saves are the same on every process; the clock and signals are not, so with
        several processes they are compared (a collective: it waits for the devices) only at
        logging steps, which wait for them anyway."""
        state, steps, minutes = self.state, self.args.checkpointing_steps, self.args.save_every_minutes
        by_steps = bool(steps and state.completed_steps % steps == 0)
        by_clock = bool(minutes and time.monotonic() - self.checkpointer.last_save_time >= 60 * minutes)
        due = by_steps or by_clock or StopSignals.received is not None
        if self.accelerator.num_processes == 1:
            return due
        if state.completed_steps % self.args.logging_steps:
            return by_steps
        flag = torch.tensor([float(due)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def save_checkpoint(self):
        """A checkpoint of the state now, with the training time so far in it (a resumed run goes
        on counting from there) and, with --streaming, the place in the stream where the blocks
        used so far end, not those the DataLoader fetched ahead: a resumed run reads on from there.
        (After a pass that ran to the stream's end, the next one starts at its beginning: None.)"""
        self.count_train_time()
        if self.stream is not None and self.state.batch_in_epoch > 0:
            used = self.state.batch_in_epoch * self.args.per_device_train_batch_size
            self.state.stream_position = self.stream.position_after(used * self.accelerator.num_processes)
        self.checkpointer.save(self.state)

    def end_epoch(self, metrics):
        """At an epoch's end: log the evaluation, export the model if it is the best so far, stop
        early after --early_stopping_patience evaluations without improvement, checkpoint."""
        state, patience = self.state, self.args.early_stopping_patience
        self.progress.log({f"eval_{k}": v for k, v in metrics.items()})
        epochs = state.completed_steps / self.steps_per_epoch  # a fraction when --max_train_steps ends mid-epoch
        self.accelerator.print(f"step {state.completed_steps} (epoch {epochs:.2f}): {format_metrics(metrics)}")
        value = metrics[self.metric]
        if self.improves(value):
            state.best_metric, state.best_step, state.evals_without_improvement = value, state.completed_steps, 0
            results = {"step": state.completed_steps, **metrics}
            export_model(self.accelerator, self.model, self.tokenizer, self.best_dir, self.model_card(results))
            if self.accelerator.is_main_process:
                write_json(self.output_dir / "eval_results.json", results)
        else:
            state.evals_without_improvement += 1
            if patience and state.evals_without_improvement >= patience:
                self.accelerator.print(f"No improvement in {self.metric} for {patience} evaluations: stopping early.")
                state.stopped_early = True
        state.evaluated_step = state.completed_steps  # saved now: with the last step, the run is finished
        self.save_checkpoint()
        self.progress.throughput.resume()

    def improves(self, value):
        """Whether `value` of the metric that picks best/ beats the best so far: lower for a loss,
        higher for any other metric (accuracy, F1, correlations)."""
        best = self.state.best_metric
        if best is None:  # the first evaluation
            return True
        if self.metric == "loss":
            return value < best
        return value > best

    def count_train_time(self):
        """state.train_seconds: the time of this run so far, and of the runs it resumed."""
        self.state.train_seconds = self.seconds_before + time.monotonic() - self.started

    def model_card(self, results, loss_curve=False):
        """best/'s model card, for `results` (eval_results.json's): see model_card. `loss_curve`:
        best/ holds loss.png (only at the end: finish copies it there first)."""
        self.count_train_time()
        device = self.accelerator.device.type.upper()
        if device == "CUDA":
            device = torch.cuda.get_device_name(self.accelerator.device)
        hardware = {"processes": self.accelerator.num_processes, "device": device}
        hardware["precision"] = self.accelerator.mixed_precision
        config = self.accelerator.unwrap_model(self.model).config
        return model_card(self.args, self.about, self.state, results, config, hardware, loss_curve)

    def finish(self, test_metrics=None):
        """The end: peak GPU memory, log_history.json, loss.png; best/'s test metrics (test_*,
        from score_best) into eval_results.json, its model card with the whole run's evaluations
        and curve, and the upload to the Hub with --push_to_hub."""
        self.progress.bar.close()
        self.accelerator.end_training()
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            # ZeRO-3 would split the demo's model over processes that have ended (from_pretrained
            # waits for them): the demo loads best/ whole, as users will.
            unset_hf_deepspeed_config()
        if self.accelerator.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.accelerator.device) / 2**30
            self.accelerator.print(f"Peak GPU memory: {peak:.2f} GiB")
        if not self.accelerator.is_main_process:
            return
        write_json(self.output_dir / "log_history.json", self.state.log_history)
        plot_history(self.state.log_history, self.output_dir / "loss.png", ("eval_loss", f"eval_{self.metric}"))
        results = json.loads((self.output_dir / "eval_results.json").read_text()) | (test_metrics or {})
        write_json(self.output_dir / "eval_results.json", results)
        shutil.copy(self.output_dir / "loss.png", self.best_dir / "loss.png")
        self.model_card(results, loss_curve=True).save(self.best_dir / "README.md")
        best = self.state.best_metric
        print(f"Best {self.metric}: {best:.4f} at step {self.state.best_step}; model in {self.best_dir}")
        if test_metrics:
            print(f"best/ on the test data: {format_metrics(test_metrics)}")
        if self.args.push_to_hub:
            push_to_hub(self.args, self.best_dir, self.state.best_step)


def seed_xla_for_batch(accelerator, seed, state):
    """On XLA (TPUs): the device's random numbers for the next batch (dropout) drawn from the seed
    and the batch's place in training. XLA's generator moves on at every graph execution, and
    saving or loading a checkpoint executes some: the state a checkpoint holds would not give a
    resumed run the numbers an uninterrupted one draws. (The seed is an input of the step's graph,
    not a constant in it: no new compilation.)"""
    if accelerator.distributed_type != DistributedType.XLA:
        return
    import torch_xla.core.xla_model as xm

    xm.set_rng_state(hash((seed, state.epoch, state.batch_in_epoch)) % 2**63)


class Progress:
    """What a run shows while it trains: the progress bar, and every --logging_steps steps the
    training loss, learning rate, tokens/s and MFU, logged into the training state (saved with
    checkpoints) and the trackers. The loss stays on the device until then: .item() waits for the
    device, so it happens only every --logging_steps steps."""

    def __init__(self, accelerator, run, lr_scheduler, flops_per_token):
        self.accelerator, self.run, self.lr_scheduler = accelerator, run, lr_scheduler
        self.throughput = Throughput(accelerator, flops_per_token)
        self.losses = []
        disable = not accelerator.is_main_process  # one bar, on the main process
        self.bar = tqdm(total=run.total_steps, initial=run.state.completed_steps, disable=disable)

    def add(self, loss, num_tokens):
        self.losses.append(loss.detach())
        self.throughput.add(num_tokens)

    def step(self):
        self.bar.update(1)
        if self.run.state.completed_steps % self.run.args.logging_steps:
            return
        mean = self.accelerator.reduce(torch.stack(self.losses).float().mean(), reduction="mean").item()
        metrics = {"train_loss": mean, "learning_rate": self.lr_scheduler.get_last_lr()[0], **self.throughput.report()}
        self.log(metrics)
        self.losses = []
        postfix = {"loss": f"{mean:.4f}", "lr": f"{metrics['learning_rate']:.2e}"}
        postfix["tok/s"] = f"{metrics['tokens_per_second']:.0f}"
        if "mfu" in metrics:
            postfix["mfu"] = f"{100 * metrics['mfu']:.1f}%"
        self.bar.set_postfix(postfix)

    def log(self, metrics):
        state = self.run.state
        state.log_history.append({"step": state.completed_steps, "epoch": state.epoch, **metrics})
        self.accelerator.log(metrics, step=state.completed_steps)


# ---- Evaluation.
@torch.no_grad()
def evaluate(accelerator, model, dataloader, per_example):
    """`per_example(model, batch)` -> dict of tensors with one row per example, over the whole
    dataloader and every process. `gather_for_metrics` drops the examples that the last batch
    repeats to keep processes even, so metrics are exact for any number of processes; per-example
    values keep a small last batch from skewing means."""
    model.eval()  # dropout off; the loop turns it on again at its next epoch (model.train())
    parts, dtypes = {}, {}
    try:
        for batch in dataloader:
            for k, v in accelerator.gather_for_metrics(per_example(model, batch)).items():
                # Python numbers, not many small CPU tensors: on a CPU those would sit between the
                # freed big buffers of each batch (logits) and keep the allocator from returning
                # them (GBs over a long evaluation).
                parts.setdefault(k, []).extend(v.cpu().tolist())
                dtypes[k] = v.dtype
    except RuntimeError as err:
        if not should_reduce_batch_size(err):
            raise
        # Evaluation has a batch size of its own: --auto_find_batch_size must not shrink the
        # training batch for it (it catches out-of-memory errors, not this one).
        raise UserError(
            "out of memory while evaluating: pass a smaller --per_device_eval_batch_size and run the same command "
            "again (complete checkpoints are intact; the training batch is not the problem)",
            one_process=True,
        ) from None
    return {k: torch.tensor(v, dtype=dtypes[k]) for k, v in parts.items()}


def load_metric(name, fallback):
    """An `evaluate` metric's compute(), or `fallback` (the same numbers) when the hub cannot be
    reached: evaluate fetches metric code from the hub on first use."""
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        with contextlib.suppress(Exception):  # no network: the fallback
            import evaluate

            return evaluate.load(name).compute
    return fallback


def format_metrics(metrics):
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def prepare_for_evaluation(accelerator, model, dataloaders):
    """The model and a list of dataloaders for evaluation alone (--eval_only, a test set): every
    process holds the whole model, in the run's mixed precision. Nothing to shard without an
    optimizer (FSDP2 and DeepSpeed prepare a model only with one)."""
    model = accelerator.prepare_model(model.to(accelerator.device), evaluation_mode=True)
    prepared = [accelerator.prepare_data_loader(dataloader) for dataloader in dataloaders]
    return model, prepared


def evaluate_only(accelerator, args, model, run_evaluation, eval_dataloader, test_dataloader=None):
    """--eval_only: the script's `run_evaluation(accelerator, model, dataloader)` on the
    validation data, and the test data if given (its metrics named test_*), into
    <output_dir>/eval_results.json. No training, no checkpoint."""
    dataloaders = [eval_dataloader] if test_dataloader is None else [eval_dataloader, test_dataloader]
    model, dataloaders = prepare_for_evaluation(accelerator, model, dataloaders)
    metrics = run_evaluation(accelerator, model, dataloaders[0])
    if test_dataloader is not None:
        metrics |= {f"test_{k}": v for k, v in run_evaluation(accelerator, model, dataloaders[1]).items()}
    accelerator.print(f"eval: {format_metrics(metrics)}")
    if accelerator.is_main_process:
        write_json(Path(args.output_dir) / "eval_results.json", metrics)
    return metrics


def score_best(accelerator, auto_class, best_dir, run_evaluation, test_dataloader):
    """--test_file after training: best/ loaded whole on every process, as users load it, scored
    by the script's `run_evaluation(accelerator, model, dataloader)`: its metrics, named test_*
    (None without test data)."""
    if test_dataloader is None:
        return None
    unset_hf_deepspeed_config()  # training is over: ZeRO-3 must not split the model it loads
    model, dataloaders = prepare_for_evaluation(accelerator, from_pretrained(auto_class, best_dir), [test_dataloader])
    return {f"test_{k}": v for k, v in run_evaluation(accelerator, model, dataloaders[0]).items()}


def pipeline_device(accelerator):
    """Where a script's pipelines run (its demo, the classifier's predictions): the training
    device, but the CPU on XLA (TPUs), which compiles a graph for each new shape, and a pipeline
    meets one at every generated token and every batch of other lengths."""
    if accelerator.device.type == "xla":
        return torch.device("cpu")
    return accelerator.device


# ---- main(): one line for bad input.
def run(train_fn, parse_args, argv=None):
    """train_fn(parse_args(argv)), with a UserError (or a full or unwritable disk) turned into
    one line on stderr and exit code 2. The folder's lock and the signal handlers are given back
    however it ends (a notebook keeps Ctrl-C)."""
    script = Path(sys.modules[train_fn.__module__].__file__)
    try:
        args = parse_args(argv)
        # The last of parsing: where the outputs go, and the command line (for the model card).
        args.output_dir = str(resolve_output_dir(args, script.stem))
        args.command = command_line(script.name, sys.argv[1:] if argv is None else argv, args.hub_token)
        if args.auto_find_batch_size:
            return train_with_a_batch_that_fits(train_fn, args)
        return train_fn(args)
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


def first_line(err, limit=200):
    """An exception's message as one short line; its type when the message is empty (some loaders
    raise bare exceptions, and an empty reason says nothing)."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def command_line(script, argv, secret=None):
    """The command that runs this again, as a shell reads it. The Hub token (`secret`) is never
    written down, however it was passed: `--hub_token T`, `--hub_token=T`, or an abbreviation
    argparse accepts, such as `--hub_tok T`."""
    argv = [str(arg) for arg in argv]
    if secret:
        argv = [arg.replace(secret, "$HF_TOKEN") for arg in argv]
    return shlex.join(["python", script, *argv])


def train_with_a_batch_that_fits(train_fn, args):
    """--auto_find_batch_size: Accelerate's find_executable_batch_size runs the training, and
    when the GPU runs out of memory, runs it again with a smaller per-device batch (the largest
    divisor of the first one that halves it at least) and as many more accumulated micro-batches:
    the same global batch, so the same schedule, and the run goes on from its last checkpoint.
    The size that fits goes to <output_dir>/batch_size.json; a re-run starts there. On several
    processes (torchrun and `accelerate launch` set WORLD_SIZE and RANK, read here since no
    Accelerator exists yet) all read one record and start alike, and the one that runs out of
    memory cannot tell the others (they wait for it inside a collective): it writes the smaller
    size down and stops the job; the same command then starts every process with it."""
    first, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    record, size = Path(args.output_dir) / "batch_size.json", first
    rank, processes = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    with contextlib.suppress(OSError, ValueError, KeyError):
        fits = json.loads(record.read_text())
        if fits["global_batch"] == first * accumulation:
            size = fits["per_device_train_batch_size"]
            if rank == 0:
                print(f"note: {record} says a per-device batch of {size} fits: starting with it")
    tries = 0

    def smaller():
        """The next size to try: the largest divisor of the first size that is at most half the
        last one (a divisor keeps the global batch whole); 0 when none is left."""
        nonlocal size
        size //= 2
        while size > 0 and first % size:
            size -= 1
        return size

    def remember(batch_size):
        write_json(record, {"per_device_train_batch_size": batch_size, "global_batch": first * accumulation})

    @find_executable_batch_size(starting_batch_size=size, reduce_batch_size_fn=smaller)
    def train_with(batch_size):
        nonlocal tries
        tries += 1
        OutputLock.release_held()  # the try that ran out of memory held the folder
        steps = accumulation * first // batch_size
        if batch_size != first and rank == 0:  # said and recorded once
            print(
                f"--auto_find_batch_size: per-device batch {batch_size} x {steps} accumulated (the same "
                f"global batch as {first} x {accumulation}), from the last checkpoint"
            )
            record.parent.mkdir(parents=True, exist_ok=True)
            remember(batch_size)
        # The run as if started with these two flags (a copy: args itself stays as parsed).
        args_that_fit = argparse.Namespace(**vars(args))
        args_that_fit.per_device_train_batch_size = batch_size
        args_that_fit.gradient_accumulation_steps = steps
        if tries > 1:  # --no_resume cleared the folder for the first try; a retry goes on from its checkpoints
            args_that_fit.no_resume = False
        if processes == 1:
            return train_fn(args_that_fit)
        try:
            return train_fn(args_that_fit)
        except RuntimeError as err:
            if not should_reduce_batch_size(err) or smaller() == 0:
                raise
            remember(size)  # by this process, the only one that knows; every process writes the same
            again = " (without --no_resume, which would delete them)" if args.no_resume else ""
            raise UserError(
                f"out of memory on process {rank} with a per-device batch of {batch_size}; "
                f"{record} now says {size}: run the same command again{again}, and every process goes on with it "
                "from the last checkpoint",
                one_process=True,
            ) from None

    return train_with()


# ==================================================================================================
# A reader following a training loop may stop here. What follows reads data of any size, then keeps
# work safe: the output folder's lock, stop signals, checkpoints, the export and its model card, the
# Hub, throughput.
# ==================================================================================================

# ---- Data: files, the hub, token files, streams.
VALIDATION_SPLITS = ("validation", "validation_matched", "valid", "dev")  # MNLI: validation_matched
TEST_SPLITS = ("test", "test_matched")


TEXTS = (".txt", ".raw", ".text")  # extensions of plain text files


def input_files(pattern, flag, extensions):
    """The files a data flag names (a path or a glob: "books/*.txt"), each non-empty UTF-8 with
    one of `extensions`."""
    paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [Path(pattern)]
    if not paths:
        raise UserError(f"file not found: no file matches {pattern}; check the path or pattern given to {flag}")
    for path in paths:
        if path.is_dir():
            raise UserError(f"{flag} {path} is a directory, not a file; pass the file (a glob like '{path}/*' works)")
        if not path.is_file():
            raise UserError(f"file not found: {path}; check the path given to {flag}")
        if path.suffix.lower() not in extensions:
            raise UserError(f"{flag} {path}: unsupported extension '{path.suffix}'; use one of {', '.join(extensions)}")
        if path.stat().st_size == 0:
            raise UserError(f"{flag} {path} is empty; give it some data")
        check_utf8(path, flag)
    return [str(p) for p in paths]


def check_utf8(path, flag):
    """Text must be UTF-8; say where it is not (a Latin-1 or Windows-1252 file, usually)."""
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):  # line by line: b"\n" is never part of a longer UTF-8 character
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(
                    f"{flag} {path} is not UTF-8 text (byte 0x{line[err.start]:02x} at offset {offset + err.start}, "
                    f"line {number}); convert it, e.g. `iconv -f latin1 -t utf-8 {path.name} > utf8.txt`"
                ) from None
            offset += len(line)


def from_pretrained(auto_class, name, what="model", **options):
    """`auto_class.from_pretrained(name, **options)` (an AutoModel... or AutoTokenizer), with one
    clear line when `name` is neither a model folder nor a hub name that can be reached."""
    try:
        return auto_class.from_pretrained(name, **options)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(
            f"--model_name_or_path {name}: cannot load a {what} from it ({first_line(err)}); pass a hub name, "
            "or a folder saved with save_pretrained (config.json, weights and tokenizer files)"
        ) from None


def load_hub_splits(name, config_name=None, streaming=False):
    """Every split of a hub data set or of a folder saved with `save_to_disk` (a DatasetDict);
    one clear line when it cannot be had."""
    try:
        saved = (Path(name) / "dataset_dict.json").exists()  # a folder written by save_to_disk
        if not saved:
            return datasets.load_dataset(name, config_name, streaming=streaming)
        raw = datasets.load_from_disk(name)
    except (OSError, ValueError) as err:  # OSError: FileNotFoundError and network errors
        raise UserError(
            f"--dataset_name {name}: cannot load it ({first_line(err)}); check the name and the network, "
            "or pass local files with --train_file and --validation_file"
        ) from None
    if streaming:
        return datasets.IterableDatasetDict({split: data.to_iterable_dataset() for split, data in raw.items()})
    return raw


def load_hub_dataset(name, config_name=None, streaming=False):
    """The train split and the validation split (None if there is none) of a hub data set or of a
    folder saved with `save_to_disk`."""
    raw = load_hub_splits(name, config_name, streaming)
    if "train" not in raw:
        raise UserError(f"--dataset_name {name} has no 'train' split (it has {list(raw)}); pass local files instead")
    return raw["train"], next((raw[split] for split in VALIDATION_SPLITS if split in raw), None)


def load_hub_test_split(name, config_name=None):
    """The test split of a hub data set (MNLI: test_matched), or a clear line that it has none."""
    raw = load_hub_splits(name, config_name)
    for split in TEST_SPLITS:
        if split in raw:
            return raw[split]
    raise UserError(f"--do_predict: --dataset_name {name} has no 'test' split (it has {list(raw)}); pass --test_file")


def load_texts(args, accelerator, keep_linebreaks=True):
    """The training, validation and (--test_file, else None) test text, read by the main process
    first: the others then read its cache."""
    with main_process_first(accelerator):
        train, validation = load_text_data(args, keep_linebreaks)
        test = None
        if args.test_file:  # held-out text, scored with best/ after training
            test = load_text_files(args.test_file, "--test_file", keep_linebreaks, args.streaming)
    return train, validation, test


def load_text_data(args, keep_linebreaks=True):
    """Train and validation data sets with one `text` row per line, from local files (globs
    allowed) or the hub. keep_linebreaks leaves each line's "\\n", as WikiText has it, so packed
    text keeps its lines. Without validation text, the last --validation_split_percentage of the
    lines are held out (contiguous, not interleaved). --streaming: see stream_splits."""
    streaming = args.streaming
    if args.train_file:
        train = load_text_files(args.train_file, "--train_file", keep_linebreaks, streaming)
        validation = None
        if args.validation_file:
            validation = load_text_files(args.validation_file, "--validation_file", keep_linebreaks, streaming)
    else:
        train, validation = load_hub_dataset(args.dataset_name, args.dataset_config_name, streaming)
    if streaming:
        return stream_splits(args, train, validation)
    if validation is None:
        if len(train) < 2:
            raise UserError("the training text has fewer than 2 lines: too little to hold out validation text")
        n = len(train) - max(1, len(train) * args.validation_split_percentage // 100)
        train, validation = train.select(range(n)), train.select(range(n, len(train)))
    for split, data, source in (("train", train, args.train_file), ("validation", validation, args.validation_file)):
        if not has_text(data):
            raise UserError(f"{source or args.train_file or args.dataset_name}: the {split} text is empty; add text")
    if args.max_train_samples:
        train = train.take(args.max_train_samples)
    if args.max_eval_samples:
        validation = validation.take(args.max_eval_samples)
    return train, validation


def load_text_files(pattern, flag, keep_linebreaks, streaming=False):
    """The lines of local text files (`pattern`: a file or a glob, given as `flag`), one `text`
    row each; with `streaming`, read as training goes rather than all before it starts."""
    files = input_files(pattern, flag, TEXTS)
    return datasets.load_dataset(
        "text", data_files=files, split="train", keep_linebreaks=keep_linebreaks, streaming=streaming
    )


def stream_splits(args, train, validation):
    """--streaming: the training lines as they are read (a datasets IterableDataset), for text
    larger than the disk, and the first --max_eval_samples validation lines (10,000 unless
    given), which evaluation reads into memory. (check_args has made sure of --max_train_steps.)"""
    if validation is None:  # a percentage of a stream of unknown length cannot be held out
        raise UserError(
            "--streaming cannot hold out --validation_split_percentage of a stream: pass --validation_file, or a data "
            "set with a validation split"
        )
    if args.max_train_samples:
        train = train.take(args.max_train_samples)
    if not args.max_eval_samples:
        PartialState().print(
            "note: --streaming evaluates on the first 10,000 validation lines; --max_eval_samples sets another number"
        )
    return train, validation.take(args.max_eval_samples or 10_000)


def has_text(data):
    """Whether any line holds more than white space; read a batch at a time (never the whole text
    at once)."""
    for batch in data.iter(batch_size=10_000):
        for line in batch["text"]:
            if line.strip():
                return True
    return False


def language_model_samples(args, accelerator, texts, make_samples, what):
    """`make_samples(text, split_name)` of the training, validation and test `texts` (load_texts';
    no training samples with --eval_only, no test samples without test text), made by each
    machine's first process (the others then read its token files), and a line saying how many
    `what` (samples of how many tokens) there are."""
    train_text, eval_text, test_text = texts
    train, test = None, None
    with main_process_first(accelerator, local=True):
        if not args.eval_only:
            train = make_samples(train_text, "training")
        validation = make_samples(eval_text, "validation")
        if test_text is not None:
            test = make_samples(test_text, "test")
    training = "no"  # (--eval_only)
    if train is not None:
        training = "streamed" if args.streaming else f"{len(train):,}"  # (a stream's length is not known)
    accelerator.print(f"{training} training and {len(validation):,} validation {what}")
    return train, validation, test


def token_samples(texts, tokenize, tokenizer, args, split_name, recipe, block_size=None, special_ids=None):
    """A split's samples (TokenSamples), from the token file of `texts` (see tokenize_to_file),
    or with --streaming made as training reads on (StreamedBlocks; the validation and test
    samples are read once, into memory: the validation lines are at most --max_eval_samples)."""
    if args.streaming:
        samples = StreamedBlocks(texts, tokenize, block_size, special_ids)
        if split_name == "training":
            return samples
        samples = list(samples)
        if not samples:  # (a token file's emptiness is the script's to say, with its numbers)
            raise UserError(f"the {split_name} text is too short for one sample; add text, or make the samples shorter")
        return samples
    token_file = tokenize_to_file(texts, tokenize, tokenizer, args, split_name, recipe)
    return TokenSamples(token_file, block_size, special_ids)


def tokenize_to_file(texts, tokenize, tokenizer, args, what, recipe):
    """The TokenFile of `texts` (a `text` column): `tokenize(list of lines)` -> the token ids of
    each line (fewer lists to drop lines). Made once, on --preprocessing_num_workers processes,
    and found again by what determines its content: the text (the data set's fingerprint, which
    changes with the files), the tokenizer and the `recipe`. It lives beside the datasets cache
    (HF_DATASETS_CACHE), which each machine has its own of."""
    key = [texts._fingerprint, tokenizer_fingerprint(tokenizer), recipe]
    name = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]
    token_file = TokenFile(Path(datasets.config.HF_DATASETS_CACHE) / "lm-tokens" / name)
    token_file.tokens_path.parent.mkdir(parents=True, exist_ok=True)
    if token_file.open():
        PartialState().print(f"Tokens of the {what} text: {token_file.num_tokens:,}, from {token_file.tokens_path}")
        return token_file

    def encode(batch):
        return {"input_ids": tokenize(batch["text"])}

    # The ids are stored as the token file will hold them (uint16 for most vocabularies): half
    # the disk of datasets' default int32, for the moment both exist.
    ids = datasets.Value(np.dtype(token_dtype(len(tokenizer))).name)
    features = datasets.Features({"input_ids": datasets.List(ids)})
    started, workers = time.perf_counter(), min(preprocessing_workers(args), max(1, len(texts)))
    text_bytes = texts.data.nbytes  # the text as Arrow holds it, about its size in UTF-8
    # A worker is one process tokenizing on one thread, so N workers use N cores. The fast
    # tokenizer's own threads are switched off meanwhile: they do not mix with forked worker
    # processes, and they would make one "worker" quietly use every core.
    threads = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # The mapped data goes to files of this writer's own, beside the token file: in a cache shared
    # by several machines, another one's files may be read or deleted while it maps the same text.
    cache_file = token_file.tokens_path.with_name(f"{writer_prefix()}{name}.map.arrow")
    try:
        encoded = texts.map(
            encode, batched=True, num_proc=workers if workers > 1 else None, remove_columns=texts.column_names,
            features=features, desc=f"Tokenizing the {what} text ({workers} process{'es' if workers > 1 else ''})",
            cache_file_name=str(cache_file),
        )  # fmt: skip
    finally:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
        if threads is not None:
            os.environ["TOKENIZERS_PARALLELISM"] = threads
    token_file.write(encoded, len(tokenizer))
    for cache in encoded.cache_files:  # the token file has it all now: free the disk
        with contextlib.suppress(OSError):
            os.remove(cache["filename"])
    seconds = time.perf_counter() - started
    print(
        f"Tokenized the {what} text: {token_file.num_tokens:,} tokens from {text_bytes / 1e6:,.1f} MB in "
        f"{seconds:.1f} s ({text_bytes / 1e6 / seconds:.2f} MB/s, {workers} worker(s)); in {token_file.tokens_path}"
    )
    return token_file


def preprocessing_workers(args):
    """--preprocessing_num_workers, else every core this process may use."""
    if args.preprocessing_num_workers:
        return args.preprocessing_num_workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class TokenFile:
    """Every token of a text, one line after the other, in one flat array on disk (uint16 where
    the vocabulary fits, else uint32), as nanoGPT's prepare.py writes a corpus: training reads
    slices of it through np.memmap, so memory stays flat however large the text, and a re-run of
    the same command finds it and starts at once. Two .npy files: <name>.lines.npy, where each
    line starts, and <name>.tokens.npy. Both are filled under temporary names and renamed when
    whole, the tokens last, so a kill while writing leaves no token file that opens; and since a
    .npy header holds the array's length, a file cut short later does not open either."""

    def __init__(self, path):
        self.name = Path(path).name
        self.tokens_path, self.lines_path = Path(f"{path}.tokens.npy"), Path(f"{path}.lines.npy")
        self.tokens, self.line_starts = None, None

    def open(self):
        """Open both arrays, as np.memmap; False if either is missing or cut short (then it is
        made again)."""
        try:
            self.line_starts = np.load(self.lines_path, mmap_mode="r")  # where each line starts, then the end
            self.tokens = np.load(self.tokens_path, mmap_mode="r")  # slicing reads only that slice
        except (OSError, ValueError):
            return False
        return True

    @property
    def num_tokens(self):
        return len(self.tokens)

    def __getstate__(self):  # a DataLoader worker opens the files itself, rather than copying their contents
        return {**self.__dict__, "tokens": None, "line_starts": None}

    def __setstate__(self, state):
        self.__dict__ = state
        self.open()

    def write(self, encoded, vocabulary_size):
        """The `input_ids` of a mapped data set, in order, a batch of lines at a time (never the
        whole text)."""
        folder = self.tokens_path.parent
        folder.mkdir(parents=True, exist_ok=True)
        remove_killed_writers(folder, self.name)
        # How many tokens: the sum of the lines' lengths, which Arrow keeps apart from the ids
        # themselves (the list offsets): counted without reading the ids.
        total = pc.sum(pc.list_value_length(encoded.data.column("input_ids"))).as_py() or 0
        dtype = token_dtype(vocabulary_size)
        tmp = {path: path.with_name(f"{writer_prefix()}{path.name}") for path in (self.lines_path, self.tokens_path)}
        starts = np.lib.format.open_memmap(tmp[self.lines_path], mode="w+", dtype=np.int64, shape=(len(encoded) + 1,))
        tokens = np.lib.format.open_memmap(tmp[self.tokens_path], mode="w+", dtype=dtype, shape=(total,))
        position, line = 0, 0
        for batch in encoded.select_columns(["input_ids"]).with_format("arrow").iter(batch_size=10_000):
            column = batch.column("input_ids").combine_chunks()  # a list of ids per line
            values = column.flatten().to_numpy()  # all of them in one array, without a copy
            tokens[position : position + len(values)] = values
            lengths = np.diff(column.offsets.to_numpy())
            starts[line + 1 : line + 1 + len(lengths)] = position + np.cumsum(lengths)
            position, line = position + len(values), line + len(lengths)
        for array in (starts, tokens):
            array.flush()
        del starts, tokens
        for path, written in tmp.items():  # the line starts, then the tokens: a token file that opens is whole
            os.replace(written, path)
        self.open()


def writer_prefix():
    """Temporary files are named for their writer, `.tmp-<pid>@<host>-`: the datasets cache (and
    the token files in it) may be shared by several machines (an NFS home), whose first processes
    all write the same token file at once."""
    return f".tmp-{os.getpid()}@{socket.gethostname()}-"


def remove_killed_writers(folder, name):
    """Remove the temporary files of `name` that a killed writer left: one of this machine whose
    process is gone, or one of another machine untouched for a day (a live writer's files change
    as it writes; its process cannot be looked up from here)."""
    for old in folder.glob(f".tmp-*-{name}.*"):
        pid, _, rest = old.name.removeprefix(".tmp-").partition("@")
        host = rest[: rest.find(f"-{name}.")]
        with contextlib.suppress(OSError):
            if host == socket.gethostname():
                killed = pid == str(os.getpid()) or not process_exists(pid)
            else:
                killed = time.time() - old.stat().st_mtime > 24 * 3600
            if killed:
                old.unlink()


def token_dtype(vocabulary_size):
    """Two bytes a token where the vocabulary fits (GPT-2's 50,257 does), else four."""
    return np.uint16 if vocabulary_size <= 2**16 else np.uint32


def tokenizer_fingerprint(tokenizer):
    """What makes a tokenizer's ids: its class and its vocabulary, merges and rules
    (tokenizer.json)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}{rules}".encode()).hexdigest()


class TokenSamples(torch.utils.data.Dataset):
    """Training samples read from a TokenFile: blocks of exactly `block_size` tokens cut from the
    one stream (only the final partial block is left out: no padding, every position a
    prediction), or each line as it was tokenized (block_size None). `special_ids`: also give the
    attention mask and which tokens are special (never masked)."""

    def __init__(self, token_file, block_size=None, special_ids=None):
        self.token_file, self.block_size = token_file, block_size
        self.special_ids = None if special_ids is None else np.array(sorted(special_ids))

    def __len__(self):
        if self.block_size:
            return self.token_file.num_tokens // self.block_size
        return len(self.token_file.line_starts) - 1

    def __getitem__(self, index):
        if self.block_size:
            start, end = index * self.block_size, (index + 1) * self.block_size
        else:
            start, end = self.token_file.line_starts[index : index + 2]
        return lm_sample(self.token_file.tokens[start:end], self.special_ids)


def lm_sample(ids, special_ids=None):
    """A language model's sample: its token ids; with `special_ids`, also its attention mask (all
    ones: nothing is padding) and which tokens are special (masking leaves those alone)."""
    ids = np.asarray(ids, dtype=np.int64)
    sample = {"input_ids": torch.from_numpy(ids)}
    if special_ids is not None:
        sample["attention_mask"] = torch.ones_like(sample["input_ids"])
        sample["special_tokens_mask"] = torch.from_numpy(np.isin(ids, special_ids).astype(np.int64))
    return sample


class StreamedBlocks(torch.utils.data.IterableDataset):
    """Training samples from a stream of lines (--streaming): the lines tokenized 1,000 at a time
    and packed into one stream of blocks of `block_size` tokens, as from a token file (or each
    line, block_size None), `special_ids` as in TokenSamples. It notes where in the stream each
    block it gives ends, so a checkpoint records the place of the blocks training has used
    (position_after), not of those the DataLoader already fetched ahead, and a run resumed there
    (start_at) goes on with the very next block. The stream is read in order: a shuffle buffer
    could not be restored exactly."""

    def __init__(self, lines, tokenize, block_size=None, special_ids=None):
        self.lines, self.tokenize, self.block_size = lines, tokenize, block_size
        self.special_ids = None if special_ids is None else np.array(sorted(special_ids))
        # Where the last blocks given end (none kept until start_at says how many).
        self.start, self.positions = None, collections.deque(maxlen=0)

    def start_at(self, position, keep):
        """Start the next pass at `position` (None: the stream's beginning), keeping the places of
        the last `keep` blocks given: at least as many as the DataLoader fetches ahead of the
        blocks training has used (Run keeps several global micro-batches: a fixed number would
        fail on a large enough job)."""
        self.start, self.positions = position, collections.deque(maxlen=keep)

    def position_after(self, blocks):
        """Where the stream stands once `blocks` of its blocks (counted from its beginning, across
        resumed runs) are used: the batch of lines that holds the next block's first token, the
        line in it, and the token in that line."""
        for position in self.positions:
            if position["given"] == blocks:
                return position
        return self.start  # none given yet in this run: where it started

    def __iter__(self):
        start, self.start = self.start or {"given": 0, "source": None, "line": 0, "token": 0}, None
        if start["source"] is not None:
            self.lines.load_state_dict(start["source"])
        given, buffer, source, resuming = start["given"], [], start["source"], True
        lines = iter(self.lines)
        while True:
            batch = [row["text"] for row in itertools.islice(lines, 1000)]
            if not batch:
                return
            for number, ids in enumerate(self.tokenize(batch)):
                offset = 0  # where in the line its tokens start: a resumed run may have used the first ones
                if resuming and number < start["line"]:  # lines a resumed run has used already
                    continue
                if resuming and number == start["line"]:
                    offset = start["token"]
                resuming = False
                for piece, rest in self.cut(buffer, ids[offset:]):
                    given += 1
                    # After this block: this batch of lines, the line (or the next one), the token
                    # the rest begins at.
                    line, token = (number, len(ids) - rest) if rest else (number + 1, 0)
                    self.positions.append({"given": given, "source": source, "line": line, "token": token})
                    yield lm_sample(piece, self.special_ids)
            source, resuming = self.lines.state_dict(), False  # where the next batch starts (a copy)

    def cut(self, buffer, ids):
        """The blocks that `ids` completes, each with how many tokens of the stream are left
        after it (they stay in `buffer`, for the next block); a line as it is without block_size."""
        if self.block_size is None:
            return [(ids, 0)]
        buffer.extend(ids)
        blocks, start = [], 0
        while len(buffer) - start >= self.block_size:
            blocks.append((buffer[start : start + self.block_size], len(buffer) - start - self.block_size))
            start += self.block_size
        del buffer[:start]
        return blocks


# ---- Where the outputs go, and one run per output folder.
def in_colab():
    return "COLAB_RELEASE_TAG" in os.environ or "google.colab" in sys.modules


def resolve_output_dir(args, script_name):
    """--output_dir, else a folder on Drive when in Colab with Drive mounted, else ./outputs."""
    if args.drive and not os.path.isdir(DRIVE_ROOT):
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
    if args.output_dir:
        return Path(args.output_dir)
    if args.drive or (in_colab() and os.path.isdir(DRIVE_ROOT)):
        return Path(DRIVE_ROOT) / DRIVE_FOLDER / script_name
    return Path("outputs") / script_name


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


class Waits:
    """What main_process_first needs to name its files: the job (its main process's host and pid,
    the same in every process) and how many waits it has had (every process has the same ones)."""

    job, count = None, 0


@contextlib.contextmanager
def main_process_first(accelerator, local=False):
    """The main process (with `local`: each machine's first process) runs the block first, the
    others after it, reading what it made (a datasets cache, a token file, a tokenizer). Like
    Accelerate's main_process_first, except for how the others wait: they look for a file that
    the first one writes into --output_dir (which every process sees) when it is done, once a
    second, instead of waiting inside a collective. Reading or tokenizing gigabytes takes longer
    than a backend waits in one (NCCL: 10 minutes, under DeepSpeed 30) before it aborts the job."""
    if accelerator.num_processes == 1:
        yield
        return
    Waits.count += 1
    first = accelerator.is_local_main_process if local else accelerator.is_main_process
    who = f"machine{accelerator.process_index - accelerator.local_process_index}" if local else "job"
    done = Path(accelerator.project_dir) / f".done-{Waits.job}-{Waits.count}-{who}"
    while not first and not done.exists():
        time.sleep(1.0)
    try:
        yield
    finally:
        if first:  # done, or failed: the others run the block then, and meet the same error
            done.touch()
    accelerator.wait_for_everyone()  # each one's part is done: a short wait
    if first:
        done.unlink(missing_ok=True)


def every_process(obj):
    """Every process's `obj`, in process order, on every process: gather_object for every engine.
    Accelerate's gather_object refuses XLA (TPUs); its broadcast_object_list takes XLA's own path
    (xm.mesh_reduce) there and torch.distributed's elsewhere, so each process broadcasts in turn."""
    return [broadcast_object_list([obj], from_process=i)[0] for i in range(PartialState().num_processes)]


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


# ---- Stop signals and checkpoints: what a run has done, saved atomically, resumed exactly.
class StopSignals:
    """SIGTERM (a scheduler's preemption, Colab's stop button) and SIGINT (Ctrl-C) are only
    noted: the run saves at its next optimizer step, then exits; a second one acts at once. run()
    gives back what the signals did before."""

    received = None
    previous = {}

    @classmethod
    def catch(cls):
        cls.received = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            cls.previous.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, cls.note)

    @classmethod
    def note(cls, signum, frame):
        cls.received = signum
        signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)

    @classmethod
    def restore(cls):
        while cls.previous:
            sig, handler = cls.previous.popitem()
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


STATE_FILE = "training_state.json"  # written last: a checkpoint without it is incomplete


# Flags that may change when a run resumes: how long it trains, how it saves, logs and runs, not
# what it learns. Every other flag must match the checkpoint's (a script adds its harmless ones,
# such as its demo's prompt).
MAY_CHANGE_ON_RESUME = """num_train_epochs max_train_steps early_stopping_patience output_dir drive
    checkpointing_steps save_every_minutes keep_last resume_from_checkpoint no_resume logging_steps
    report_to per_device_eval_batch_size dataloader_num_workers mixed_precision torch_compile
    preprocessing_num_workers eval_only test_file auto_find_batch_size push_to_hub hub_model_id hub_token
    hub_private_repo""".split()


# These three may change together when their product, the global batch, stays the same.
BATCH_GEOMETRY = ("num_processes", "per_device_train_batch_size", "gradient_accumulation_steps")


class Checkpointer:
    """<output_dir>/checkpoints/step_N: folders that `accelerator.save_state` writes (the model
    as safetensors, optimizer, scheduler, gradient scaler and sampler states,
    random_states_<process>.pkl for each process; under FSDP or DeepSpeed, sub-folders of shards)
    plus training_state.json: the progress, the settings and every file's size. Written under a
    temporary name, renamed when whole: a crash mid-save never leaves a newest one that cannot
    load."""

    def __init__(self, accelerator, output_dir, args, settings, may_change=()):
        self.accelerator, self.args = accelerator, args
        self.dir = Path(output_dir) / "checkpoints"
        harmless = set(MAY_CHANGE_ON_RESUME) | set(may_change) | {"command"}  # (its flags are checked one by one)
        self.settings = {k: v for k, v in vars(args).items() if k not in harmless}
        self.settings.update(settings, num_processes=accelerator.num_processes)
        self.last_save_time = time.monotonic()

    def resume(self):
        """Load the newest whole checkpoint (or --resume_from_checkpoint) into the prepared
        objects and return its TrainingState; a fresh one if there is none."""
        acc, args = self.accelerator, self.args
        if args.no_resume:
            if acc.is_main_process:
                delete_tree(self.dir)
            acc.wait_for_everyone()
            return TrainingState()
        # The main process chooses, and every process loads the same checkpoint: ranks that resumed
        # from different steps would train apart (DDP) or wait for each other forever (FSDP,
        # DeepSpeed).
        candidates = []
        if acc.is_main_process:
            recover_swaps(self.dir)
            candidates = [(meta, str(path)) for meta, path in whole_checkpoints(self.dir, acc.print)]
        candidates = [(meta, Path(path)) for meta, path in broadcast_object_list([candidates])[0]]
        if args.resume_from_checkpoint:
            wanted = Path(args.resume_from_checkpoint).resolve()
            candidates = [(m, p) for m, p in candidates if p.resolve() == wanted]
            if not candidates:
                raise UserError(f"--resume_from_checkpoint {wanted} is not a complete checkpoint in {self.dir}")
        failed = []
        for meta, path in reversed(candidates):
            saved = meta["fingerprint"]
            check_settings(acc, saved, self.settings, path)
            same_processes = saved["num_processes"] == acc.num_processes
            problems = [p for p in every_process(try_to_load(acc, path, same_processes)) if p]
            if problems:  # on any process: all of them try the one before, together
                acc.print(f"warning: could not load checkpoint {path} ({'; '.join(problems)}); trying an older one")
                failed.append(path.name)
                continue
            state = TrainingState(**meta["state"])
            if saved["gradient_accumulation_steps"] != args.gradient_accumulation_steps:
                # The same global batch split otherwise: the same optimizer steps of this epoch are
                # done.
                steps_done = math.ceil(state.batch_in_epoch / saved["gradient_accumulation_steps"])
                state.batch_in_epoch = steps_done * args.gradient_accumulation_steps
            acc.step = state.batch_in_epoch  # Accelerate counts micro-batches to know when to step
            acc.print(
                f"Resumed from {path}: epoch {state.epoch}, step {state.completed_steps}, "
                f"batch {state.batch_in_epoch} of the epoch"
            )
            return state
        if failed:  # never start over on top of checkpoints: rotation would delete them
            raise UserError(
                f"no checkpoint in {self.dir} could be loaded (tried {', '.join(failed)}); "
                "move them away to keep them, or pass --no_resume to start fresh"
            )
        return TrainingState()

    def save(self, state):
        """Save, keep the newest --keep_last, and exit if a signal asked for the save."""
        acc, name = self.accelerator, f"step_{state.completed_steps:08d}"
        tmp = self.dir / f".tmp-{name}"
        try:
            if acc.is_main_process:
                delete_tree(tmp)
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            acc.save_state(str(tmp))  # every process writes its part: its random state, its shards
            acc.wait_for_everyone()
            if acc.is_main_process:
                files = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in tmp.rglob("*") if f.is_file()}
                serial = max((m.get("serial", 0) for m, _ in whole_checkpoints(self.dir)), default=0) + 1
                meta = {"state": asdict(state), "fingerprint": self.settings, "files": files, "serial": serial}
                write_json(tmp / STATE_FILE, meta)
                for file in [*files, STATE_FILE]:  # every file recorded, and the record: on disk before the rename
                    with open(tmp / file, "rb") as handle:
                        os.fsync(handle.fileno())
        except OSError:  # a full disk or Drive: drop the partial save; the older checkpoints stay
            if acc.is_main_process:
                delete_tree(tmp)
            raise
        if acc.is_main_process:
            swap_in(tmp, self.dir / name)  # the same step saved again (at an epoch's end) replaces itself
            old = [path for _, path in whole_checkpoints(self.dir)[: -self.args.keep_last]]
            # .tmp/.old folders: saves killed midway (recover_swaps put back any that was needed).
            killed = [path for path in self.dir.iterdir() if path.name.startswith((".tmp", ".old"))]
            for path in old + killed:
                delete_tree(path)
        acc.wait_for_everyone()
        self.last_save_time = time.monotonic()
        if StopSignals.received is not None:
            name = signal.Signals(StopSignals.received).name
            acc.print(f"\n{name} received: saved step {state.completed_steps}. Run the same command again to continue.")
            raise SystemExit(128 + StopSignals.received)


def whole_checkpoints(folder, warn=None):
    """(metadata, path) of each whole checkpoint in `folder`, oldest first; `warn` hears of the
    damaged ones (a save killed halfway leaves files of the wrong size)."""
    found = []
    for path in folder.iterdir() if folder.is_dir() else []:
        if not path.is_dir() or path.name.startswith((".tmp", ".old")):
            continue
        try:
            meta = json.loads((path / STATE_FILE).read_text())
            for name, size in meta["files"].items():
                if (path / name).stat().st_size != size:
                    raise ValueError(f"{name} has the wrong size")
            found.append((meta, path))
        except (OSError, ValueError, KeyError) as err:
            if warn:
                warn(f"warning: skipping damaged checkpoint {path} ({err})")
    # Newest = saved last (a run resumed from an older checkpoint makes newer-step ones stale).
    return sorted(found, key=lambda mp: (mp[0].get("serial", 0), mp[0]["state"]["completed_steps"]))


def try_to_load(accelerator, path, same_processes=True):
    """Load a checkpoint into the prepared objects; None, or why it could not be loaded (on this
    process). accelerator.load_state unpickles only tensors and plain data (torch's
    weights_only), so a planted pickle cannot run code. It quietly skips random states it cannot
    load; exact resume needs them, so they are checked first (on another number of processes, a
    process without a file of its own keeps its seed)."""
    rng_file = path / f"random_states_{accelerator.process_index}.pkl"
    try:
        if same_processes or rng_file.exists():
            try:
                accelerate_load(rng_file)
            except Exception as err:
                raise ValueError(f"{rng_file.name} cannot be loaded safely: {first_line(err, None)}") from None
        load_state(accelerator, path)
    except Exception as err:  # whole in size but unreadable, or not safe to unpickle
        where = f"process {accelerator.process_index}: " if accelerator.num_processes > 1 else ""
        return where + first_line(err, 300)
    return None


def load_state(accelerator, path):
    """accelerator.load_state, also for a checkpoint saved in another precision. --mixed_precision
    may change on resume (auto picks bf16 on an A100, fp16 on a T4): fp16 has a loss scaler, which
    Accelerate loads from scaler.pt unconditionally, and a checkpoint saved without fp16 has none.
    The scale then starts afresh, as in a new fp16 run (it adapts within a few steps)."""
    scaler = accelerator.scaler
    if scaler is not None and not (path / SCALER_NAME).exists():
        accelerator.print(f"note: {path.name} was saved without fp16 (no {SCALER_NAME}): the loss scale starts afresh")
        accelerator.scaler = None  # for load_state only; the prepared optimizer keeps its own reference
    try:
        accelerator.load_state(str(path))
    finally:
        accelerator.scaler = scaler


def check_settings(accelerator, saved, current, path):
    """Refuse a checkpoint made with settings that change what is learned. The batch may be split
    otherwise (processes x per-device batch x accumulation) if its global size stays: each
    optimizer step then sees the same examples."""
    changed = [key for key, value in current.items() if key in saved and saved[key] != value]
    described = {key: f"{key}: {saved[key]!r} -> {current[key]!r}" for key in changed}
    what_changed = "; ".join(described.values())
    other = "; ".join(described[key] for key in changed if key not in BATCH_GEOMETRY)
    if other:  # a setting that changes what is learned
        raise UserError(
            f"the checkpoint in {path.parent} was made with other settings ({other}); "
            "use the same settings to resume, or --no_resume / another --output_dir to start fresh"
        )
    old = [saved[key] for key in BATCH_GEOMETRY]
    new = [current[key] for key in BATCH_GEOMETRY]
    if old == new:
        return
    if math.prod(old) != math.prod(new):
        raise UserError(
            f"the checkpoint in {path.parent} was made with another global batch ({what_changed}: "
            f"{math.prod(old)} -> {math.prod(new)} examples per optimizer step); {batch_advice(math.prod(old), *new)} "
            f"(it was made on {old[0]} process(es)); or --no_resume / another --output_dir to start fresh"
        )
    if old[0] != new[0] and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise UserError(
            f"the checkpoint in {path.parent} holds FSDP/DeepSpeed shards of {old[0]} process(es); "
            f"resume it on {old[0]} process(es), or --no_resume to start fresh"
        )
    accelerator.print(
        f"note: the checkpoint was made with {' x '.join(map(str, old))} (processes x per-device batch x "
        f"accumulation), this run uses {' x '.join(map(str, new))}: the same {math.prod(new)} examples per "
        "optimizer step, from the same step and place in the data; random streams (dropout, masking) go on "
        "from process 0's"
    )


def batch_advice(global_batch, processes, per_device, accumulation):
    """How to keep a global batch on this many processes."""
    if global_batch % (processes * per_device) == 0:
        split = (per_device, global_batch // (processes * per_device))
    elif global_batch % processes == 0:
        split = (global_batch // processes, 1)
    else:
        return f"{global_batch} examples per step cannot be split over {processes} process(es): use another count"
    return (
        f"to keep {global_batch} on {processes} process(es), pass --per_device_train_batch_size {split[0]} "
        f"--gradient_accumulation_steps {split[1]}"
    )


def write_json(path, obj):
    """Written under a temporary name, then renamed: a kill midway leaves the old file or the new
    one, never half of one (a re-run reads it)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def delete_tree(path):
    """Delete a folder. Files are emptied first: Google Drive keeps deleted files in its trash
    for 30 days and counts them against the quota, but an empty file costs nothing."""
    for f in Path(path).rglob("*"):
        if f.is_file():
            with contextlib.suppress(OSError):
                os.truncate(f, 0)
    shutil.rmtree(path, ignore_errors=True)


def swap_in(tmp, final):
    """Move a finished folder into place; the old one goes only once the new one is there. A
    crash between the two renames leaves only .old-<name>, which recover_swaps puts back."""
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_folder(final.parent)  # the renames themselves on disk, not only the files
    delete_tree(old)


def recover_swaps(folder):
    """Put back each .old-<name> folder whose <name> is missing: a crash came between swap_in's
    two renames."""
    for old in Path(folder).glob(".old-*") if Path(folder).is_dir() else []:
        final = old.with_name(old.name.removeprefix(".old-"))
        if not final.exists():
            old.rename(final)
            print(f"warning: {final} was being replaced when the last run stopped; the previous one is back")


def fsync_folder(folder):
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# ---- The export, its model card, the Hub.
def export_model(accelerator, model, tokenizer, path, card=None):
    """A model folder that `from_pretrained` and `pipeline` load, with its model card
    (README.md), swapped in atomically. Every process takes part: under FSDP or DeepSpeed ZeRO-3
    each holds a shard, and `get_state_dict` gathers the full weights."""
    try:
        state_dict = accelerator.get_state_dict(model)
    except ValueError as err:  # ZeRO-3 without stage3_gather_16bit_weights_on_model_save
        raise UserError(
            f"cannot gather the model's weights to export them ({first_line(err)}); set "
            "stage3_gather_16bit_weights_on_model_save: true in the DeepSpeed config (as configs/deepspeed_zero3.yaml)"
        ) from None
    if accelerator.is_main_process:
        # A compiled model (--torch_compile) names each weight "_orig_mod.<name>"; from_pretrained
        # wants <name>.
        state_dict = {name.removeprefix("_orig_mod."): weight for name, weight in state_dict.items()}
        state_dict = to_cpu(state_dict)
        tmp = path.with_name(f".tmp-{path.name}")
        delete_tree(tmp)
        accelerator.unwrap_model(model, keep_torch_compile=False).save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if card is not None:
            card.save(tmp / "README.md")
        swap_in(tmp, path)
    accelerator.wait_for_everyone()


def to_cpu(state_dict):
    """`state_dict` in CPU memory, where safetensors writes from (an XLA tensor has no storage it
    can point at). A tensor under two names (tied weights) stays one: save_pretrained stores it
    once."""
    copies, on_cpu = {}, {}
    for name, tensor in state_dict.items():
        storage = id_tensor_storage(tensor)  # (an XLA tensor's id where it has no storage)
        if storage not in copies:
            copies[storage] = tensor.cpu()  # (a CPU tensor: itself)
        on_cpu[name] = copies[storage]
    return on_cpu


def model_card(args, about, state, metrics, config, hardware, loss_curve=False):
    """best/README.md, for people and for the Hub (which reads the metadata that
    huggingface_hub's ModelCardData writes), from the template model_card.md: what the model does
    and what it started from, its data, its metrics and the step they were reached at, the
    command that trains it again, the main settings, the hardware and the time, the evaluations
    so far. `about`: the script's pipeline_tag and task; `metrics`: eval_results.json's;
    `loss_curve`: best/ holds loss.png, which the card then shows."""
    scores = {key: value for key, value in metrics.items() if key != "step"}
    meta = card_metadata(args, about, scores)
    base = args.model_name_or_path
    if base:
        origin = (
            f"fine-tuned from [{base}](https://huggingface.co/{base})" if meta.base_model else f"fine-tuned from {base}"
        )
    else:
        sizes = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
        origin = f"trained from scratch ({type(config).__name__}: "
        origin += ", ".join(f"{size} {getattr(config, size)}" for size in sizes) + ")"
    batch = f"{args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} accumulated"
    settings = {
        "learning rate": f"{args.learning_rate}, {args.lr_scheduler_type}, {args.num_warmup_steps} warmup steps",
        "weight decay, gradient clipping": f"{args.weight_decay}, {args.max_grad_norm}",
        "batch": f"{batch} x {hardware['processes']} process(es)",
        "seed": args.seed,
        "hardware": f"{hardware['processes']} x {hardware['device']}, mixed precision {hardware['precision']}",
        "training time": f"{state.train_seconds / 60:.1f} minutes",
    }
    evaluations = [entry for entry in state.log_history if "eval_loss" in entry]
    eval_keys = [key for key in evaluations[-1] if key.startswith("eval_")] if evaluations else []
    held_out = f"the last {args.validation_split_percentage}% of the training lines or rows"
    return huggingface_hub.ModelCard.from_template(
        meta, template_path=str(Path(__file__).with_name("model_card.md")), name=Path(args.output_dir).name,
        task=about["task"], origin=origin, step=metrics.get("step"), steps_done=state.completed_steps, scores=scores,
        data=data_name(args), validation=args.validation_file or held_out, command=args.command, settings=settings,
        evaluations=evaluations, eval_keys=eval_keys, loss_curve=loss_curve,
    )  # fmt: skip


def card_metadata(args, about, scores):
    """The model card's metadata, which the Hub reads: library, pipeline, base model and data set
    (when they are on the Hub), metrics and results (model-index)."""
    base = args.model_name_or_path
    hub_data = None if args.train_file else args.dataset_name
    results = []
    for key, value in scores.items():
        result = huggingface_hub.EvalResult(
            task_type=about["pipeline_tag"], dataset_type=hub_data or "local", dataset_name=data_name(args),
            metric_type=key, metric_value=value,
        )  # fmt: skip
        results.append(result)
    return huggingface_hub.ModelCardData(
        library_name="transformers",
        pipeline_tag=about["pipeline_tag"],
        base_model=base if base and not Path(base).exists() else None,  # a hub name, not a local folder
        datasets=[hub_data] if hub_data else None,
        metrics=sorted({key.removeprefix("test_") for key in scores}),
        model_name=Path(args.output_dir).name,
        eval_results=results,
    )


def data_name(args):
    return args.train_file or f"{args.dataset_name} ({args.dataset_config_name or 'default'})"


def hub_problem(args):
    """--push_to_hub: why the model could not be uploaded at the end, or None. The Hub must
    answer and the token may write to the repository, which is made now (or found), as Hugging
    Face's example scripts do: not after hours of training."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "--push_to_hub: HF_HUB_OFFLINE is set, so the Hub cannot be reached; unset it, or drop --push_to_hub"
    try:
        api = huggingface_hub.HfApi(token=args.hub_token)
        api.create_repo(hub_repository(api, args), private=args.hub_private_repo, exist_ok=True)
    except Exception as err:  # no network, no token saved, a token that may only read
        refused = getattr(getattr(err, "response", None), "status_code", None) == 403
        why = "the token may not write there" if refused else "check the network and `hf auth login`"
        return (
            f"--push_to_hub: {first_line(err)}; {why}: pass --hub_token, another --hub_model_id, or drop --push_to_hub"
        )
    return None


def hub_repository(api, args):
    """--hub_model_id, else <the logged-in user>/<the output folder's name>."""
    return args.hub_model_id or f"{api.whoami()['name']}/{Path(args.output_dir).name}"


def push_to_hub(args, folder, step):
    """Upload best/ and its card: one call to huggingface_hub. A failure leaves the local model
    as it is, and the same command, run again after the training finished, tries only the upload
    again."""
    api = huggingface_hub.HfApi(token=args.hub_token)
    try:
        repo = hub_repository(api, args)
        api.upload_folder(repo_id=repo, folder_path=folder, commit_message=f"best/ at step {step}")
    except Exception as err:  # the network, the Hub, the quota: the model is safe on disk
        raise UserError(
            f"--push_to_hub: uploading {folder} failed ({first_line(err)}); it is safe on disk: run the same command "
            "again to retry the upload"
        ) from None
    print(f"Uploaded {folder} to https://huggingface.co/{repo}")


# ---- Throughput and the loss curves.
class Throughput:
    """Counts tokens on the device (no host sync per step); reports tokens/s over all processes
    when asked, and on a GPU the model FLOPs utilization (MFU)."""

    def __init__(self, accelerator, flops_per_token=None):
        self.accelerator, self.flops_per_token = accelerator, flops_per_token
        self.tokens = torch.zeros((), device=accelerator.device, dtype=torch.long)
        self.start = self.paused_at = time.perf_counter()
        peak = peak_flops(accelerator.device, accelerator.mixed_precision)
        self.peak = peak * accelerator.num_processes if peak else None  # each process has its own GPU

    def add(self, num_tokens):
        self.tokens += num_tokens

    def pause(self):
        """From here to resume() (evaluating, saving) is not training: it does not count."""
        self.paused_at = time.perf_counter()

    def resume(self):
        self.start += time.perf_counter() - self.paused_at

    def report(self):
        """{"tokens_per_second": ..., and "mfu" (0..1) where the device's peak is known}, since
        the last report."""
        total = self.accelerator.reduce(self.tokens.clone(), reduction="sum").item()
        out = {"tokens_per_second": total / max(time.perf_counter() - self.start, 1e-9)}
        self.tokens.zero_()
        self.start = time.perf_counter()
        if self.peak and self.flops_per_token:
            out["mfu"] = out["tokens_per_second"] * self.flops_per_token / self.peak
        return out


# Dense (no sparsity) peak tensor-core FLOP/s per GPU, by name: bf16/fp16, and TF32 for fp32.
PEAK_FLOPS = {
    "H200": (989e12, 494e12),
    "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "L4": (121e12, 60e12),
    "A10G": (70e12, 35e12),
    "T4": (65e12, 8e12),  # no bf16: fp16
    "V100": (125e12, 15.7e12),
}


def peak_flops(device, mixed_precision):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    for key, (half, tf32) in PEAK_FLOPS.items():
        if re.search(rf"\b{key}\b", name):  # whole words: an L40S is no L4
            return half if mixed_precision in ("bf16", "fp16") else tf32
    return None


def plot_history(log_history, path, eval_keys=("eval_loss",)):
    """loss.png: the training loss and the eval metrics against optimizer steps; losses on the
    left axis, other metrics (accuracy, perplexity, ...) on the right. A bare Figure, without
    pyplot: no display needed."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for key in ("train_loss", *dict.fromkeys(eval_keys)):
        points = [(e["step"], e[key]) for e in log_history if key in e]
        if points and key.endswith("loss"):
            ax.plot(*zip(*points), "-" if key == "train_loss" else "o-", label=key.replace("_", " "))
        elif points:  # a metric that is no loss: on an axis of its own, on the right
            other = ax.twinx()
            other.plot(*zip(*points), "s--", color="tab:green", label=key.replace("_", " "))
            other.set(ylabel=key.replace("_", " "))
            other.legend(loc="upper right")
    ax.set(xlabel="optimizer step", ylabel="loss")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
