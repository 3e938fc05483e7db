"""The training order that makes a resumed run exact: each epoch's shuffle from (seed, epoch) alone,
padded to whole global batches so any split of the batch (processes x per-device x accumulation)
takes the same optimizer steps.

Tests (in tests/, unless named otherwise):
- test_common.py::test_epoch_sampler_pads_to_whole_global_batches_with_the_epochs_first_samples
- test_scale_out.py::test_a_two_process_run_resumes_on_one_process_with_twice_the_accumulation"""

import math

import torch


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


def global_batch_size(args, accelerator):
    """Examples per optimizer step: per device x processes x accumulated micro-batches."""
    return args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
