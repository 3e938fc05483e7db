"""TPUs (torch_xla; its CPU client, PJRT_DEVICE=CPU, runs the same path in the tests): the gaps
between XLA and what Accelerate and transformers assume, filled so a TPU run trains, resumes to
the same weights and exports a model a CPU loads.

Tests (in tests/, unless named otherwise):
- test_xla.py (every test; the shim's own test says when Accelerate no longer needs it)"""

import os
from pathlib import Path

import torch
from accelerate.utils import (
    DistributedType,
    find_tied_parameters,
    is_torch_xla_available,
    retie_parameters,
)
from safetensors.torch import load_file
from transformers.pytorch_utils import id_tensor_storage


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


def use_local_rank_zero():
    """XLA without a TPU (torch_xla's CPU or GPU client), one process that no launcher started:
    Accelerate reads the process's local index from LOCAL_RANK there (-1 when unset), and then no
    process is the first of its machine: nothing would be printed. Called before the Accelerator
    exists."""
    if is_torch_xla_available() and not is_torch_xla_available(check_is_tpu=True) and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = "0"


def pipeline_device(accelerator):
    """Where a script's pipelines run (its demo, the classifier's predictions): the training
    device, but the CPU on XLA (TPUs), which compiles a graph for each new shape, and a pipeline
    meets one at every generated token and every batch of other lengths."""
    if accelerator.device.type == "xla":
        return torch.device("cpu")
    return accelerator.device
