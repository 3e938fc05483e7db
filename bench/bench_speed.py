"""Tutorial-style training against each script's default path, side by side.

    python bench/bench_speed.py [--only classifier,gpt2,mlm] [--steps 40]

For each script, the same small model (same initial weights) and the same real data
from ../shared/data train for the same number of optimizer steps two ways, in this
one process:

- baseline: the tutorials' loop: fp32, every sample padded to the maximum length,
  one line per sample for the language models, `loss.item()` after every step;
- ours: the script itself (`main([...])`) with its defaults: dynamic padding and
  length-grouped batches for classification, packed blocks for the language models,
  the loss read back only every --logging_steps steps.

It prints tokens/s (real tokens: padding is not counted), the share of padding in
what the model computed on, peak memory (GPU: allocated by tensors; CPU: growth of
the process's resident memory), the final eval loss, and ours/baseline. On a GPU
pass `--gpu` for the sizes the issue names (GPT-2 124M at block 1024,
bert-base-uncased sized BERT on MRPC); MFU is then printed by the scripts.
"""

import argparse
import csv
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_classifier_padding import build_model, convert_mrpc  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_scheduler  # noqa: E402

import train_classifier  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class PeakMemory:
    """Peak memory while a block runs: tensors on a GPU, else the process's resident
    memory above what it was at the start (sampled every few milliseconds)."""

    def __enter__(self):
        if DEVICE.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.start = self.peak = rss()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while not self.done.wait(0.005):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        if DEVICE.type == "cuda":
            self.gib = torch.cuda.max_memory_allocated() / 2**30
        else:
            self.gib = (self.peak - self.start) / 2**30


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def baseline_loop(model, train_dataloader, steps, lr):
    """The loop of the Hugging Face course (chapter 3), fp32, loss.item() every step.
    Returns real tokens/s (after the first 5 steps, to skip warm-up) and padding share."""
    model.to(DEVICE).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    lr_scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=steps)
    real = computed = 0
    losses = []
    step = 0
    while step < steps:
        for batch in train_dataloader:
            if step == 5:
                start, real = time.perf_counter(), 0
            batch = {k: v.to(DEVICE) for k, v in batch.items()}
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            losses.append(loss.item())  # a host-device sync every step
            real += int(batch["attention_mask"].sum())
            computed += batch["attention_mask"].numel()
            step += 1
            if step == steps:
                break
    elapsed = time.perf_counter() - start
    return {"tokens_per_second": real / elapsed, "padding": 1 - real / max(computed, 1)}


def strings(*args):
    return [str(a) for a in args]


def script_rates(output_dir):
    """Tokens/s a script logged, without its first window (warm-up)."""
    history = json.loads((Path(output_dir) / "log_history.json").read_text())
    rates = [e["tokens_per_second"] for e in history if "tokens_per_second" in e][1:]
    eval_loss = [e["eval_loss"] for e in history if "eval_loss" in e][-1]
    return sum(rates) / len(rates), eval_loss


# ---------------------------------------------------------------------------
# Classification: MRPC.
# ---------------------------------------------------------------------------


def bench_classifier(work, steps, batch_size):
    rows = convert_mrpc(DATA / "mrpc" / "train.tsv", work / "train.tsv")
    convert_mrpc(DATA / "mrpc" / "dev.tsv", work / "dev.tsv")
    model_dir = work / "bert"
    build_model(rows, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def read(path):
        with open(path) as f:
            return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))

    def encode(rows):
        enc = tokenizer(
            [r["sentence1"] for r in rows],
            [r["sentence2"] for r in rows],
            truncation=True,
            max_length=128,
            padding="max_length",
            return_tensors="pt",
        )
        enc["labels"] = torch.tensor([int(r["label"]) for r in rows])
        return [dict(zip(enc, values)) for values in zip(*enc.values())]

    results = {}
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    loader = DataLoader(encode(read(work / "train.tsv")), batch_size=batch_size, shuffle=True)
    with PeakMemory() as memory:
        results["baseline"] = baseline_loop(model, loader, steps, 5e-5)
    results["baseline"]["memory"] = memory.gib
    results["baseline"]["eval_loss"] = classifier_eval_loss(model, encode(read(work / "dev.tsv")))
    del model

    out = work / "classifier-ours"
    with PeakMemory() as memory:
        train_classifier.main(
            strings(
                *("--model_name_or_path", model_dir, "--output_dir", out),
                *("--train_file", work / "train.tsv", "--validation_file", work / "dev.tsv"),
                *("--per_device_train_batch_size", batch_size, "--max_train_steps", steps),
                *("--logging_steps", 5, "--save_every_minutes", 0, "--weight_decay", 0.01),
            )
        )
    tps, eval_loss = script_rates(out)
    padding = classifier_padding_share(work, model_dir, batch_size)
    results["ours"] = {"tokens_per_second": tps, "padding": padding, "memory": memory.gib, "eval_loss": eval_loss}
    return results


@torch.no_grad()
def classifier_eval_loss(model, examples):
    model.eval()
    losses = []
    for batch in DataLoader(examples, batch_size=64):
        batch = {k: v.to(DEVICE) for k, v in batch.items()}
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        losses.append(F.cross_entropy(logits.float(), batch["labels"], reduction="none"))
    return torch.cat(losses).mean().item()


def classifier_padding_share(work, model_dir, batch_size):
    """Padding in the batches train_classifier.py builds by default (length-grouped,
    dynamic padding), over one epoch."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with open(work / "train.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    lengths = [
        len(tokenizer(r["sentence1"], r["sentence2"], truncation=True, max_length=128)["input_ids"]) for r in rows
    ]
    order = list(train_classifier.LengthGroupedSampler(lengths, batch_size, seed=42))
    real = computed = 0
    for i in range(0, len(order), batch_size):
        batch = [lengths[j] for j in order[i : i + batch_size]]
        real += sum(batch)
        computed += len(batch) * max(batch)
    return 1 - real / computed


# ---------------------------------------------------------------------------


def print_table(title, results):
    base = results["baseline"]["tokens_per_second"]
    print(f"\n{title}")
    print("| way      | real tokens/s | padding | peak memory | eval loss | vs baseline |")
    print("|----------|---------------|---------|-------------|-----------|-------------|")
    for name, r in results.items():
        memory = f"{r['memory']:.2f} GiB" if r.get("memory") is not None else "n/a"
        print(
            f"| {name:<8} | {r['tokens_per_second']:>13,.0f} | {r['padding']:>7.1%} | {memory:>11} | "
            f"{r['eval_loss']:>9.4f} | {r['tokens_per_second'] / base:>10.2f}x |"
        )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--only", default="classifier,gpt2,mlm")
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-speed-"))
    where = f"{torch.cuda.get_device_name() if DEVICE.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'}"
    print(f"torch {torch.__version__} on {where}; {args.steps} optimizer steps each way")
    wanted = args.only.split(",")
    if "classifier" in wanted:
        results = bench_classifier(work, args.steps, batch_size=32)
        print_table(f"train_classifier.py: MRPC, BERT 4x256, batch 32, {args.steps} steps", results)


if __name__ == "__main__":
    main()
