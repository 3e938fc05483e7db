"""Every launch path keeps the promises. Each script runs on each engine this machine can run: one
process, bf16, --torch_compile, two CPU processes (DDP over gloo), FSDP2 and DeepSpeed ZeRO-2 and
ZeRO-3 on two CPU processes (tests/fsdp_on_cpu.py, tests/deepspeed_on_cpu.py switch Accelerate's own
code for them on). For each:

- the export re-scores, loaded alone as users load it, to the evaluation loss the run reported;
- a run SIGKILLed during its first epoch-end evaluation (its checkpoint of the epoch's last step
  saved, gradient accumulation on), then run again with the same command, ends at the uninterrupted
  run's weights;
- the learning rate at every step after the resume is the uninterrupted run's.

One job per engine runs all of it (tests/launch_worker.py forks each run from a worker that
imported everything once), and the tests below read what it left."""

import json
import shutil
from pathlib import Path

import helpers
import pytest
import test_finetune_gpt2 as gpt2_tests
import test_pretrain_mlm as mlm_tests
import torch
from safetensors.torch import load_file

SCRIPTS = ["train_classifier", "finetune_gpt2", "pretrain_mlm"]
# engine -> (processes, what the worker switches on, extra flags, the scripts it runs)
ENGINES = {
    "one": (1, "one", [], SCRIPTS),
    "bf16": (1, "one", ["--mixed_precision", "bf16"], SCRIPTS),
    # Compiling takes a while on a CPU: the language model with fixed shapes, where users want it.
    "compile": (1, "one", ["--torch_compile"], ["finetune_gpt2"]),
    "ddp": (2, "ddp", [], SCRIPTS),
    # FSDP2 cannot shard RoBERTa's masked-LM head (a bias shared by two units): pretrain_mlm.py
    # refuses it, in one line (tested below).
    "fsdp2": (2, "fsdp2", [], SCRIPTS[:2]),
    "zero2": (2, "deepspeed", [], SCRIPTS),
    "zero3": (2, "deepspeed", [], SCRIPTS),
}
GLOBAL_BATCH, ACCUMULATION = 16, 2
# 90 rows, 63 blocks, 72 samples: padded to whole global batches of 16 (sampling.EpochSampler)
STEPS_PER_EPOCH = {"train_classifier": 6, "finetune_gpt2": 4, "pretrain_mlm": 5}


@pytest.fixture(scope="module")
def data(tiny_bert, tmp_path_factory):
    """Each script's model and data flags: tiny models, a few steps an epoch. The classifier
    starts from a model that has its head already (no weights drawn at random as it loads, which
    engines do in their own ways), and clipping and weight decay are on, so every engine is seen
    to apply them."""
    d = tmp_path_factory.mktemp("matrix-data")
    classifier = helpers.write_csv(d / "train.csv", helpers.toy_rows(90, seed=1))
    classifier_dev = helpers.write_csv(d / "dev.csv", helpers.toy_rows(24, seed=2))
    text, valid = d / "train.txt", d / "valid.txt"
    text.write_text("\n".join(gpt2_tests.repetitive_lines(150, seed=1)) + "\n")
    valid.write_text("\n".join(gpt2_tests.repetitive_lines(30, seed=2)) + "\n")
    gpt2 = gpt2_tests.make_tiny_gpt2(d / "gpt2", text.read_text().splitlines())
    bert = helpers.with_classifier_head(tiny_bert, d / "bert", ["neg", "pos"])
    mlm_sizes = ["--vocab_size", 300, "--max_seq_length", 32, "--max_position_embeddings", 34, "--hidden_size", 64]
    mlm_sizes += ["--num_hidden_layers", 2, "--num_attention_heads", 2, "--intermediate_size", 128]
    every = ["--max_grad_norm", 0.5, "--weight_decay", 0.1]
    return {
        "train_classifier": ["--model_name_or_path", bert, "--train_file", classifier, "--validation_file",
                             classifier_dev, "--learning_rate", "3e-3", "--per_device_eval_batch_size", 5, *every],
        "finetune_gpt2": ["--model_name_or_path", gpt2, "--train_file", text, "--validation_file", valid,
                          "--block_size", 32, "--learning_rate", "3e-3", "--per_device_eval_batch_size", 5,
                          "--max_new_tokens", 4, "--prompt", "the cat", *every],
        "pretrain_mlm": ["--train_file", text, "--validation_file", valid, *mlm_sizes, "--learning_rate", "1e-3",
                         "--per_device_eval_batch_size", 6, "--fill_mask_prompt", "the cat sat on the <mask> .",
                         *every],
    }  # fmt: skip


def script_argv(data, script, out, nproc, extra):
    argv = [*data[script], "--output_dir", out, "--num_train_epochs", 2]
    argv += ["--per_device_train_batch_size", GLOBAL_BATCH // (nproc * ACCUMULATION)]
    argv += ["--gradient_accumulation_steps", ACCUMULATION, "--logging_steps", 1]
    # A checkpoint at each epoch's last step (saves cost time on some engines): the kill comes right
    # after it.
    argv += ["--checkpointing_steps", STEPS_PER_EPOCH[script], "--keep_last", 3, "--save_every_minutes", 0, *extra]
    return argv


JOBS = {}  # engine -> what its job left: each job runs once, for the tests of its engine and the comparisons


PAIRS = [(engine, script) for engine, (_, _, _, scripts) in ENGINES.items() for script in scripts]


@pytest.fixture
def engine_run(request, data, tmp_path_factory):
    """What the job of the test's engine left (the job runs once, at its first test)."""
    return run_engine(request.node.callspec.params["engine"], data, tmp_path_factory)


def run_engine(engine, data, tmp_path_factory):
    """One job for the engine: each script uninterrupted, then killed at its first evaluation and
    run again."""
    if engine in JOBS:
        return JOBS[engine]
    nproc, switch, extra, scripts = ENGINES[engine]
    if switch == "deepspeed":
        pytest.importorskip("deepspeed")
    folder = tmp_path_factory.mktemp(f"engine-{engine}")
    runs = []
    for script in scripts:
        for name, kill in (("uninterrupted", False), ("killed", True), ("rerun", False)):
            out = folder / script / ("uninterrupted" if name == "uninterrupted" else "killed")
            run = {"script": script, "argv": script_argv(data, script, out, nproc, extra), "engine": switch}
            run |= {"kill_at_evaluation": kill, "zero_stage": engine[-1], "name": name, "out": str(out)}
            runs.append(run)
    if engine in ("fsdp2", "zero3"):
        # --eval_only: the whole model on each process (FSDP2 and DeepSpeed prepare a model only
        # with an optimizer; ZeRO-3 would split it as it loads)
        best = folder / "train_classifier" / "uninterrupted" / "best"
        argv = script_argv(data, "train_classifier", folder / "eval-only", nproc, ["--model_name_or_path", best])
        runs.append({"script": "train_classifier", "argv": argv + ["--eval_only"], "engine": switch, "name": "eval"})
        runs[-1]["zero_stage"] = engine[-1]
    if engine == "fsdp2":
        argv = script_argv(data, "pretrain_mlm", folder / "mlm", nproc, [])
        runs.append({"script": "pretrain_mlm", "argv": argv, "engine": switch, "name": "refused"})
    statuses = helpers.launch(runs, folder / "logs", nproc=nproc)
    print(engine, {r["name"] + " " + r["script"]: r["seconds"] for r in runs})
    JOBS[engine] = engine, {(r["script"], r["name"]): (r, status) for r, status in zip(runs, statuses)}
    return JOBS[engine]


def newest_state(out):
    newest = sorted((Path(out) / "checkpoints").glob("step_*"))[-1]
    return json.loads((newest / "training_state.json").read_text())["state"]


@pytest.mark.parametrize("engine, script", PAIRS)
def test_every_engine_resumes_a_kill_at_the_epoch_end_evaluation_exactly(engine, script, engine_run):
    _, runs = engine_run
    (full, full_status), (killed, killed_status), (rerun, rerun_status) = (
        runs[script, name] for name in ("uninterrupted", "killed", "rerun")
    )
    assert full_status == 0, helpers.log_of(full)[-3000:]
    assert killed_status == -9, helpers.log_of(killed)[-3000:]
    assert rerun_status == 0, helpers.log_of(rerun)[-3000:]
    steps_per_epoch = int(helpers.log_of(full).split(" per epoch)")[0].split("(")[-1])
    resumed = helpers.log_of(rerun).split("Resumed from ")[1].splitlines()[0]
    assert f"epoch 0, step {steps_per_epoch}, batch " in resumed, resumed  # the epoch's end, before evaluation

    a, b = newest_state(full["out"]), newest_state(rerun["out"])
    assert a["completed_steps"] == b["completed_steps"] == 2 * steps_per_epoch
    assert [e for e in b["log_history"] if "eval_loss" in e] == [e for e in a["log_history"] if "eval_loss" in e]
    learning_rates = [{e["step"]: e["learning_rate"] for e in s["log_history"] if "learning_rate" in e} for s in (a, b)]
    assert learning_rates[0] == learning_rates[1] and len(learning_rates[0]) == 2 * steps_per_epoch
    for name, (a, b) in {
        "final weights": (final_weights(full["out"]), final_weights(rerun["out"])),
        "best/": (best_weights(full["out"]), best_weights(rerun["out"])),
    }.items():
        assert a.keys() == b.keys(), name
        for key in a:
            if engine == "compile":  # kernels compiled for the shapes seen so far, which a resumed run sees in
                # another order: its sums round otherwise
                torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=f"{name} {key}")
            else:
                assert torch.equal(a[key], b[key]), (engine, name, key)


def best_weights(out):
    return load_file(Path(out) / "best" / "model.safetensors")


def final_weights(out):
    """The model's weights in the newest checkpoint, whole, read in this one process:
    model.safetensors, or the shards FSDP (torch.distributed.checkpoint) or DeepSpeed
    (zero_pp_rank_* files) wrote, gathered by their own tools."""
    newest = sorted((Path(out) / "checkpoints").glob("step_*"))[-1]
    if (newest / "model.safetensors").exists():
        return load_file(newest / "model.safetensors")
    if (newest / "pytorch_model_fsdp_0").exists():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(newest / "pytorch_model_fsdp_0", newest.parent / "gathered.pt")
        return torch.load(newest.parent / "gathered.pt", weights_only=True)["model"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(newest, tag="pytorch_model")


@pytest.mark.parametrize("engine, script", PAIRS)
def test_every_engine_exports_what_it_evaluated(engine, script, engine_run):
    _, runs = engine_run
    full, status = runs[script, "uninterrupted"]
    assert status == 0, helpers.log_of(full)[-3000:]
    out = Path(full["out"])
    reported = json.loads((out / "eval_results.json").read_text())  # best/'s evaluation
    argv = full["argv"]
    rescored = RESCORE[script](out / "best", Path(argv[argv.index("--validation_file") + 1]))
    tolerance = {"bf16": 2e-2, "compile": 1e-4}.get(engine, 1e-5)  # bf16 evaluated in bf16; fused kernels round
    assert rescored == pytest.approx(reported["loss"], rel=tolerance)


@torch.no_grad()
def classifier_loss(best, dev):
    import csv

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(best)
    model = AutoModelForSequenceClassification.from_pretrained(best).eval()
    losses = []
    for row in csv.DictReader(open(dev)):  # one example at a time: no padding, no batching
        logits = model(**tokenizer(row["text"], return_tensors="pt")).logits[0]
        losses.append(-torch.log_softmax(logits, -1)[model.config.label2id[row["label"]]].item())
    return sum(losses) / len(losses)


@torch.no_grad()
def mlm_loss(best, valid):
    return mlm_tests.hand_masked_lm_loss(best, valid)


RESCORE = {
    "train_classifier": classifier_loss,
    "finetune_gpt2": gpt2_tests.hand_mean_token_loss,
    "pretrain_mlm": mlm_loss,
}


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_eval_only_evaluates_the_whole_model(engine, data, tmp_path_factory):
    """--eval_only of best/ on two processes reports what the training run reported for it."""
    _, runs = run_engine(engine, data, tmp_path_factory)
    (evaluation, status), (full, _) = runs["train_classifier", "eval"], runs["train_classifier", "uninterrupted"]
    assert status == 0, helpers.log_of(evaluation)[-3000:]
    metrics = json.loads(
        (Path(evaluation["argv"][evaluation["argv"].index("--output_dir") + 1]) / "eval_results.json").read_text()
    )
    reported = json.loads((Path(full["out"]) / "eval_results.json").read_text())
    assert metrics["loss"] == pytest.approx(reported["loss"], rel=1e-5) and metrics["accuracy"] == reported["accuracy"]


def test_pretrain_mlm_refuses_fsdp2_in_one_line(data, tmp_path_factory):
    _, runs = run_engine("fsdp2", data, tmp_path_factory)
    refused, status = runs["pretrain_mlm", "refused"]
    assert status == 2
    errors = [line for line in helpers.log_of(refused).splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "FSDP2 cannot shard RoBERTa" in errors[0] and "Traceback" not in helpers.log_of(refused)
    assert not helpers.log_of(refused, rank=1).count("error: ")  # one line for the whole job


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_engine_learns_the_same_model(script, data, tmp_path_factory):
    """The engine changes how a model trains, not what it learns: the same learning rate at every
    step on each, and on two processes the same weights from DDP, FSDP2 and DeepSpeed ZeRO-2 and
    ZeRO-3 (the same data on each process, the same random streams), up to the order of
    floating-point sums."""
    jobs = {engine: run_engine(engine, data, tmp_path_factory)[1] for engine in ENGINES if script in ENGINES[engine][3]}
    learning_rates = {}
    for engine, runs in jobs.items():
        state = newest_state(runs[script, "uninterrupted"][0]["out"])
        learning_rates[engine] = [(e["step"], e["learning_rate"]) for e in state["log_history"] if "learning_rate" in e]
    reference_steps = [step for step, _ in learning_rates["one"]]
    for engine, rates in learning_rates.items():
        # Steps exactly, rates up to float rounding (pytest.approx takes flat sequences only).
        assert [step for step, _ in rates] == reference_steps, engine
        assert [rate for _, rate in rates] == pytest.approx([rate for _, rate in learning_rates["one"]]), engine
    reference = final_weights(jobs["ddp"][script, "uninterrupted"][0]["out"])
    for engine in ("fsdp2", "zero2", "zero3"):
        if engine in jobs:
            weights = final_weights(jobs[engine][script, "uninterrupted"][0]["out"])
            # Each engine's checkpoint names a tied weight (GPT-2's lm_head, RoBERTa's decoder) once
            # or twice.
            common = weights.keys() & reference.keys()
            assert len(common) >= len(reference) - 2, (engine, weights.keys() ^ reference.keys())
            for key in common:
                torch.testing.assert_close(weights[key], reference[key], rtol=1e-4, atol=1e-6, msg=f"{engine} {key}")


def test_fsdp2_skips_a_damaged_shard_and_refuses_another_process_count(data, tmp_path_factory, tmp_path):
    """FSDP2's checkpoints are folders of shards, each file recorded with its size: a save killed
    while it wrote a shard is skipped, the checkpoint before it used, and the run ends where it
    would have. Shards of two processes cannot be read by one: refused, saying why."""
    _, runs = run_engine("fsdp2", data, tmp_path_factory)
    full = Path(runs["finetune_gpt2", "uninterrupted"][0]["out"])
    newest, previous = sorted((full / "checkpoints").glob("step_*"))[-2:]
    files = {p.relative_to(newest).as_posix(): p.stat().st_size for p in newest.rglob("*") if p.is_file()}
    del files["training_state.json"]
    assert json.loads((newest / "training_state.json").read_text())["files"] == files
    shards = [name for name in files if name.startswith("pytorch_model_fsdp_0/") and name.endswith(".distcp")]
    assert len(shards) == 2  # one per process

    out = tmp_path / "damaged"
    shutil.copytree(full, out)
    with open(out / "checkpoints" / newest.name / shards[1], "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    damaged = {"script": "finetune_gpt2", "argv": script_argv(data, "finetune_gpt2", out, 2, []), "engine": "fsdp2"}
    assert helpers.launch([damaged], tmp_path / "logs", nproc=2) == [0]
    printed = helpers.log_of(damaged)
    assert f"skipping damaged checkpoint {out / 'checkpoints' / newest.name}" in printed
    assert f"Resumed from {out / 'checkpoints' / previous.name}" in printed
    assert torch.equal(*(best_weights(o)["transformer.h.0.attn.c_attn.weight"] for o in (out, full)))
    for key, weight in final_weights(out).items():
        assert torch.equal(weight, final_weights(full)[key]), key

    argv = script_argv(data, "finetune_gpt2", full, 1, ["--num_train_epochs", 3])
    one = {"script": "finetune_gpt2", "argv": argv, "engine": "fsdp2"}
    assert helpers.launch([one], tmp_path / "logs-one", nproc=1, distributed=True) == [2], helpers.log_of(one)[-3000:]
    assert "holds FSDP/DeepSpeed shards of 2 process(es)" in helpers.log_of(one)
