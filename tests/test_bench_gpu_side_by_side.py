"""bench/bench_gpu_side_by_side.py on the CPU: a tiny GPT-2, text written here, a few steps.
Every row must do the same work and report it; the speed targets need a GPU (see the bench)."""

import json
import math
import random
import subprocess
import sys

from helpers import REPO, offline_env

ROWS = ["ours", "trainer", "minimal"]  # the compiled rows need minutes of compiling on a CPU


def short_story(n, seed):
    rng = random.Random(seed)
    subjects, verbs = ["the cat", "a dog", "my bird", "the fox"], ["sat on", "ran to", "looked at", "slept near"]
    places = ["the mat .", "the house .", "a tree .", "the old wall ."]
    return "\n".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(places)}" for _ in range(n)) + "\n"


def test_every_row_trains_the_same_model_on_the_same_data(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(short_story(300, seed=1))
    results = tmp_path / "results.json"
    command = [sys.executable, str(REPO / "bench" / "bench_gpu_side_by_side.py"), "--data", text, "--model", "tiny"]
    command += ["--block_size", 32, "--batch_size", 4, "--steps", 6, "--logging_steps", 2, "--warmup_steps", 2]
    command += ["--rows", ",".join(ROWS), "--work", tmp_path / "work", "--json", results]
    env = offline_env(CUDA_VISIBLE_DEVICES="")  # a CPU run even where a GPU is
    proc = subprocess.run([str(c) for c in command], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads(results.read_text())
    rows = report["rows"]
    assert list(rows) == ROWS
    assert report["settings"]["precision"] == "no"  # fp32 on a CPU
    for name, row in rows.items():
        assert row["steps"] == 6, name  # each trained every step, and no more
        assert row["tokens_per_second"] > 0, name
        assert row["mfu"] is None, name  # no known peak for a CPU
        assert row["peak_memory_gib"] > 0, name
        assert math.isfinite(row["last_loss"]), name
    # One model at one block size: one FLOPs count. The same data and start: losses alike.
    assert len({row["flops_per_token"] for row in rows.values()}) == 1
    losses = [row["last_loss"] for row in rows.values()]
    assert max(losses) < 1.5 * min(losses), losses

    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    header, body = table[0].split(" | "), table[1:]
    assert [line.split(" | ")[0].strip("| ") for line in body] == ROWS
    for line in body:
        assert line.split(" | ")[header.index("MFU")] == "n/a"
