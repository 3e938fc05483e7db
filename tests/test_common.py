"""Pieces of common.py that can be checked on their own."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import common


def test_flops_per_token_match_nanogpt_for_gpt2_124m():
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())  # 124M, the size nanoGPT's MFU numbers are quoted for
    total = sum(p.numel() for p in model.parameters())
    # nanoGPT: N = all parameters but the position embeddings (the token embedding is
    # the tied output layer); 6N + 12 * layers * width * sequence length.
    n = total - model.transformer.wpe.weight.numel()
    assert common.flops_per_token(model, 1024) == 6 * n + 12 * 12 * 768 * 1024


def test_peak_flops_by_device_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert common.peak_flops(torch.device("cuda"), "bf16") == 989e12
    assert common.peak_flops(torch.device("cuda"), "no") == 494e12  # TF32
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert common.peak_flops(torch.device("cuda"), "fp16") == 65e12
    assert common.peak_flops(torch.device("cpu"), "no") is None


def test_throughput_counts_training_time_only(monkeypatch):
    from accelerate import Accelerator

    clock = [100.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    throughput = common.Throughput(Accelerator(cpu=True))
    throughput.add(torch.tensor(300))
    clock[0] += 2  # 2 s of training
    throughput.pause()
    clock[0] += 50  # evaluating and saving
    throughput.resume()
    throughput.add(torch.tensor(100))
    clock[0] += 2  # 2 more s of training
    assert throughput.report() == {"tokens_per_second": 100.0}  # 400 tokens in 4 s; no MFU on a CPU
    throughput.add(torch.tensor(50))
    clock[0] += 1  # the next window starts where the report was made
    assert throughput.report() == {"tokens_per_second": 50.0}


def test_first_line_of_an_error():
    assert common.first_line(ValueError("  bad header\n  at line 3\n"), limit=6) == "bad he"
    assert common.first_line(EOFError()) == "EOFError"  # no message: its type, not an IndexError
