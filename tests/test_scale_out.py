"""Scaling out: FSDP's sharded weights and checkpoints, resuming on another number of
processes with the same global batch, two nodes sharing one output folder, bf16 on CPU,
the accelerate config files, and the GPU check's CPU answer. Processes are CPU processes
(gloo) under torchrun; FSDP is Accelerate's own FSDP2 code, switched on for CPU processes
by tests/fsdp_on_cpu.py."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers
import pytest
import test_finetune_gpt2 as gpt2_tests
import torch
from safetensors.torch import load_file
from test_train_classifier import argv as classifier_argv

import finetune_gpt2
import train_classifier


def checkpoints(out):
    return sorted((Path(out) / "checkpoints").glob("step_*"))


def meta(checkpoint):
    return json.loads((checkpoint / "training_state.json").read_text())


def assert_same_weights(a, b, exact=True):
    a, b = load_file(a), load_file(b)
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:  # the same sums in another order: equal up to rounding
            torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=name)


def kill_when_saved(procs, out, target):
    """SIGKILL every process group of `procs` once a checkpoint of step >= target exists."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if any(
            meta(c)["state"]["completed_steps"] >= target
            for c in checkpoints(out)
            if (c / "training_state.json").exists()
        ):
            break
        time.sleep(0.01)
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


# ---------------------------------------------------------------------------
# FSDP: every process takes part in the export; sharded checkpoints are recorded whole.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_text(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    (d / "train.txt").write_text("\n".join(gpt2_tests.repetitive_lines(300, seed=1)) + "\n")
    (d / "valid.txt").write_text("\n".join(gpt2_tests.repetitive_lines(40, seed=2)) + "\n")
    model = gpt2_tests.make_tiny_gpt2(d / "gpt2", (d / "train.txt").read_text().splitlines())
    return model, d / "train.txt", d / "valid.txt"


def gpt2_argv(setup, out, *extra):
    model, train, valid = setup
    args = gpt2_tests.argv(model, train, valid, out, "--num_train_epochs", 2, "--per_device_train_batch_size", 4)
    return args + ["--checkpointing_steps", "4", "--keep_last", "100", "--max_new_tokens", "0", *map(str, extra)]


def test_fsdp_exports_the_full_weights_and_its_sharded_checkpoints_resume(gpt2_text, tmp_path):
    out = tmp_path / "fsdp"
    helpers.torchrun("finetune_gpt2.py", *gpt2_argv(gpt2_text, out), wrapper="fsdp_on_cpu.py")

    # The export holds the full trained weights: loaded in one process, it scores what the sharded model scored.
    results = json.loads((out / "eval_results.json").read_text())
    assert gpt2_tests.hand_mean_token_loss(out / "best", gpt2_text[2]) == pytest.approx(results["loss"], rel=1e-5)

    # Checkpoints are folders of shards; every file in every sub-folder is recorded with its size.
    newest, previous = checkpoints(out)[-1], checkpoints(out)[-2]
    files = {p.relative_to(newest).as_posix(): p.stat().st_size for p in newest.rglob("*") if p.is_file()}
    del files["training_state.json"]
    assert meta(newest)["files"] == files
    shards = [name for name in files if name.startswith("pytorch_model_fsdp_0/") and name.endswith(".distcp")]
    assert len(shards) == 2  # one per process

    # A save killed while writing a shard: that checkpoint is skipped, the one before used, and the run ends the same.
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    shard = damaged / "checkpoints" / newest.name / shards[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    proc = helpers.torchrun("finetune_gpt2.py", *gpt2_argv(gpt2_text, damaged), wrapper="fsdp_on_cpu.py")
    assert f"skipping damaged checkpoint {damaged / 'checkpoints' / newest.name}" in proc.stdout
    assert f"Resumed from {damaged / 'checkpoints' / previous.name}" in proc.stdout
    assert_same_weights(damaged / "best" / "model.safetensors", out / "best" / "model.safetensors")

    # Shards of 2 processes cannot be read by 1: refused, saying why.
    proc = helpers.torchrun(
        "finetune_gpt2.py",
        *gpt2_argv(gpt2_text, out, "--per_device_train_batch_size", 8, "--num_train_epochs", 3),
        nproc=1,
        wrapper="fsdp_on_cpu.py",
        check=False,
    )
    assert proc.returncode != 0 and "holds FSDP/DeepSpeed shards of 2 process(es)" in proc.stderr


# ---------------------------------------------------------------------------
# Another number of processes, the same global batch.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_processes(tiny_bert, toy_files, tmp_path_factory):
    """The classifier on 2 processes x 16 per device, 2 epochs of 384 rows (12 optimizer
    steps each), dropout off, a checkpoint every 5 steps."""
    d = tmp_path_factory.mktemp("two")
    model = helpers.without_dropout(tiny_bert, d / "bert")

    def args(out, *extra):
        base = ["--max_train_samples", 384, "--num_train_epochs", 2, "--checkpointing_steps", 5, "--keep_last", 100]
        return classifier_argv(model, *toy_files, out, *base, *extra)

    helpers.torchrun("train_classifier.py", *args(d / "run"))
    return args, d / "run"


def test_a_two_process_run_resumes_on_one_process_with_twice_the_accumulation(two_processes, tmp_path, capsys):
    args, full = two_processes
    out = tmp_path / "one"
    shutil.copytree(full, out)
    for c in checkpoints(out):
        if meta(c)["state"]["completed_steps"] > 5:
            shutil.rmtree(c)  # as if the 2-process job was preempted after step 5 (epoch 1, batch 5 per process)
    capsys.readouterr()
    state = train_classifier.main(args(out, "--gradient_accumulation_steps", 2))
    printed = capsys.readouterr().out
    assert "made with 2 x 16 x 1" in printed and "this run uses 1 x 16 x 2" in printed
    assert "step 5, batch 10 of the epoch" in printed
    assert state.completed_steps == 24
    assert_same_weights(
        checkpoints(out)[-1] / "model.safetensors", checkpoints(full)[-1] / "model.safetensors", exact=False
    )
    evals = [
        [e["eval_loss"] for e in meta(checkpoints(o)[-1])["state"]["log_history"] if "eval_loss" in e]
        for o in (out, full)
    ]
    assert evals[0] == pytest.approx(evals[1], rel=1e-5)


def test_another_global_batch_is_refused_with_the_numbers_that_work(two_processes, tmp_path, capsys):
    args, full = two_processes
    out = tmp_path / "one"
    shutil.copytree(full, out)
    before = helpers.digest(out)
    with pytest.raises(SystemExit):
        train_classifier.main(args(out, "--num_train_epochs", 3))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "32 -> 16 examples per optimizer step" in line
    assert "--per_device_train_batch_size 16 --gradient_accumulation_steps 2" in line and "--no_resume" in line
    assert helpers.digest(out) == before


def test_two_nodes_on_localhost_share_one_output_folder(two_processes, tmp_path):
    """Two 'machines' of one process each (torchrun --nnodes 2), one shared output folder:
    killed together after a random step and started again with the same commands, they end
    where the uninterrupted 2-process run on one machine ended. The main process of the
    whole job holds the lock and writes each file; the other node's processes wait."""
    args, full = two_processes
    out = tmp_path / "nodes"

    def start_nodes():
        port = helpers.free_port()
        return [
            subprocess.Popen(
                helpers.torchrun_command("train_classifier.py", *args(out), nproc=1, nnodes=2, node_rank=r, port=port),
                cwd=helpers.REPO,
                env=helpers.offline_env(ACCELERATE_USE_CPU="1"),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            for r in (0, 1)
        ]

    target = random.Random().randint(5, 19)
    kill_when_saved(start_nodes(), out, target)
    assert meta(checkpoints(out)[-1])["state"]["completed_steps"] < 24, f"not killed after step {target}"
    nodes = start_nodes()
    outputs = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert "Resumed from" in outputs[0][0]
    # Across "machines" gloo adds the gradients in another order: equal up to rounding (1e-7 seen).
    final = checkpoints(out)[-1] / "model.safetensors"
    assert_same_weights(final, checkpoints(full)[-1] / "model.safetensors", exact=False)
    assert {p.name for p in checkpoints(out)[-1].glob("random_states_*")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }


# ---------------------------------------------------------------------------
# bf16 on a CPU: the mixed-precision path that runs here.
# ---------------------------------------------------------------------------


def test_bf16_on_cpu_trains_and_a_killed_run_resumes_to_the_same_weights(gpt2_text, tmp_path, capsys):
    full = tmp_path / "full"
    untrained = gpt2_tests.hand_mean_token_loss(gpt2_text[0], gpt2_text[2])
    state = finetune_gpt2.main(gpt2_argv(gpt2_text, full, "--mixed_precision", "bf16"))
    assert "mixed precision: bf16" in capsys.readouterr().out
    assert state.best_metric < untrained - 1  # it learns

    out = tmp_path / "killed"
    target = random.Random().randint(4, 24)
    proc = subprocess.Popen(
        helpers.script_command("finetune_gpt2.py", *gpt2_argv(gpt2_text, out, "--mixed_precision", "bf16")),
        cwd=helpers.REPO,
        env=helpers.offline_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    kill_when_saved([proc], out, target)
    assert meta(checkpoints(out)[-1])["state"]["completed_steps"] < 32, f"not killed after step {target}"
    helpers.run_script("finetune_gpt2.py", *gpt2_argv(gpt2_text, out, "--mixed_precision", "bf16"))
    assert_same_weights(checkpoints(out)[-1] / "model.safetensors", checkpoints(full)[-1] / "model.safetensors")


# ---------------------------------------------------------------------------
# The accelerate config files and the GPU check.
# ---------------------------------------------------------------------------

CONFIGS = sorted((helpers.REPO / "configs").glob("*.yaml"))


def test_there_is_a_config_for_each_way_to_scale():
    names = {p.stem for p in CONFIGS}
    assert names == {"single_gpu", "multi_gpu", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "tpu", "multi_node"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_each_config_loads_in_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    if "deepspeed" in path.stem:
        stage = int(path.stem[-1])
        assert config.deepspeed_config["zero_stage"] == stage
        if stage == 3:  # or best/ cannot be gathered
            assert config.deepspeed_config["zero3_save_16bit_model"] is True
    if path.stem == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2
    if path.stem == "multi_node":
        assert config.num_machines >= 2 and config.main_process_ip


def test_the_gpu_check_on_a_cpu_says_it_needs_a_gpu():
    proc = subprocess.run(
        [sys.executable, str(helpers.REPO / "bench" / "gpu_check.py")],
        cwd=helpers.REPO,
        env=helpers.offline_env(CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "needs a CUDA GPU" in proc.stdout


def test_no_resume_empties_files_before_deleting_them(two_processes, tmp_path):
    """--no_resume deletes the old checkpoints the Drive-friendly way: emptied first."""
    args, full = two_processes
    out = tmp_path / "run"
    shutil.copytree(full, out)
    link = tmp_path / "link"
    os.link(checkpoints(out)[0] / "optimizer.bin", link)
    train_classifier.main(args(out, "--no_resume", "--max_train_steps", 1, "--num_train_epochs", 1))
    assert link.stat().st_size == 0
