"""Packed blocks against one line per sample with padding, for causal-LM fine-tuning.

    python bench/bench_gpt2_packing.py [--steps 60] [--block_size 128] [--batch_size 8]

The same small GPT-2 (4 layers x 256, same initial weights, a GPT-2-style byte-level BPE of 8k
trained here on the training text: the real gpt2 tokenizer needs the hub) trains for the same number
of optimizer steps of the same batch size, with the same loop (AdamW, clipping, linear decay), three
ways:

- packed: finetune_gpt2.py's data path: the token stream of all lines cut into blocks of
  --block_size tokens; every position is a real token and a prediction;
- line by line, batch pad: the tutorials' LineByLineTextDataset (one non-empty line per sample,
  truncated to --block_size) with DataCollatorForLanguageModeling (mlm=False), which pads each batch
  to its longest line;
- line by line, block pad: the same samples, each padded to --block_size (tokenizing with
  padding="max_length", as many notebooks do).

Only the data differs, so the table shows what packing alone is worth: real tokens/s (padding not
counted), the share of padding in what the model computed on, the share of the text never trained on
(the final partial block; the tails of lines cut by truncation), the real tokens the steps trained
on, the seconds they took, and the loss on the same packed held-out blocks
(finetune_gpt2.run_evaluation). bench_speed.py compares the whole script against the tutorials' loop
instead.

Data (../shared/data): WikiText-2 raw (wiki.test.raw, its last 10% of lines held out, as
--validation_split_percentage does) and the tokenized release (valid.txt; test.txt held out).
measure_packed and measure_line_by_line can be imported by other benches."""

import argparse
import os
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
sys.path.insert(0, str(REPO / "tests"))

import datasets  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from test_finetune_gpt2 import make_tiny_gpt2  # noqa: E402  (the tests' builder)
from torch.utils.data import DataLoader  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    default_data_collator,
    get_scheduler,
)

import finetune_gpt2  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
WARMUP_STEPS = 3  # not timed: first calls allocate and pick kernels
PACKING = argparse.Namespace(preprocessing_num_workers=1, streaming=False)  # finetune_gpt2's flags for packing


def build_model(train_lines, path, block_size, vocab_size=8000):
    """A GPT-2-style byte-level BPE trained on the text, and a 4 x 256 GPT-2, saved like a hub
    model."""
    return make_tiny_gpt2(
        path,
        train_lines,
        vocab_size=vocab_size,
        min_frequency=2,
        n_positions=block_size,
        n_embd=256,
        n_layer=4,
        n_head=4,
    )


def as_dataset(lines):
    """Lines (with their line breaks) as the `text` dataset that load_text_data gives."""
    return datasets.Dataset.from_dict({"text": lines})


def train_for_steps(model_dir, loader, steps, lr):
    """The same loop for every way, as the script trains: AdamW, clipping at 1.0, linear decay
    over `steps` optimizer steps of one batch each. The model from model_dir starts from the same
    weights and the same dropout stream every time."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(DEVICE).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    lr_scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=steps)
    real = computed = timed_real = step = 0
    start = time.perf_counter()
    while step < steps:
        for batch in loader:
            if step == WARMUP_STEPS:
                timed_start, timed_real = time.perf_counter(), 0
            n_real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            batch = {k: v.to(DEVICE) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
            batch.setdefault("labels", batch["input_ids"])  # packed: the labels are the inputs
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            step += 1
            real, timed_real, computed = real + n_real, timed_real + n_real, computed + batch["input_ids"].numel()
            if step == steps:
                break
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    return model, {
        "tokens_per_second": timed_real / (end - timed_start),
        "padding": 1 - real / computed,
        "real_tokens": real,
        "wall_s": end - start,
    }


def eval_loss(model, eval_blocks, batch_size=16):
    """finetune_gpt2.py's own evaluation: mean loss per predicted token on packed blocks."""
    loader = DataLoader(eval_blocks, batch_size=batch_size, collate_fn=default_data_collator)
    accelerator = Accelerator(cpu=DEVICE.type == "cpu")
    return finetune_gpt2.run_evaluation(accelerator, model, accelerator.prepare(loader))["loss"]


def measure_packed(model_dir, train_lines, eval_blocks, block_size, batch_size, steps, lr=5e-4):
    """finetune_gpt2.py's data: tokenize once, pack into blocks of block_size tokens."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    blocks = finetune_gpt2.tokenize_and_pack(as_dataset(train_lines), tokenizer, block_size, "training", PACKING)
    stream = sum(len(ids) for ids in tokenizer(train_lines)["input_ids"])
    loader = DataLoader(
        blocks,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=default_data_collator,
        generator=torch.Generator().manual_seed(0),
    )
    model, result = train_for_steps(model_dir, loader, steps, lr)
    result["text_lost"] = 1 - len(blocks) * block_size / stream  # the final partial block
    return result | {"eval_loss": eval_loss(model, eval_blocks)}


def measure_line_by_line(model_dir, train_lines, eval_blocks, block_size, batch_size, steps, lr=5e-4, pad_to="batch"):
    """The tutorials' data: LineByLineTextDataset (each non-empty line a sample, truncated to
    block_size) and DataCollatorForLanguageModeling(mlm=False), which pads each batch to its
    longest line and masks the padding out of the labels. pad_to="block": every sample padded to
    block_size instead."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has none; the tutorials use eos
    lines = [line.rstrip("\n") for line in train_lines if line.strip()]  # LineByLineTextDataset's reading
    full = tokenizer(lines)["input_ids"]
    samples = [{"input_ids": ids[:block_size]} for ids in full]
    collator = DataCollatorForLanguageModeling(
        tokenizer, mlm=False, pad_to_multiple_of=block_size if pad_to == "block" else None
    )
    loader = DataLoader(
        samples, batch_size=batch_size, shuffle=True, collate_fn=collator, generator=torch.Generator().manual_seed(0)
    )
    model, result = train_for_steps(model_dir, loader, steps, lr)
    result["text_lost"] = 1 - sum(len(s["input_ids"]) for s in samples) / sum(len(ids) for ids in full)
    return result | {"eval_loss": eval_loss(model, eval_blocks)}


def read_lines(path):
    return Path(path).read_text(encoding="utf-8").splitlines(keepends=True)


def data_sets():
    """(title, training lines, held-out lines) for each WikiText-2 release in ../shared/data."""
    raw = read_lines(DATA / "wikitext-2-raw" / "wiki.test.raw")
    held_out = len(raw) // 10  # the last 10% of the lines, as --validation_split_percentage 10
    yield "WikiText-2 raw: wiki.test.raw, last 10% of lines held out", raw[:-held_out], raw[-held_out:]
    yield (
        "WikiText-2 tokenized release: valid.txt, test.txt held out",
        read_lines(DATA / "wikitext-2" / "valid.txt"),
        read_lines(DATA / "wikitext-2" / "test.txt"),
    )


def print_table(title, results):
    base = results["packed"]["tokens_per_second"]
    print(f"\n{title}")
    header = ["data" + " " * 19, "real tokens/s", "padding", "text lost", "tokens trained", "seconds", "eval loss"]
    print("| " + " | ".join(header) + " | vs packed |")
    print("|" + "|".join("-" * (len(h) + 2) for h in header) + "|-----------|")
    for name, r in results.items():
        print(
            f"| {name:<23} | {r['tokens_per_second']:>13,.0f} | {r['padding']:>7.1%} | {r['text_lost']:>9.1%} | "
            f"{r['real_tokens']:>14,} | {r['wall_s']:>7.1f} | {r['eval_loss']:>9.4f} | "
            f"{r['tokens_per_second'] / base:>8.2f}x |"
        )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60, help="optimizer steps, the same for every way")
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--eval_blocks", type=int, default=200, help="held-out blocks evaluated (the first N)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (the CPU this was written on has 2 cores)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix="bench-gpt2-packing-"))
    where = torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    settings = {"block_size": args.block_size, "batch_size": args.batch_size, "steps": args.steps}
    tables = []
    for i, (title, train_lines, eval_lines) in enumerate(data_sets()):
        model_dir = build_model(train_lines, work / f"gpt2-{i}", args.block_size)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        eval_blocks = finetune_gpt2.tokenize_and_pack(
            as_dataset(eval_lines), tokenizer, args.block_size, "held-out", PACKING
        )
        eval_blocks = torch.utils.data.Subset(eval_blocks, range(min(args.eval_blocks, len(eval_blocks))))
        inputs = (model_dir, train_lines, eval_blocks)
        results = {
            "packed": measure_packed(*inputs, **settings),
            "line by line, batch pad": measure_line_by_line(*inputs, **settings, pad_to="batch"),
            "line by line, block pad": measure_line_by_line(*inputs, **settings, pad_to="block"),
        }
        tables.append((title, results))
    print(
        f"\nGPT-2 4x256, BPE 8k, batch {args.batch_size}, block {args.block_size}, {args.steps} optimizer steps "
        f"each way, fp32, torch {torch.__version__} on {where}"
    )
    for title, results in tables:
        print_table(title, results)


if __name__ == "__main__":
    main()
