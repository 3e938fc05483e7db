"""Pieces of common.py that can be checked on their own."""

import os
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import common
from machinery import engines, errors, sampling, throughput, token_files


def test_flops_per_token_match_nanogpt_for_gpt2_124m():
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())  # 124M, the size nanoGPT's MFU numbers are quoted for
    total = sum(p.numel() for p in model.parameters())
    # nanoGPT: N = all parameters but the position embeddings (the token embedding is
    # the tied output layer); 6N + 12 * layers * width * sequence length.
    n = total - model.transformer.wpe.weight.numel()
    assert throughput.flops_per_token(model, 1024) == 6 * n + 12 * 12 * 768 * 1024


def test_peak_flops_by_device_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert throughput.peak_flops(torch.device("cuda"), "bf16") == 989e12
    assert throughput.peak_flops(torch.device("cuda"), "no") == 494e12  # TF32
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert throughput.peak_flops(torch.device("cuda"), "fp16") == 65e12
    assert throughput.peak_flops(torch.device("cpu"), "no") is None


def test_throughput_counts_training_time_only(monkeypatch):
    from accelerate import Accelerator

    clock = [100.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    meter = throughput.Throughput(Accelerator(cpu=True))
    meter.add(torch.tensor(300))
    clock[0] += 2  # 2 s of training
    meter.pause()
    clock[0] += 50  # evaluating and saving
    meter.resume()
    meter.add(torch.tensor(100))
    clock[0] += 2  # 2 more s of training
    assert meter.report() == {"tokens_per_second": 100.0}  # 400 tokens in 4 s; no MFU on a CPU
    meter.add(torch.tensor(50))
    clock[0] += 1  # the next window starts where the report was made
    assert meter.report() == {"tokens_per_second": 50.0}


def test_first_line_of_an_error():
    assert errors.first_line(ValueError("  bad header\n  at line 3\n"), limit=6) == "bad he"
    assert errors.first_line(EOFError()) == "EOFError"  # no message: its type, not an IndexError


@pytest.mark.parametrize(
    "device, capability, expected",
    [
        ("cuda", (7, 0), "fp16"),  # V100
        ("cuda", (7, 5), "fp16"),  # T4: Colab's free GPU, no bf16 units (torch counts emulation as support)
        ("cuda", (8, 0), "bf16"),  # A100
        ("cuda", (8, 9), "bf16"),  # L4
        ("cuda", (9, 0), "bf16"),  # H100
        ("cpu", None, "no"),
        ("xla", None, "bf16"),  # TPU
    ],
)
def test_auto_precision_follows_the_device(device, capability, expected):
    assert common.auto_mixed_precision(device, capability) == expected


def test_auto_precision_asks_the_gpu_its_capability_not_whether_it_emulates_bf16(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # what a T4 says
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert common.choose_mixed_precision("auto") == "fp16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert common.choose_mixed_precision("auto") == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # accelerate launch --mixed_precision fp16
    assert common.choose_mixed_precision("auto") == "fp16"
    assert common.choose_mixed_precision("no") == "no"  # the flag wins


def test_auto_precision_is_bf16_on_a_tpu_whose_launcher_sets_none(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(common, "is_torch_xla_available", lambda check_is_tpu=False: True)
    assert common.choose_mixed_precision("auto") == "bf16"


def zero3_partitioned(model):
    """The model as DeepSpeed ZeRO-3 leaves it on each process after loading: every weight an
    empty tensor, its whole shape in ds_shape and its size in ds_numel."""
    for param in model.parameters():
        param.ds_shape, param.ds_numel = param.shape, param.numel()
        param.data = torch.empty(0)
    return model


def test_zero3_split_weights_keep_their_weight_decay_and_their_flops():
    import argparse

    args = argparse.Namespace(weight_decay=0.1, learning_rate=1e-3)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=300)
    whole, split = GPT2LMHeadModel(config), zero3_partitioned(GPT2LMHeadModel(config))
    assert all(p.numel() == 0 for p in split.parameters())
    assert throughput.flops_per_token(split, 64) == throughput.flops_per_token(whole, 64) > 0

    def decayed(model):
        groups = common.make_optimizer(model, args, torch.device("cpu")).param_groups
        names = {id(p): name for name, p in model.named_parameters()}
        return [sorted(names[id(p)] for p in group["params"]) for group in groups]

    assert decayed(split) == decayed(whole)
    assert "transformer.h.0.attn.c_attn.weight" in decayed(split)[0]  # matrices decay
    assert "transformer.h.0.ln_1.weight" in decayed(split)[1]  # norms and biases do not


def test_fsdp_units_are_the_transformer_layers_not_the_embeddings():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForMaskedLM

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    for model, layer in (
        (BertForSequenceClassification(BertConfig(**small)), "BertLayer"),  # _no_split_modules: BertEmbeddings too
        (RobertaForMaskedLM(RobertaConfig(**small)), "RobertaLayer"),
        (GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)), "GPT2Block"),
    ):
        plugin = SimpleNamespace(transformer_cls_names_to_wrap=None)
        accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin))
        engines.set_fsdp_units(accelerator, model)
        assert plugin.transformer_cls_names_to_wrap == [layer]
    plugin.transformer_cls_names_to_wrap = ["MyBlock"]  # from the accelerate config: kept
    engines.set_fsdp_units(accelerator, model)
    assert plugin.transformer_cls_names_to_wrap == ["MyBlock"]


def test_epoch_sampler_pads_to_whole_global_batches_with_the_epochs_first_samples():
    sampler = sampling.EpochSampler(num_samples=10, global_batch=4, seed=3)
    first = list(sampler)
    assert len(first) == len(sampler) == 12
    assert sorted(first[:10]) == list(range(10)) and first[10:] == first[:2]
    assert list(sampler) == first  # the same epoch, the same order
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(sampling.EpochSampler(10, 4, seed=3)) == first  # nothing but (seed, epoch): a resumed run's order
    assert len(sampling.EpochSampler(3, 8, seed=0)) == 8 and sorted(set(sampling.EpochSampler(3, 8, seed=0))) == [
        0,
        1,
        2,
    ]


def test_peak_flops_match_whole_words_of_the_gpu_name(monkeypatch):
    for name, expected in (("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L4", 121e12), ("NVIDIA L40S", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert throughput.peak_flops(torch.device("cuda"), "bf16") == expected, name


@pytest.mark.parametrize("token", [["--hub_token", "hf_SECRET"], ["--hub_token=hf_SECRET"], ["--hub_tok", "hf_SECRET"]])
def test_the_command_line_never_holds_the_hub_token(token, tmp_path):
    """args.command goes into the model card, which --push_to_hub uploads: the token is replaced
    however it was passed."""
    import train_classifier

    def command_of(args):
        return args.command

    argv = ["--train_file", "train.csv", "--output_dir", str(tmp_path), *token]
    command = common.run_script(command_of, train_classifier.parse_args, argv)
    assert "hf_SECRET" not in command and "$HF_TOKEN" in command


def test_token_file_writers_leave_each_other_alone(tmp_path):
    """A datasets cache may be shared by machines (an NFS home), whose first processes write the
    same token file at once. A temporary file of this machine's killed writer is removed; one of
    another machine (its process cannot be looked up here) only when untouched for a day."""
    import socket
    import subprocess
    import time

    import datasets

    dead = subprocess.Popen(["true"])
    dead.wait()  # a process id that no process of this machine has
    here, name = socket.gethostname(), "abc"
    killed_here = tmp_path / f".tmp-{dead.pid}@{here}-{name}.tokens.npy"
    writing_elsewhere = tmp_path / f".tmp-{dead.pid}@another-machine-{name}.tokens.npy"
    killed_elsewhere = tmp_path / f".tmp-{dead.pid}@another-machine-{name}.lines.npy"
    unnamed_writer = tmp_path / f".tmp-{dead.pid}-{name}.tokens.npy"  # the host unknown (an older version's)
    for path in (killed_here, writing_elsewhere, killed_elsewhere, unnamed_writer):
        path.write_bytes(b"partial")
    day_ago = time.time() - 25 * 3600
    os.utime(killed_elsewhere, (day_ago, day_ago))
    token_file = token_files.TokenFile(tmp_path / name)
    token_file.write(datasets.Dataset.from_dict({"input_ids": [[1, 2], [3]]}), 300)
    assert token_file.open() and list(token_file.tokens) == [1, 2, 3]
    assert writing_elsewhere.exists() and unnamed_writer.exists()
    assert not killed_here.exists() and not killed_elsewhere.exists()


def test_tokenizing_maps_into_files_of_its_own(tmp_path, monkeypatch):
    """The mapped data set goes to files named for this writer beside the token file, not to the
    data set's cache, where another machine mapping the same text would read or delete them."""
    import argparse
    import socket

    import datasets
    import helpers
    from transformers import AutoTokenizer

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    tokenizer = AutoTokenizer.from_pretrained(helpers.make_tiny_bert(tmp_path / "bert"))
    (tmp_path / "text.txt").write_text("good w1\nbad w2\n")
    text = datasets.load_dataset("text", data_files=str(tmp_path / "text.txt"), split="train", cache_dir=tmp_path)
    real_map, cache_files = datasets.Dataset.map, []

    def map_(self, *args, **kwargs):
        cache_files.append(kwargs.get("cache_file_name"))
        return real_map(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", map_)
    args = argparse.Namespace(preprocessing_num_workers=1)
    token_file = token_files.tokenize_to_file(
        text, lambda lines: tokenizer(lines)["input_ids"], tokenizer, args, "a", "r"
    )
    assert token_file.num_tokens > 0 and len(cache_files) == 1 and cache_files[0] is not None
    assert Path(cache_files[0]).parent == token_file.tokens_path.parent
    assert Path(cache_files[0]).name.startswith(f".tmp-{os.getpid()}@{socket.gethostname()}-")
    assert not list(token_file.tokens_path.parent.glob(".tmp-*"))  # removed once the token file is whole


def test_norm_weights_of_any_class_are_not_decayed():
    """Llama's RMSNorm is no LayerNorm, and its last one is named plain `norm`: not decayed either,
    like every other normalization weight and bias; every matrix is."""
    import argparse

    from transformers import LlamaConfig, LlamaForCausalLM

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100)
    model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **small))
    args = argparse.Namespace(weight_decay=0.1, learning_rate=1e-3)
    decayed, kept = common.make_optimizer(model, args, torch.device("cpu")).param_groups
    names = {id(p): name for name, p in model.named_parameters()}
    assert "model.norm.weight" in {names[id(p)] for p in kept["params"]}
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim < 2 for p in kept["params"])


@pytest.mark.parametrize("metric", ["loss", "accuracy"])
def test_a_number_beats_a_best_that_is_no_number(metric, monkeypatch, tmp_path):
    """A first evaluation that is no number (a loss diverged in fp16) is best/ for want of another,
    and the first number after it replaces it: compared with NaN, no number is lower or higher,
    so best/ used to stay that model to the end. NaN never beats a number."""
    import argparse
    from types import SimpleNamespace

    exported = []
    monkeypatch.setattr(common.export, "model_card", lambda *args: "card")
    monkeypatch.setattr(common.export, "export_model", lambda *args: exported.append(state.completed_steps))
    args = argparse.Namespace(output_dir=str(tmp_path))
    best = common.BestModel(SimpleNamespace(is_main_process=False), args, None, None, metric, None)
    state = common.TrainingState()
    sign = 1 if metric == "loss" else -1  # lower is better for a loss, higher for accuracy
    for step, value in enumerate([float("nan"), 5.0, float("nan"), 6.0, 4.0], start=1):
        state.completed_steps = step
        best.keep_if_better(state, {metric: sign * value})
    assert exported == [1, 2, 5] and state.best_metric == sign * 4.0 and state.best_step == 5
    state.completed_steps = 6
    best.keep_if_better(state, {metric: float("nan")})
    assert state.evals_without_improvement == 1 and exported == [1, 2, 5]
