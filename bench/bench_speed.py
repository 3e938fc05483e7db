"""Tutorial-style training against each script's default path, side by side.

    python bench/bench_speed.py [--only classifier,gpt2,mlm] [--steps 40] [--seed 42]

For each script, the same small model (same initial weights) and the same real data from
../shared/data train for the same number of optimizer steps two ways:

- baseline: the tutorials' loop: fp32, every sample padded to the maximum length, one line per
  sample for the language models, `loss.item()` after every step;
- ours: the script itself (`main([...])`) with its defaults: dynamic padding and length-grouped
  batches for classification, packed blocks for the language models, the loss read back only every
  --logging_steps steps.

It prints tokens/s (real tokens: padding is not counted), the share of padding in what the model
computed on, peak memory (GPU: allocated by tensors; CPU: the peak resident memory of the
process, each way running in a process of its own), the final eval loss (both ways evaluated the
same way on the same held-out data), and ours/baseline."""

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
# Public data beside the clone, not in it; where to get it: docs/speed.md#the-benchmarks-data
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_classifier_padding import build_model, convert_mrpc  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_scheduler  # noqa: E402

import train_classifier  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class PeakMemory:
    """Peak memory: on a GPU, what tensors allocated while the block ran; on the CPU, the peak
    resident memory of this process (each way runs in a process of its own)."""

    def __enter__(self):
        if DEVICE.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if DEVICE.type == "cuda":
            self.gib = torch.cuda.max_memory_allocated() / 2**30
        else:
            self.gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def baseline_loop(model, train_dataloader, steps, lr):
    """The loop of the Hugging Face course (chapter 3), fp32, loss.item() every step. Returns
    real tokens/s (after the first 5 steps, to skip warm-up) and padding share."""
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


def bench_classifier(work, way, steps, seed, batch_size):
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

    if way == "baseline":
        torch.manual_seed(seed)
        with PeakMemory() as memory:  # like the script's run: data, model, training, evaluation
            model = AutoModelForSequenceClassification.from_pretrained(model_dir)
            loader = DataLoader(encode(read(work / "train.tsv")), batch_size=batch_size, shuffle=True)
            result = baseline_loop(model, loader, steps, 5e-5)
            result["eval_loss"] = classifier_eval_loss(model, encode(read(work / "dev.tsv")))
        return result | {"memory": memory.gib}

    out = work / "classifier-ours"
    with PeakMemory() as memory:
        train_classifier.main(
            strings(
                *("--model_name_or_path", model_dir, "--output_dir", out),
                *("--train_file", work / "train.tsv", "--validation_file", work / "dev.tsv"),
                *("--per_device_train_batch_size", batch_size, "--max_train_steps", steps),
                *("--logging_steps", 5, "--save_every_minutes", 0, "--weight_decay", 0.01, "--seed", seed),
            )
        )
    tps, eval_loss = script_rates(out)
    padding = classifier_padding_share(work, model_dir, batch_size)
    return {"tokens_per_second": tps, "padding": padding, "memory": memory.gib, "eval_loss": eval_loss}


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
    """Padding in the batches train_classifier.py builds by default (length-grouped, dynamic
    padding), over one epoch."""
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
# Language models: the tutorials' line-by-line samples padded to the block size.
# ---------------------------------------------------------------------------


def read_lines(paths):
    """LineByLineTextDataset's reading: every non-empty line, stripped."""
    return [line.strip() for path in paths for line in Path(path).read_text().splitlines() if line.strip()]


def line_by_line(tokenizer, lines, max_length):
    """One sample per line, truncated and padded to max_length (what the tutorials' data does)."""
    enc = tokenizer(lines, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    return [dict(zip(enc, values)) for values in zip(*enc.values())]


def plain_accelerator():
    from accelerate import Accelerator

    return Accelerator()


def bench_gpt2(work, way, steps, seed, batch_size, block_size):
    from test_finetune_gpt2 import make_tiny_gpt2  # the tests' builder: byte-level BPE + GPT-2 config

    import finetune_gpt2

    train_file, eval_file = DATA / "wikitext-2" / "valid.txt", DATA / "wikitext-2" / "test.txt"
    model_dir = work / "gpt2"
    # The same initial weights both ways.
    sizes = {"n_positions": block_size, "n_embd": 256, "n_layer": 4, "n_head": 4}
    make_tiny_gpt2(model_dir, read_lines([train_file]), vocab_size=8000, seed=seed, **sizes)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    tokenizer.pad_token = tokenizer.eos_token
    if way == "baseline":
        with PeakMemory() as memory:  # like the script's run: data, model, training, evaluation
            samples = line_by_line(tokenizer, read_lines([train_file]), block_size)
            for sample in samples:  # padding is not predicted
                sample["labels"] = sample["input_ids"].masked_fill(sample["attention_mask"] == 0, -100)
            model = finetune_gpt2.AutoModelForCausalLM.from_pretrained(model_dir)
            loader = DataLoader(samples, batch_size=batch_size, shuffle=True)
            result = baseline_loop(model, loader, steps, 5e-4)
            # Evaluated exactly as the script evaluates: loss per token on packed held-out blocks.
            accelerator = plain_accelerator()
            packing = argparse.Namespace(preprocessing_num_workers=1, streaming=False)
            eval_text = finetune_gpt2.tokenize_and_pack(
                load_text([eval_file], keep_linebreaks=True), tokenizer, block_size, "validation", packing
            )
            eval_loader = DataLoader(eval_text, batch_size=8)
            result["eval_loss"] = finetune_gpt2.run_evaluation(accelerator, model, eval_loader)["loss"]
        return result | {"memory": memory.gib}

    out = work / "gpt2-ours"
    with PeakMemory() as memory:
        finetune_gpt2.main(
            strings(
                *("--model_name_or_path", model_dir, "--output_dir", out, "--block_size", block_size),
                *("--train_file", train_file, "--validation_file", eval_file, "--learning_rate", "5e-4"),
                *("--per_device_train_batch_size", batch_size, "--max_train_steps", steps),
                *("--logging_steps", 5, "--save_every_minutes", 0, "--max_new_tokens", 5, "--seed", seed),
            )
        )
    tps, eval_loss = script_rates(out)
    return {"tokens_per_second": tps, "padding": 0.0, "memory": memory.gib, "eval_loss": eval_loss}


def load_text(paths, keep_linebreaks):
    import datasets

    files = [str(p) for p in paths]
    return datasets.load_dataset("text", data_files=files, split="train", keep_linebreaks=keep_linebreaks)


def bench_mlm(work, way, steps, seed, batch_size, max_seq_length):
    from transformers import DataCollatorForLanguageModeling

    import pretrain_mlm
    from machinery import fixed_masks, text_samples

    books = sorted((DATA / "books").glob("*.txt"))
    sizes = ("--num_hidden_layers", 4, "--hidden_size", 256, "--num_attention_heads", 4, "--intermediate_size", 1024)
    out = work / "mlm-ours"
    common_args = (
        *("--train_file", DATA / "books" / "*.txt", "--vocab_size", 8000, "--max_seq_length", max_seq_length),
        *sizes,
        *("--per_device_train_batch_size", batch_size, "--max_train_steps", steps, "--learning_rate", "5e-4"),
        *("--logging_steps", 5, "--save_every_minutes", 0, "--fill_mask_prompt", "She was <mask> to see him."),
        *("--seed", seed),
    )
    if way == "ours":  # runs first: the baseline uses the tokenizer it trains
        with PeakMemory() as memory:
            pretrain_mlm.main(strings("--output_dir", out, *common_args))
        tps, eval_loss = script_rates(out)
        return {"tokens_per_second": tps, "padding": 0.0, "memory": memory.gib, "eval_loss": eval_loss}

    # Baseline: the tutorial's LineByLineTextDataset + DataCollatorForLanguageModeling,
    # padded to max_seq_length, with the tokenizer the script trained and the same start.
    tokenizer = AutoTokenizer.from_pretrained(out)
    args = pretrain_mlm.parse_args(strings("--output_dir", out, *common_args))
    torch.manual_seed(seed)  # as the script seeds before building its model
    with PeakMemory() as memory:  # like the script's run: data, model, training, evaluation
        model = pretrain_mlm.new_model(args, tokenizer)
        samples = line_by_line(tokenizer, read_lines(books), max_seq_length)
        collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
        loader = DataLoader(samples, batch_size=batch_size, shuffle=True, collate_fn=collator)
        result = baseline_loop(model, loader, steps, 5e-4)
        # The same held-out blocks and masks the script evaluated on.
        train_text, eval_text = text_samples.load_text_data(args, keep_linebreaks=False)
        eval_data = pretrain_mlm.prepare_data(eval_text, "validation", tokenizer, args)
        eval_data = fixed_masks.FixedMasks(eval_data, tokenizer, args)
        eval_loader = DataLoader(eval_data, batch_size=args.per_device_eval_batch_size)
        accelerator = plain_accelerator()
        eval_loss = pretrain_mlm.run_evaluation(accelerator, model, eval_loader)["loss"]
    return result | {"memory": memory.gib, "eval_loss": eval_loss}


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


SECTIONS = {
    "classifier": (
        lambda work, way, steps, seed: bench_classifier(work, way, steps, seed, batch_size=32),
        "train_classifier.py: MRPC, BERT 4x256, WordPiece 8k, batch 32",
    ),
    "gpt2": (
        lambda work, way, steps, seed: bench_gpt2(work, way, steps, seed, batch_size=8, block_size=128),
        "finetune_gpt2.py: WikiText-2 (valid -> test), GPT-2 4x256, BPE 8k, 8 x 128 tokens",
    ),
    "mlm": (
        lambda work, way, steps, seed: bench_mlm(work, way, steps, seed, batch_size=16, max_seq_length=128),
        "pretrain_mlm.py: two books, RoBERTa 4x256, BPE 8k, 16 x 128 tokens",
    ),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--only", default="classifier,gpt2,mlm")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=42, help="the same seed both ways (the scripts' default)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # section:way, run in a process of its own
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        section, way = args.child.split(":")
        result = SECTIONS[section][0](Path(args.work), way, args.steps, args.seed)
        print("RESULT " + json.dumps(result))
        return

    work = Path(tempfile.mkdtemp(prefix="bench-speed-"))
    where = torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    tables = []
    for section in args.only.split(","):
        results = {}
        # Each way in a fresh process, so that peak memory is its own. MLM: ours first,
        # since the baseline uses the tokenizer the script trains.
        for way in ("ours", "baseline") if section == "mlm" else ("baseline", "ours"):
            command = [sys.executable, __file__, "--child", f"{section}:{way}", "--work", str(work)]
            command += ["--steps", str(args.steps), "--seed", str(args.seed)]
            proc = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise SystemExit(f"{section}:{way} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            results[way] = json.loads(lines[-1][len("RESULT ") :])
        tables.append((f"{SECTIONS[section][1]}, {args.steps} optimizer steps, seed {args.seed}", results))
    print(f"\ntorch {torch.__version__} on {where}; each way in its own process")
    for title, results in tables:
        print_table(title, {"baseline": results["baseline"], "ours": results["ours"]})


if __name__ == "__main__":
    main()
