"""The TPU path, run on torch_xla's CPU client (PJRT_DEVICE=CPU): Accelerate's XLA branch (lazy
tensors, MpDeviceLoader, graph compilation) for each script, in a subprocess of this Python. Where
torch_xla is not installed (the main environment, a user's machine) the file skips; CI runs it in
the environment .ci/xla-env builds (torch 2.9.0 and torch-xla 2.9.0):

    .ci/xla-env /work/xla-venv && /work/xla-venv/bin/python -m pytest tests/test_xla.py

XLA compiles every new graph, slowly on a CPU: the runs are tiny, all started by one fixture, two at
a time, and every test reads them."""

import json
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("torch_xla", reason="no torch_xla here: the XLA tests run in the environment .ci/xla-env builds")

import helpers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_finetune_gpt2 import make_tiny_gpt2, repetitive_lines  # noqa: E402

STEPS = 6  # optimizer steps of a run; a second run of twice as many compiles the same graphs
# As a user runs it: `PJRT_DEVICE=CPU python script.py` (no launcher, no LOCAL_RANK: common.setup
# gives the one process its local index, or it would print nothing).
XLA_ENV = {"PJRT_DEVICE": "CPU"}

# Runs the script with common.Checkpoints.save patched to SIGKILL the process once its first save
# is whole: a kill at a known step (3), with nothing cleaned up.
KILL_AFTER_FIRST_SAVE = """
import os, runpy, signal, sys
sys.path.insert(0, os.getcwd())
import common
save = common.Checkpoints.save
def save_then_die(self, state):
    save(self, state)
    os.kill(os.getpid(), signal.SIGKILL)
common.Checkpoints.save = save_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("xla-data")
    lines = repetitive_lines(400, seed=1)
    (d / "train.txt").write_text("\n".join(lines) + "\n")
    (d / "valid.txt").write_text("\n".join(repetitive_lines(60, seed=2)) + "\n")
    make_tiny_gpt2(d / "gpt2", lines, n_layer=1)  # one layer: XLA compiles its graphs faster
    helpers.make_tiny_bert(d / "bert")
    rows = helpers.toy_rows(120, seed=7)
    helpers.write_csv(d / "train.csv", rows[:96])
    helpers.write_csv(d / "dev.csv", rows[96:])
    helpers.write_csv(d / "test.csv", [{"text": row["text"]} for row in rows[96:]])
    return d


def script_args(script, d):
    """Each script's tiny run: a checkpoint at step 3, --test_file scored or predicted."""
    common = ["--learning_rate", "3e-3", "--checkpointing_steps", 3, "--logging_steps", 2, "--save_every_minutes", 0]
    if script == "finetune_gpt2.py":
        return [
            *common, "--model_name_or_path", d / "gpt2", "--train_file", d / "train.txt", "--validation_file",
            d / "valid.txt", "--test_file", d / "valid.txt", "--block_size", 32, "--max_new_tokens", 4,
            "--prompt", "the cat",
        ]  # fmt: skip
    if script == "pretrain_mlm.py":
        return [
            *common, "--train_file", d / "train.txt", "--validation_file", d / "valid.txt", "--vocab_size", 300,
            "--max_seq_length", 32, "--max_position_embeddings", 34, "--num_hidden_layers", 1, "--hidden_size", 32,
            "--num_attention_heads", 2, "--intermediate_size", 64, "--per_device_train_batch_size", 8,
            "--fill_mask_prompt", "the cat sat on the <mask> .",
        ]  # fmt: skip
    return [
        *common, "--model_name_or_path", d / "bert", "--train_file", d / "train.csv", "--validation_file",
        d / "dev.csv", "--test_file", d / "test.csv", "--max_seq_length", 32, "--per_device_train_batch_size", 8,
    ]  # fmt: skip


def run(script, args, out, metrics=None, kill=False):
    """One run in a subprocess; its output (and, with `metrics`, torch_xla's metrics report at
    every graph execution) kept beside `out`."""
    env = helpers.offline_env(**XLA_ENV)
    if metrics:
        env["XLA_METRICS_FILE"] = str(metrics)
    command = [sys.executable, "-c", KILL_AFTER_FIRST_SAVE] if kill else [sys.executable]
    command += [str(helpers.REPO / script), *map(str, args), "--output_dir", str(out)]
    proc = subprocess.run(command, cwd=helpers.REPO, env=env, capture_output=True, text=True, timeout=600)
    Path(f"{out}.log").write_text(proc.stdout + proc.stderr)
    return proc


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """For each script: `STEPS` steps (`ref`), twice as many (`long`); for GPT-2 and the MLM also a
    run killed after its step-3 checkpoint and the same command again (`resumed`). Two at a time."""
    root = tmp_path_factory.mktemp("xla-runs")
    results = {}

    def chain(script):
        name, args = Path(script).stem, script_args(script, data)
        ref, long = root / f"{name}-ref", root / f"{name}-long"
        results[name, "ref"] = run(script, [*args, "--max_train_steps", STEPS], ref, metrics=f"{ref}.metrics")
        results[name, "long"] = run(script, [*args, "--max_train_steps", 2 * STEPS], long, metrics=f"{long}.metrics")

    def kill_and_resume(script):
        name, args = Path(script).stem, [*script_args(script, data), "--max_train_steps", STEPS]
        out = root / f"{name}-resumed"
        results[name, "killed"] = run(script, args, out, kill=True)
        results[name, "killed_checkpoints"] = sorted(p.name for p in (out / "checkpoints").iterdir())
        results[name, "resumed"] = run(script, args, out)

    jobs = [
        (chain, "finetune_gpt2.py"),
        (kill_and_resume, "finetune_gpt2.py"),
        (chain, "pretrain_mlm.py"),
        (kill_and_resume, "pretrain_mlm.py"),
        (chain, "train_classifier.py"),
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for job in [pool.submit(function, script) for function, script in jobs]:
            job.result()
    for key, proc in results.items():
        if key[1] != "killed" and isinstance(proc, subprocess.CompletedProcess) and proc.returncode:
            raise AssertionError(f"{key} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return root, results


def compilations(metrics_file):
    """Graphs XLA compiled in a run: torch_xla's CompileTime count in its last metrics report."""
    counts = re.findall(r"Metric: CompileTime\n\s+TotalSamples: (\d+)", Path(metrics_file).read_text())
    return int(counts[-1])


@pytest.mark.parametrize("name", ["finetune_gpt2", "pretrain_mlm", "train_classifier"])
def test_each_script_trains_on_xla_in_bf16_and_exports_a_model_a_cpu_pipeline_loads(runs, name):
    root, results = runs
    out = root / f"{name}-ref"
    log = results[name, "ref"].stdout
    assert "xla:0, mixed precision: bf16" in log  # auto precision: bf16 on XLA
    assert json.loads((out / "eval_results.json").read_text())["step"] == STEPS
    from transformers import pipeline

    if name == "finetune_gpt2":
        assert "test_loss" in json.loads((out / "eval_results.json").read_text())  # --test_file scored best/
        assert (out / "samples.txt").read_text().startswith("the cat")  # the demo ran
        generator = pipeline("text-generation", model=str(out / "best"), device="cpu")
        text = generator("the cat", max_new_tokens=3, do_sample=False)[0]["generated_text"]
        assert text.startswith("the cat") and len(text) > len("the cat")
    elif name == "pretrain_mlm":
        assert re.search(r"\n  \d\.\d{3}  the cat sat on the", log)  # the demo filled the mask
        fill = pipeline("fill-mask", model=str(out / "best"), device="cpu")
        assert len(fill("the cat sat on the <mask> .")) == 5
    else:
        assert "note: on XLA every batch is padded to --max_seq_length" in log
        assert len((out / "predictions.tsv").read_text().splitlines()) == 1 + 24  # --test_file predicted
        classify = pipeline("text-classification", model=str(out / "best"), device="cpu")
        assert classify("w1 good w2")[0]["label"] in {"pos", "neg"}


def test_gpt2_keeps_its_output_layer_tied_to_its_embeddings_on_xla(runs, data):
    """Moving a model to XLA made the shared weight two parameters, and only one was trained."""
    root, _ = runs
    best = load_file(root / "finetune_gpt2-ref" / "best" / "model.safetensors")
    assert "lm_head.weight" not in best  # one tensor, as save_pretrained stores a tied weight
    trained = best["transformer.wte.weight"]
    assert not trained.equal(load_file(data / "gpt2" / "model.safetensors")["transformer.wte.weight"])
    # Accelerate's checkpoint on XLA stores the weight under both names: the same values.
    saved = load_file(root / "finetune_gpt2-ref" / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors")
    assert saved["lm_head.weight"].equal(saved["transformer.wte.weight"])
    assert saved["lm_head.weight"].equal(trained)


@pytest.mark.parametrize("name", ["finetune_gpt2", "pretrain_mlm"])
def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_weights(runs, name):
    root, results = runs
    assert results[name, "killed"].returncode == -signal.SIGKILL
    assert results[name, "killed_checkpoints"] == ["step_00000003"]
    assert "Resumed from" in results[name, "resumed"].stdout and "step 3" in results[name, "resumed"].stdout
    resumed = load_file(root / f"{name}-resumed" / "best" / "model.safetensors")
    uninterrupted = load_file(root / f"{name}-ref" / "best" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    different = [key for key in resumed if not resumed[key].equal(uninterrupted[key])]
    assert not different, f"resumed differs from uninterrupted in {different[:5]}"


@pytest.mark.parametrize("name", ["finetune_gpt2", "pretrain_mlm", "train_classifier"])
def test_xla_compiles_the_same_graphs_for_twice_the_steps(runs, name):
    """Every step after the first ones reuses compiled graphs: a graph that changed from step to
    step (a shape, a constant, a size read back from the device) would compile once a step."""
    root, _ = runs
    short, long = compilations(root / f"{name}-ref.metrics"), compilations(root / f"{name}-long.metrics")
    assert 0 < short == long, f"{short} graphs for {STEPS} steps, {long} for {2 * STEPS}"


ACCELERATE_SAVE_STATE_ON_XLA = """
import tempfile, torch
from accelerate import Accelerator
accelerator = Accelerator()
loader = accelerator.prepare(torch.utils.data.DataLoader(list(range(8)), batch_size=2))
try:
    accelerator.save_state(tempfile.mkdtemp())
except AttributeError as err:
    print("still needed:", err)
"""


def test_accelerate_still_needs_the_dataloader_shim():
    """xla.work_around_xla_gaps lends Accelerate's MpDeviceLoaderWrapper a .dataset, which
    save_state and load_state read (accelerate/checkpointing.py). When Accelerate's own save works
    without it, this fails: delete the shim and this test."""
    proc = subprocess.run(
        [sys.executable, "-c", ACCELERATE_SAVE_STATE_ON_XLA],
        env=helpers.offline_env(**XLA_ENV),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "still needed:" in proc.stdout and "dataset" in proc.stdout, proc.stdout + proc.stderr[-2000:]
