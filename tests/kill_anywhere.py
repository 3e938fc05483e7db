"""Kill each script many times at random moments, re-running the same command after each kill, and
check that the run ends where an uninterrupted run ends: the same best/ weights (to the bit, on a
CPU), the same metrics, the same final checkpoint step.

    python tests/kill_anywhere.py --kills 30                 # every script, 30 kills each
    python tests/kill_anywhere.py --scripts finetune_gpt2 --kills 10 --seed 7

The moments are drawn (seeded: the seed replays a failure) uniformly over an uninterrupted run's
duration after its imports (one in ten during them), so they fall where a run spends its time:
starting, tokenizing, training steps, checkpoints being written, the epoch-end evaluations, the
export, the demo at the end. The
validation data is larger than the training data, so the last evaluation is long enough to be hit.
Each kill's moment is reported by the last line the run printed; a run that ends otherwise, by
each tensor that differs and how much. CI runs a few kills of each script after the suite
(.ci/run); tests/test_kill_anywhere.py makes the kill during the last evaluation on purpose."""

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the scripts, when run as a script
sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers
import helpers  # noqa: E402

SCRIPTS = ("train_classifier", "finetune_gpt2", "pretrain_mlm")
STEPS = ["--num_train_epochs", 2, "--checkpointing_steps", 3, "--save_every_minutes", 0, "--logging_steps", 2]


def job(script, folder, eval_rows=400):
    """The command line (without --output_dir) of a small run of `script`, with its tiny model and
    data written into `folder`; `eval_rows` validation rows or lines (the suite takes fewer)."""
    folder.mkdir(parents=True, exist_ok=True)
    if script == "train_classifier":
        model = helpers.make_tiny_bert(folder / "bert")
        train = helpers.write_csv(folder / "train.csv", helpers.toy_rows(96, seed=1))
        dev = helpers.write_csv(folder / "dev.csv", helpers.toy_rows(eval_rows, seed=2))
        test = helpers.write_csv(folder / "test.csv", [{"text": r["text"]} for r in helpers.toy_rows(40, seed=3)])
        data = ["--model_name_or_path", model, "--train_file", train, "--validation_file", dev, "--test_file", test]
        sizes = ["--per_device_train_batch_size", 16, "--per_device_eval_batch_size", 4, "--learning_rate", "3e-3"]
        return data + sizes + STEPS
    from test_finetune_gpt2 import make_tiny_gpt2, repetitive_lines

    (folder / "train.txt").write_text("\n".join(repetitive_lines(120, seed=1)) + "\n")
    (folder / "valid.txt").write_text("\n".join(repetitive_lines(eval_rows, seed=2)) + "\n")
    data = ["--train_file", folder / "train.txt", "--validation_file", folder / "valid.txt"]
    sizes = ["--per_device_train_batch_size", 8, "--per_device_eval_batch_size", 2, "--learning_rate", "2e-3"]
    if script == "finetune_gpt2":
        lines = (folder / "train.txt").read_text().splitlines()
        model = make_tiny_gpt2(folder / "gpt2", lines)
        demo = ["--max_new_tokens", 8, "--prompt", "the cat"]
        return ["--model_name_or_path", model, "--block_size", 16, *data, *sizes, *demo, *STEPS]
    model = ["--vocab_size", 300, "--max_seq_length", 16, "--max_position_embeddings", 18, "--num_hidden_layers", 1]
    model += ["--hidden_size", 32, "--num_attention_heads", 2, "--intermediate_size", 64]
    return [*data, *model, *sizes, "--fill_mask_prompt", "the cat sat on the <mask> .", *STEPS]


def run(script, argv, log, kill_after=None):
    """The script once, its output into `log`; killed with SIGKILL after `kill_after` seconds if
    it is still running. Returns (exit code, or "killed"; seconds; seconds until it first printed,
    which is Python importing torch and transformers)."""
    started, printed = time.monotonic(), None
    with open(log, "w") as out:
        proc = subprocess.Popen(
            helpers.script_command(f"{script}.py", *argv), cwd=helpers.REPO, env=helpers.offline_env(),
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        while proc.poll() is None:
            seconds = time.monotonic() - started
            if kill_after is not None and seconds >= kill_after:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return "killed", seconds, printed
            if printed is None and Path(log).stat().st_size:
                printed = seconds
            time.sleep(0.02)
    return proc.returncode, time.monotonic() - started, printed


def last_line(log):
    """What the run was doing when it was killed: the last line it printed (progress bars
    redraw themselves after a carriage return)."""
    lines = [line for line in Path(log).read_text(errors="replace").replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1].strip()[:100] if lines else "(nothing printed yet)"


def outcome(out):
    """What a run ended with: best/'s weights and the newest checkpoint's, the metrics, the
    newest checkpoint's step, and what a script makes besides (GPT-2's sample, the MLM's
    tokenizer)."""
    state = json.loads((newest_checkpoint(out) / "training_state.json").read_text())["state"]
    ended = {
        "best": sha256(model_file(out, "best")),
        "final": sha256(model_file(out, "final")),
        "metrics": json.loads((out / "eval_results.json").read_text()),
        "step": state["completed_steps"],
        "evaluated_step": state.get("evaluated_step"),
    }
    for made in ("samples.txt", "tokenizer.json"):
        if (out / made).exists():
            ended[made] = sha256(out / made)
    return ended


def weights_differ(whole, out):
    """The largest difference of each tensor that differs between best/ and the newest checkpoint
    of two runs: a bug moves many weights, last bits of a matrix product a few, by little."""
    from safetensors.torch import load_file

    differ = {}
    for name in ("best", "final"):
        a, b = (load_file(model_file(run, name)) for run in (whole, out))
        for key in sorted(a.keys() | b.keys()):
            if key not in a or key not in b or a[key].shape != b[key].shape:
                differ[f"{name}/{key}"] = "missing or reshaped"
            elif not a[key].equal(b[key]):
                differ[f"{name}/{key}"] = f"{(a[key].double() - b[key].double()).abs().max().item():.3g}"
    return differ


def model_file(out, which):
    """best/'s weights, or ("final") the newest checkpoint's."""
    return (out / "best" if which == "best" else newest_checkpoint(out)) / "model.safetensors"


def newest_checkpoint(out):
    return sorted((out / "checkpoints").glob("step_*"))[-1]


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def check(script, folder, kills, seed, eval_rows=400):
    """An uninterrupted run of `script`, then the same command killed `kills` times at random
    moments, each kill followed by the same command again. A run that ends before its kill is
    compared with the uninterrupted one, and the next kills start a new run in a new folder (so
    they fall in runs with work left, not in re-runs of a finished one); after the last kill the
    run goes on to its end and is compared too. A report says whether every one ended alike."""
    folder = Path(folder)
    argv = job(script, folder / "data", eval_rows)
    whole = folder / "whole"
    code, seconds, importing = run(script, [*argv, "--output_dir", whole], folder / "whole.log")
    assert code == 0, Path(folder / "whole.log").read_text()[-3000:]
    expected, endings = outcome(whole), []
    rng = random.Random(f"{seed}-{script}")
    out, moments = folder / "killed-0", []
    for i in range(kills + 1):
        log = folder / f"kill{i}.log"
        # Most of a small run is Python importing its libraries, where a kill changes nothing:
        # one kill in ten falls there, the others after it. (After the last kill: to the end.)
        moment = rng.uniform(0, importing) if rng.random() < 0.1 else rng.uniform(importing, seconds)
        code, _, _ = run(script, [*argv, "--output_dir", out], log, kill_after=moment if i < kills else None)
        if code not in ("killed", 0):
            raise AssertionError(f"{script}, seed {seed}: run {i} failed ({code}):\n{log.read_text()[-3000:]}")
        if code == "killed":
            moments.append(last_line(log))
            continue
        endings.append(outcome(out))  # this run ended: compared, and the next kills hit a new one
        if endings[-1] != expected:  # kept in the report: which weights differ, and by how much
            endings[-1]["weights_differ"] = weights_differ(whole, out)
        out = folder / f"killed-{len(endings)}"
        if i < kills:
            moments.append("(ended before the kill)")
    report = {"script": script, "seed": seed, "kills": kills, "seconds": round(seconds, 1), "moments": moments}
    differ = [ending for ending in endings if ending != expected]
    report |= {"runs": len(endings), "same": not differ, "uninterrupted": expected}
    return report | {"differ": differ}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=30, help="kills per script")
    parser.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    parser.add_argument("--scripts", nargs="+", default=SCRIPTS, choices=SCRIPTS)
    args = parser.parse_args()
    # Tests' settings: offline, and a datasets cache (token files) of this check's own.
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="kill-anywhere-cache-")
    failed = 0
    for script in args.scripts:
        with tempfile.TemporaryDirectory(prefix=f"kill-{script}-") as folder:
            report = check(script, folder, args.kills, args.seed)
        for i, moment in enumerate(report.pop("moments")):
            print(f"{script} kill {i:2d}: {moment}")
        print(json.dumps(report))
        failed += not report["same"]
    print(f"{len(args.scripts) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
