"""Scaling out: resuming on another number of processes with the same global batch, processes
that must agree on the checkpoint and see one output folder, two nodes sharing one output folder,
the accelerate config files, and the GPU check's CPU answer. Processes are CPU processes (gloo).
(Each engine, FSDP2 and DeepSpeed included, keeps the promises in test_launch_paths.py.)"""

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
import torch
from safetensors.torch import load_file
from test_train_classifier import argv as classifier_argv

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
# Another number of processes, the same global batch.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_processes(tiny_bert, toy_files, tmp_path_factory):
    """The classifier on 2 processes x 16 per device, 2 epochs of 400 rows (13 optimizer steps
    each: 400 does not divide by the global batch of 32, so each epoch's last step holds the
    epoch's first samples again), dropout off, a checkpoint every 5 steps."""
    d = tmp_path_factory.mktemp("two")
    model = helpers.without_dropout(tiny_bert, d / "bert")

    def args(out, *extra):
        base = ["--max_train_samples", 400, "--num_train_epochs", 2, "--checkpointing_steps", 5, "--keep_last", 100]
        return classifier_argv(model, *toy_files, out, *base, *extra)

    helpers.torchrun("train_classifier.py", *args(d / "run"))
    return args, d / "run"


def test_a_two_process_run_resumes_on_one_process_with_twice_the_accumulation(two_processes, tmp_path, capsys):
    args, full = two_processes
    out = tmp_path / "one"
    shutil.copytree(full, out)
    for c in checkpoints(out):
        if meta(c)["state"]["completed_steps"] > 5:
            shutil.rmtree(c)  # as if the 2-process job was preempted after step 5 (epoch 0, batch 5 per process)
    capsys.readouterr()
    state = train_classifier.main(args(out, "--gradient_accumulation_steps", 2))
    printed = capsys.readouterr().out
    assert "made with 2 x 16 x 1" in printed and "this run uses 1 x 16 x 2" in printed
    assert "step 5, batch 10 of the epoch" in printed
    assert state.completed_steps == 26  # through the end of epoch 0, on the other split
    assert_same_weights(
        checkpoints(out)[-1] / "model.safetensors", checkpoints(full)[-1] / "model.safetensors", exact=False
    )
    evals = [
        [e["eval_loss"] for e in meta(checkpoints(o)[-1])["state"]["log_history"] if "eval_loss" in e]
        for o in (out, full)
    ]
    assert evals[0] == pytest.approx(evals[1], rel=1e-5)


def test_the_processes_fall_back_together_when_one_cannot_load_a_checkpoint(two_processes, tmp_path):
    """Process 1 cannot load its part of the newest checkpoint: both go back to the one before,
    together (alone, it would train from another step than process 0, and the two would part ways
    or wait for each other forever)."""
    args, full = two_processes
    out = tmp_path / "run"
    shutil.copytree(full, out)
    for c in checkpoints(out):
        if meta(c)["state"]["completed_steps"] > 10:
            shutil.rmtree(c)
    newest, previous = checkpoints(out)[-1], checkpoints(out)[-2]
    plant_pickle(newest, "random_states_1.pkl")  # process 1's random state: not loadable safely
    run = {"script": "train_classifier", "argv": args(out), "engine": "ddp"}
    assert helpers.launch([run], tmp_path / "logs", nproc=2) == [0]
    printed = helpers.log_of(run)
    assert f"could not load checkpoint {newest} (process 1: random_states_1.pkl cannot be loaded safely" in printed
    assert f"Resumed from {previous}: epoch 0, step 5," in printed
    assert_same_weights(checkpoints(out)[-1] / "model.safetensors", checkpoints(full)[-1] / "model.safetensors")


def plant_pickle(checkpoint, name):
    """A file that unpickles into an object (os.system): torch's weights_only loading refuses it."""
    import pickle

    (checkpoint / name).write_bytes(pickle.dumps(os.system))
    record = meta(checkpoint)
    record["files"][name] = (checkpoint / name).stat().st_size  # sizes match: it looks whole
    (checkpoint / "training_state.json").write_text(json.dumps(record))


def test_every_machine_must_see_the_same_output_folder(two_processes, tmp_path):
    """Two machines whose --output_dir is not one shared folder would each keep part of every
    checkpoint: refused at the start, in one line, before anything is written."""
    args, _ = two_processes
    run = {"script": "train_classifier", "argv": args(tmp_path / "machine0"), "engine": "ddp"}
    run["argv_by_rank"] = {1: args(tmp_path / "machine1")}  # another folder on the second machine
    assert helpers.launch([run], tmp_path / "logs", nproc=2) == [2]
    printed = helpers.log_of(run)
    errors = [line for line in printed.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "process 1 on" in errors[0] and "one shared --output_dir" in errors[0], printed[-2000:]
    assert "error: " not in helpers.log_of(run, rank=1)
    assert not (tmp_path / "machine0" / "checkpoints").exists() and not (tmp_path / "machine0" / ".lock").exists()


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
    """Two 'machines' of one process each (torchrun --nnodes 2), one shared output folder: killed
    together after a random step and started again with the same commands, they end where the
    uninterrupted 2-process run on one machine ended. The main process of the whole job holds the
    lock and writes each file; the other node's processes wait."""
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

    target = random.Random().randint(5, 21)
    kill_when_saved(start_nodes(), out, target)
    assert meta(checkpoints(out)[-1])["state"]["completed_steps"] < 26, f"not killed after step {target}"
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


# ---------------------------------------------------------------------------
# Faults of a multi-GPU job that only some processes meet (tests/faults_on_cpu.py makes them).
# ---------------------------------------------------------------------------


def torchrun_with_faults(script, args, timeout=150, **faults):
    """torchrun of `script` under tests/faults_on_cpu.py; a job that hangs is killed whole (its
    processes too) and fails the test."""
    command = helpers.torchrun_command(script, *args, wrapper="faults_on_cpu.py")
    env = helpers.offline_env(ACCELERATE_USE_CPU="1", **{k: str(v) for k, v in faults.items()})
    proc = subprocess.Popen(
        command, cwd=helpers.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"the job hung for {timeout} s") from None
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def test_auto_find_batch_size_on_two_processes_agrees_on_one_size(tiny_bert, toy_files, tmp_path):
    """One process runs out of memory with 16 examples, the other does not: they cannot retry
    apart (the other waits for its gradients forever). The job stops, saying so, with the smaller
    size recorded, and the same command goes on with it on every process."""
    out = tmp_path / "run"
    args = classifier_argv(tiny_bert, *toy_files, out, "--max_train_steps", 4, "--auto_find_batch_size")
    first = torchrun_with_faults("train_classifier.py", args, OOM_RANK=1, OOM_ABOVE=8)
    assert first.returncode != 0
    assert "error: out of memory on process 1 with a per-device batch of 16" in first.stderr, first.stderr[-3000:]
    assert json.loads((out / "batch_size.json").read_text())["per_device_train_batch_size"] == 8
    again = torchrun_with_faults("train_classifier.py", args, OOM_RANK=1, OOM_ABOVE=8)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "a per-device batch of 8 fits: starting with it" in again.stdout
    assert meta(checkpoints(out)[-1])["state"]["completed_steps"] == 4


def test_processes_wait_for_long_tokenizing_outside_collectives(tmp_path):
    """The first process tokenizes for longer than a collective may wait (NCCL: 10 minutes, here
    made 3 seconds): the other one waits for its token file without timing out."""
    import test_finetune_gpt2 as gpt2_tests

    text = tmp_path / "train.txt"
    text.write_text("\n".join(gpt2_tests.repetitive_lines(200, seed=1)) + "\n")
    gpt2 = gpt2_tests.make_tiny_gpt2(tmp_path / "gpt2", text.read_text().splitlines())
    args = gpt2_tests.argv(gpt2, text, None, tmp_path / "out", "--max_train_steps", 2, "--max_new_tokens", 0)
    run = torchrun_with_faults("finetune_gpt2.py", args, SLOW_RANK=0, SLOW_SECONDS=6, COLLECTIVE_TIMEOUT=3)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "eval_results.json").read_text())["step"] == 2
    assert not list((tmp_path / "out").glob(".done-*"))  # the waits leave nothing behind
