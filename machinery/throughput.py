"""What a run shows of its speed: tokens per second over every process, counted on the device (no
wait per step), and on a GPU the model FLOPs utilization (MFU) from nanoGPT's count of FLOPs per
token and the GPU's peak.

Tests (in tests/, unless named otherwise):
- test_common.py (flops match nanoGPT for GPT-2 124M, peak FLOPs by name, throughput counts
  training time only)
- bench/bench_speed.py"""

import math
import re
import time

import torch


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
