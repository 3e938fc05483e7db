"""Memory and time against corpus size, for the two language-model scripts.

    python bench/bench_data_scale.py [--sizes 10,100,400] [--scripts finetune_gpt2,pretrain_mlm]
    python bench/bench_data_scale.py --repo PATH   # another checkout's scripts (before a change)

Builds plain English text of each size (MB) from ../shared/data (tiny Shakespeare, WikiText-2 raw,
WikiText-2, two books), repeated until it is that large, and a small model for it, then runs each
script on it in a process of its own with `--max_train_steps 2`, as a user would, measuring:

- peak memory: the most resident memory of the script and its worker processes together (PSS, see
  PeakMemory), and the most of it that is anonymous: PSS counts the pages of memory-mapped files
  (the Arrow text, the token file) that a process has read, which the kernel drops when memory
  runs short; anonymous memory (Python objects, tensors) it can only swap;
- preprocessing: seconds and MB/s as the script reports them (its "Tokenized the training text"
  line), and the tokens;
- the whole run's seconds.

--memory_limit_gb runs each script inside a memory limit (a Linux cgroup-v1 memory group, as
root; a container such as Colab's limits memory the same way): the kernel then reclaims the
file-backed pages first, and a run that truly needs more is killed, which the row says.

The 100 MB job also runs with one and with two preprocessing workers, and again with more steps
after it has finished (the tokens are reused: the seconds until training starts). Each run gets a
datasets cache of its own, so nothing is reused between runs but where the bench says so.

Models: finetune_gpt2.py, a GPT-2 of 4 layers x 256 with a 16k byte-level BPE trained on the
shared text (about 0.22 tokens per byte, near GPT-2's own); pretrain_mlm.py trains its own 8k
tokenizer on the text and a RoBERTa of 2 layers x 128. --repo runs another checkout's scripts (to
measure before a change), with the same data and models."""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
# Public data beside the clone, not in it; where to get it: docs/speed.md#the-benchmarks-data
DATA = REPO.parent / "shared" / "data"
SOURCES = [
    "shakespeare/input.txt",
    "wikitext-2-raw/wiki.test.raw",
    "wikitext-2/valid.txt",
    "wikitext-2/test.txt",
    "books/pride_and_prejudice.txt",
    "books/grimm_tales.txt",
]


def build_text(path, megabytes):
    """The shared texts, one after the other, repeated until the file holds `megabytes` MB."""
    sources = [(DATA / name).read_text(encoding="utf-8") for name in SOURCES]
    size, target = 0, megabytes * 1_000_000
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            for text in sources:
                f.write(text)
                size += len(text.encode())
                if size >= target:
                    break
    return path


def build_gpt2(path):
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    from test_finetune_gpt2 import make_tiny_gpt2

    lines = [line for name in SOURCES for line in (DATA / name).read_text(encoding="utf-8").splitlines()]
    return make_tiny_gpt2(path, lines, vocab_size=16_000, min_frequency=2, n_positions=1024, n_embd=256, n_layer=4,
                          n_head=4)  # fmt: skip


class PeakMemory:
    """The most memory a process and its children held together, sampled every 0.2 s in a thread:
    the sum of their proportional set sizes (PSS: resident memory, with pages that forked workers
    share with their parent counted once, not once per process; for one process it is its RSS),
    and the sum of its anonymous part (Pss_Anon in /proc/PID/smaps_rollup: not backed by a file)."""

    def __init__(self, pid):
        self.process, self.peak, self.peak_anonymous = psutil.Process(pid), 0, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self):
        while not self.done.wait(0.2):
            total, anonymous = 0, 0
            for process in [self.process, *self.process.children(recursive=True)]:
                try:
                    fields = Path(f"/proc/{process.pid}/smaps_rollup").read_text().split("\n")[1:]
                except OSError:  # a worker that just ended
                    continue
                kilobytes = {line.split(":")[0]: int(line.split()[1]) for line in fields if line}
                total += kilobytes["Pss"] * 1024
                anonymous += kilobytes["Pss_Anon"] * 1024
            self.peak = max(self.peak, total)
            self.peak_anonymous = max(self.peak_anonymous, anonymous)

    def stop(self):
        self.done.set()
        self.thread.join()
        return self.peak, self.peak_anonymous


def memory_group(limit_gb):
    """A cgroup-v1 memory group limited to `limit_gb`, for a child to join (None: no limit)."""
    if not limit_gb:
        return None
    group = Path(f"/sys/fs/cgroup/memory/bench-data-scale-{os.getpid()}")
    group.mkdir(exist_ok=True)
    (group / "memory.limit_in_bytes").write_text(str(int(limit_gb * 1e9)))
    return group


def run(repo, script, args, cache, log, limit_gb=None):
    """Run a script in its own process; (seconds, (peak bytes, peak anonymous bytes), its output,
    seconds until training started). Under a memory limit, a run that is killed for memory
    returns its output ending with "KILLED for memory"."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(cache))
    env["PYTHONUNBUFFERED"] = "1"
    group = memory_group(limit_gb)

    def join_group():  # in the child, before the script starts
        (group / "cgroup.procs").write_text(str(os.getpid()))

    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(repo / f"{script}.py"), *map(str, args)], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=join_group if group else None)  # fmt: skip
    memory = PeakMemory(proc.pid)
    output, training_started = [], None
    for line in proc.stdout:
        output.append(line)
        if training_started is None and line.startswith("Training for"):
            training_started = time.perf_counter() - started
    proc.wait()
    peak, seconds = memory.stop(), time.perf_counter() - started
    text = "".join(output)
    Path(log).write_text(text)
    if group:
        group.rmdir()
        if proc.returncode == -9:
            return seconds, peak, text + "KILLED for memory", training_started
    if proc.returncode != 0:
        raise SystemExit(f"{script} failed ({proc.returncode}), see {log}:\n{text[-2000:]}")
    return seconds, peak, text, training_started


def preprocessing(output):
    """The script's own report of tokenizing the training text: (tokens, seconds, MB/s), or
    Nones."""
    found = re.search(
        r"Tokenized the training text: ([\d,]+) tokens from [\d.,]+ MB in ([\d.]+) s \(([\d.]+) MB/s", output
    )
    if not found:
        return None, None, None
    return int(found.group(1).replace(",", "")), float(found.group(2)), float(found.group(3))


def script_args(script, text, out, model, workers, steps=2):
    args = ["--train_file", text, "--output_dir", out, "--max_train_steps", steps, "--save_every_minutes", 0]
    args += ["--per_device_train_batch_size", 8, "--validation_split_percentage", 1, "--max_eval_samples", 64]
    args += ["--per_device_eval_batch_size", 16] + (["--preprocessing_num_workers", workers] if workers else [])
    if script == "finetune_gpt2":
        return args + ["--model_name_or_path", model, "--block_size", 128, "--max_new_tokens", 0]
    sizes = ["--vocab_size", 8000, "--num_hidden_layers", 2, "--hidden_size", 128, "--num_attention_heads", 2]
    return args + sizes + ["--intermediate_size", 512, "--max_seq_length", 128]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,100,400", help="MB of text, comma-separated")
    parser.add_argument("--scripts", default="finetune_gpt2,pretrain_mlm")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose scripts run")
    parser.add_argument("--work", type=Path, help="keep the texts and outputs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--memory_limit_gb", type=float, help="run each script inside this memory limit")
    opts = parser.parse_args()
    work = opts.work or Path(tempfile.mkdtemp(prefix="data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    model = build_gpt2(work / "gpt2")
    supports_workers = "preprocessing_num_workers" in (opts.repo / "common.py").read_text()
    rows = []

    def measure(script, size, text, label, workers=None, steps=2, out=None, cache=None):
        out = out or work / f"out-{script}-{size}-{label}"
        cache = cache or work / f"cache-{script}-{size}-{label}"
        if out.exists() and steps == 2:
            shutil.rmtree(out)
        args = script_args(script, text, out, model, workers if supports_workers else None, steps)
        log = work / f"{out.name}-{steps}.log"
        seconds, peak, output, started = run(opts.repo, script, args, cache, log, opts.memory_limit_gb)
        if opts.memory_limit_gb:
            label += f", limit {opts.memory_limit_gb} GB" + (": KILLED" if output.endswith("KILLED for memory") else "")
        tokens, prep_seconds, speed = preprocessing(output)
        row = {"script": script, "MB": size, "run": label, "tokens": tokens, "peak_GB": round(peak[0] / 1e9, 2),
               "peak_anonymous_GB": round(peak[1] / 1e9, 2),
               "preprocessing_s": prep_seconds, "MB_per_s": speed, "whole_run_s": round(seconds, 1),
               "training_starts_after_s": round(started, 1) if started else None}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        return out, cache

    for size in [int(s) for s in opts.sizes.split(",")]:
        text = work / f"text-{size}MB.txt"
        if not text.exists():
            build_text(text, size)
        for script in opts.scripts.split(","):
            if size == 100 and supports_workers:
                measure(script, size, text, "1 worker", workers=1)
                out, cache = measure(script, size, text, "2 workers", workers=2)
                measure(script, size, text, "re-run, 4 steps", workers=2, steps=4, out=out, cache=cache)
            else:
                measure(script, size, text, "default")
    header = ["script", "text MB", "run", "tokens", "peak memory GB", "of it anonymous GB", "preprocessing s"]
    print("\n| " + " | ".join([*header, "MB/s", "whole run s", "training starts after s"]) + " |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tokens = f"{r['tokens']:,}" if r["tokens"] else ""
        cells = [r["script"], r["MB"], r["run"], tokens, r["peak_GB"], r["peak_anonymous_GB"]]
        cells += [r["preprocessing_s"] or "", r["MB_per_s"] or ""]
        cells += [r["whole_run_s"], r["training_starts_after_s"]]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
