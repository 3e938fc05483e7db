"""The GPU check: what a CPU cannot show, in one command.

    python bench/gpu_check.py [--data ../shared/data]
    python bench/gpu_check.py --only precision,resume,compile,speed,fsdp,deepspeed   # some parts

On a machine with a CUDA GPU it runs, and prints as one table:

- precision: each script (tiny models built here, no download) in bf16 and in fp16 with loss
  scaling: trains (the loss falls), checkpoints (fp16 ones hold the scaler), exports;
- resume: each script killed with SIGKILL after a random checkpoint and run again, with
  deterministic algorithms, against the same run uninterrupted: the final weights must be identical
  to the bit;
- precision also says what --mixed_precision auto chose for this GPU's compute capability (fp16
  before 8.0: on a T4 or V100 this row is the pre-Ampere check);
- compile: finetune_gpt2.py --torch_compile: best/ re-scored on the CPU to the reported loss;
- speed: GPT-2 124M (GPT2Config(), random weights: no download) on packed blocks of 1024 tokens,
  bf16, with and without --torch_compile: tokens/s, MFU and peak memory;
- fsdp, deepspeed: finetune_gpt2.py under `accelerate launch --config_file configs/fsdp.yaml` (and
  configs/deepspeed_zero2.yaml and deepspeed_zero3.yaml when DeepSpeed is installed) on one GPU: the
  export gathered from the shards scores what the sharded model scored, the demo runs after the
  processes end (ZeRO-3), and a run SIGKILLed after a random checkpoint resumes with the
  uninterrupted run's learning rate at every step.

On a machine without a CUDA GPU it says so and exits 0. Text for the speed runs comes from --data
(WikiText-2 as in ../shared/data) or, without it, is made up here."""

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, set before CUDA starts
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402

# Runs a script with deterministic algorithms: `python -c DETERMINISTIC script.py args...`
DETERMINISTIC = (
    "import runpy, sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def run(command, timeout=600, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **kwargs.pop("env", {}))
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


def script(name, *args, deterministic=True):
    prefix = [sys.executable, "-c", DETERMINISTIC] if deterministic else [sys.executable]
    return [*prefix, str(REPO / name), *map(str, args)]


def last_line(proc):
    lines = (proc.stderr or proc.stdout or "?").strip().splitlines()
    return lines[-1][:300] if lines else "?"


def newest_checkpoint(out):
    return sorted((Path(out) / "checkpoints").glob("step_*"))[-1]


def setups(work):
    """Tiny models and text for the three scripts, and each script's arguments."""
    import helpers
    import test_finetune_gpt2 as gpt2_tests

    lines = gpt2_tests.repetitive_lines(600, seed=1)
    (work / "train.txt").write_text("\n".join(lines) + "\n")
    (work / "valid.txt").write_text("\n".join(gpt2_tests.repetitive_lines(80, seed=2)) + "\n")
    train_csv = helpers.write_csv(work / "train.csv", helpers.toy_rows(400, seed=1))
    dev_csv = helpers.write_csv(work / "dev.csv", helpers.toy_rows(60, seed=2))
    bert = helpers.make_tiny_bert(work / "bert")
    gpt2 = gpt2_tests.make_tiny_gpt2(work / "gpt2", lines)
    common = ["--save_every_minutes", 0, "--checkpointing_steps", 3, "--logging_steps", 3]
    # fmt: off
    return {
        "train_classifier.py": [
            "--model_name_or_path", bert, "--train_file", train_csv, "--validation_file", dev_csv,
            "--learning_rate", "3e-3", "--per_device_train_batch_size", 16, "--num_train_epochs", 3, *common,
        ],
        "finetune_gpt2.py": [
            "--model_name_or_path", gpt2, "--train_file", work / "train.txt", "--validation_file", work / "valid.txt",
            "--block_size", 32, "--learning_rate", "3e-3", "--per_device_train_batch_size", 8, "--num_train_epochs", 2,
            "--max_new_tokens", 8, "--prompt", "the cat", *common,
        ],
        "pretrain_mlm.py": [
            "--train_file", work / "train.txt", "--validation_file", work / "valid.txt", "--vocab_size", 300,
            "--max_seq_length", 32, "--max_position_embeddings", 34, "--num_hidden_layers", 2, "--hidden_size", 64,
            "--num_attention_heads", 2, "--intermediate_size", 128, "--learning_rate", "1e-3",
            "--per_device_train_batch_size", 8, "--num_train_epochs", 2, "--fill_mask_prompt",
            "the cat sat on the <mask> .", *common,
        ],
    }
    # fmt: on


def check_precision(work, args):
    rows = []
    for precision in ("bf16", "fp16"):
        for name, base in args.items():
            out = work / f"{precision}-{name}"
            proc = run(script(name, *base, "--output_dir", out, "--mixed_precision", precision))
            if proc.returncode != 0:
                rows.append((f"{name} {precision}", "FAILED", last_line(proc)))
                continue
            history = json.loads((out / "log_history.json").read_text())
            losses = [e["train_loss"] for e in history if "train_loss" in e]
            evals = {k: v for k, v in history[-1].items() if k.startswith("eval_")}
            scaler = (newest_checkpoint(out) / "scaler.pt").exists()
            ok = losses[-1] < losses[0] and f"mixed precision: {precision}" in proc.stdout
            ok = ok and scaler == (precision == "fp16") and (out / "best" / "model.safetensors").exists()
            detail = f"train loss {losses[0]:.3f} -> {losses[-1]:.3f}; " + ", ".join(
                f"{k[5:]} {v:.4f}" for k, v in evals.items()
            )
            rows.append(
                (f"{name} {precision}", "ok" if ok else "FAILED", detail + ("; scaler saved" if scaler else ""))
            )
    return rows


def check_resume(work, args):
    rows = []
    for name, precision in (("train_classifier.py", "fp16"), ("finetune_gpt2.py", "bf16"), ("pretrain_mlm.py", "bf16")):
        base = [*args[name], "--mixed_precision", precision]
        full, killed = work / f"full-{name}", work / f"killed-{name}"
        done = run(script(name, *base, "--output_dir", full))
        total = json.loads((newest_checkpoint(full) / "training_state.json").read_text())["state"]["completed_steps"]
        target = random.randint(3, total - 3)
        proc = subprocess.Popen(
            script(name, *base, "--output_dir", killed), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            saved = (
                [int(p.name.split("_")[1]) for p in (killed / "checkpoints").glob("step_*")] if killed.exists() else []
            )
            if any(s >= target for s in saved):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait()
        resumed = run(script(name, *base, "--output_dir", killed))
        a, b = (newest_checkpoint(o) / "model.safetensors" for o in (full, killed))
        same = done.returncode == 0 and resumed.returncode == 0 and a.read_bytes() == b.read_bytes()
        where = re.search(r"Resumed from .*?: (epoch \d+, step \d+)", resumed.stdout)
        detail = f"killed after step >= {target} of {total}; resumed at {where.group(1) if where else '?'}"
        rows.append((f"{name} {precision} SIGKILL + rerun", "identical" if same else "DIFFERENT", detail))
    return rows


def gpt2_124m(work, data):
    """GPT-2 124M with random weights and a byte-level BPE trained on the text here."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    texts = [p for p in (data / "wikitext-2-raw" / "wiki.test.raw", data / "wikitext-2" / "valid.txt") if p.exists()]
    if texts:
        text = "".join(p.read_text() for p in texts)
    else:  # made-up text: throughput does not depend on what the words are
        rng = random.Random(0)
        words = [f"word{i}" for i in range(5000)]
        text = "\n".join(" ".join(rng.choices(words, k=rng.randint(5, 60))) for _ in range(40_000))
    (work / "text.txt").write_text(text)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text.splitlines(), vocab_size=16_000, special_tokens=["<|endoftext|>"])
    end = "<|endoftext|>"
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=end, bos_token=end, unk_token=end)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())  # 124M: 12 layers x 768, vocabulary 50,257, 1024 positions
    model.save_pretrained(work / "gpt2-124m")
    tokenizer.save_pretrained(work / "gpt2-124m")
    return work / "gpt2-124m", work / "text.txt"


def check_speed(work, data):
    model, text = gpt2_124m(work, data)
    rows = []
    for compiled in (False, True):
        out = work / f"speed-{compiled}"
        args = ["--model_name_or_path", model, "--train_file", text, "--output_dir", out, "--block_size", 1024]
        args += ["--per_device_train_batch_size", 16, "--max_train_steps", 120, "--logging_steps", 10]
        args += [
            "--save_every_minutes",
            0,
            "--max_new_tokens",
            0,
            "--mixed_precision",
            "bf16",
            "--learning_rate",
            "6e-4",
        ]
        args += ["--max_eval_samples", 32] + (["--torch_compile"] if compiled else [])
        started = time.perf_counter()
        proc = run(script("finetune_gpt2.py", *args, deterministic=False), timeout=900)
        seconds = time.perf_counter() - started
        label = "GPT-2 124M, bf16, 16 x 1024" + (", --torch_compile" if compiled else "")
        if proc.returncode != 0:
            rows.append((label, "FAILED", last_line(proc)))
            continue
        history = json.loads((out / "log_history.json").read_text())
        windows = [e for e in history if "tokens_per_second" in e][2:]  # the first windows warm up (and compile)
        tps = statistics.median(e["tokens_per_second"] for e in windows)
        mfu = statistics.median(e["mfu"] for e in windows) if "mfu" in windows[0] else None
        peak = re.search(r"Peak GPU memory: ([\d.]+) GiB", proc.stdout)
        detail = f"{tps:,.0f} tokens/s" + (f", MFU {100 * mfu:.1f}%" if mfu else ", MFU n/a (unknown GPU peak)")
        detail += f", peak memory {peak.group(1) if peak else '?'} GiB, whole run {seconds:.0f} s"
        rows.append((label, "ok", detail))
    return rows


def check_precision_choice():
    """--mixed_precision auto on this GPU: bf16 from compute capability 8.0 on, fp16 with loss
    scaling before (T4, V100), whatever torch.cuda.is_bf16_supported() says (it counts
    emulation)."""
    import common

    capability = torch.cuda.get_device_capability()
    chosen = common.choose_mixed_precision("auto")
    expected = "bf16" if capability >= (8, 0) else "fp16"
    detail = f"compute capability {capability[0]}.{capability[1]}: {chosen}; is_bf16_supported() says "
    detail += f"{torch.cuda.is_bf16_supported()}"
    return [("--mixed_precision auto", "ok" if chosen == expected else "FAILED", detail)]


def check_compile_export(work, args):
    """--torch_compile: best/ holds the trained weights under their own names (not
    _orig_mod.<name>), so loaded alone on the CPU it scores what the compiled run reported
    (within bf16's rounding)."""
    import test_finetune_gpt2 as gpt2_tests

    out = work / "compiled-export"
    proc = run(script("finetune_gpt2.py", *args["finetune_gpt2.py"], "--output_dir", out, "--torch_compile"))
    label = "finetune_gpt2.py --torch_compile: export re-scored"
    if proc.returncode != 0:
        return [(label, "FAILED", last_line(proc))]
    reported = json.loads((out / "eval_results.json").read_text())["loss"]
    by_hand = gpt2_tests.hand_mean_token_loss(out / "best", work / "valid.txt")
    ok = abs(by_hand - reported) < 2e-2 * reported
    return [(label, "ok" if ok else "FAILED", f"eval loss {reported:.5f}; best/ re-scored on the CPU: {by_hand:.5f}")]


def check_sharded(work, args, config, label):
    """finetune_gpt2.py under an accelerate config on one GPU: the export gathered and re-scored,
    the demo at the end (under ZeRO-3 it loads best/ after the processes have ended), and a run
    SIGKILLed after a random checkpoint then started again: the learning rate at every step and
    the evaluations as the uninterrupted run's."""
    import test_finetune_gpt2 as gpt2_tests

    out, killed = work / f"sharded-{label}", work / f"sharded-{label}-killed"
    base = [*args["finetune_gpt2.py"], "--mixed_precision", "no"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / config)]
    launch += ["--num_processes", "1", str(REPO / "finetune_gpt2.py")]
    name = f"{label} (configs/{config}), 1 GPU"
    first = run([*launch, *map(str, [*base, "--output_dir", out])])
    if first.returncode != 0:
        return [(name, "FAILED", last_line(first))]
    reported = json.loads((out / "eval_results.json").read_text())["loss"]
    by_hand = gpt2_tests.hand_mean_token_loss(out / "best", work / "valid.txt")
    files = json.loads((newest_checkpoint(out) / "training_state.json").read_text())["files"]
    nested = sorted({name.split("/")[0] for name in files if "/" in name})
    demo = (out / "samples.txt").exists()
    demo_detail = "samples.txt written" if demo else last_line(first)
    rows = [
        (f"{name}: export", "ok" if abs(by_hand - reported) < 1e-3 * reported else "FAILED",  # TF32 on the GPU
         f"eval loss {reported:.5f}; the export, re-scored on the CPU: {by_hand:.5f}; shard folders {nested}"),
        (f"{name}: demo after the run", "ok" if demo else "FAILED", demo_detail),
    ]  # fmt: skip

    def history(folder):
        return json.loads((newest_checkpoint(folder) / "training_state.json").read_text())["state"]["log_history"]

    total = max(e["step"] for e in history(out))
    target = random.randint(3, total - 3)
    proc = subprocess.Popen([*launch, *map(str, [*base, "--output_dir", killed])], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        saved = [int(p.name.split("_")[1]) for p in (killed / "checkpoints").glob("step_*")] if killed.exists() else []
        if any(s >= target for s in saved):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    again = run([*launch, *map(str, [*base, "--output_dir", killed])])
    if again.returncode != 0 or "Resumed from" not in again.stdout:
        return rows + [(f"{name}: SIGKILL + rerun", "FAILED", last_line(again))]
    a, b = history(out), history(killed)
    rates = [{e["step"]: e["learning_rate"] for e in h if "learning_rate" in e} for h in (a, b)]
    evals = [[e["eval_loss"] for e in h if "eval_loss" in e] for h in (a, b)]
    same = (
        rates[0] == rates[1] and all(abs(x - y) < 1e-3 * x for x, y in zip(*evals)) and len(evals[0]) == len(evals[1])
    )
    detail = f"killed after step >= {target} of {total}; learning rate at every step "
    detail += "the same" if rates[0] == rates[1] else "DIFFERENT"
    detail += f"; eval losses {evals[1]} vs {evals[0]}"
    return rows + [(f"{name}: SIGKILL + rerun", "ok" if same else "FAILED", detail)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # Public data beside the clone, not in it; where to get it: docs/speed.md#the-benchmarks-data
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--only", default="precision,resume,compile,speed,fsdp,deepspeed")
    parser.add_argument("--json", type=Path, help="also write the table here")
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        print("The GPU check needs a CUDA GPU; this machine has none. Run it on one: python bench/gpu_check.py")
        return 0
    only = opts.only.split(",")
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}; work in {work}", flush=True)
    args = setups(work)
    rows = []
    for name, check in (
        ("precision", lambda: check_precision_choice() + check_precision(work, args)),
        ("resume", lambda: check_resume(work, args)),
        ("compile", lambda: check_compile_export(work, args)),
        ("speed", lambda: check_speed(work, opts.data)),
        ("fsdp", lambda: check_sharded(work, args, "fsdp.yaml", "FSDP2")),
        ("deepspeed", lambda: deepspeed_rows(work, args)),
    ):
        if name in only:
            started = time.perf_counter()
            new = check()
            rows += new
            for row in new:
                print(" | ".join(row), flush=True)
            print(f"({name}: {time.perf_counter() - started:.0f} s)", flush=True)
    print("\n| check | result | details |\n|---|---|---|")
    for row in rows:
        print(f"| {' | '.join(row)} |")
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(r[1] in ("ok", "identical", "skipped") for r in rows) else 1


def deepspeed_rows(work, args):
    try:
        import deepspeed  # noqa: F401
    except Exception as err:  # not installed, or it cannot start here
        return [("DeepSpeed (configs/deepspeed_zero*.yaml)", "skipped", f"deepspeed not usable: {err}"[:200])]
    rows = check_sharded(work, args, "deepspeed_zero2.yaml", "DeepSpeed ZeRO-2")
    return rows + check_sharded(work, args, "deepspeed_zero3.yaml", "DeepSpeed ZeRO-3")


if __name__ == "__main__":
    sys.exit(main())
