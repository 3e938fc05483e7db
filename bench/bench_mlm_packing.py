"""pretrain_mlm.py packed against --line_by_line, on real text.

    python bench/bench_mlm_packing.py [--steps 40] [--max_seq_length 128] [--batch_size 16]

Runs the script itself twice per text (same small RoBERTa, 4 layers x 256, same byte-level BPE of 8k
that the script trains, same optimizer steps of the same batch size), changing only --line_by_line:

- packed (the default): the token stream of all lines cut into blocks of --max_seq_length tokens; no
  padding, every block full;
- line by line (the tutorial's LineByLineTextDataset): one line per sample, truncated to
  --max_seq_length, each batch padded to its longest line.

It prints real tokens/s (the script's own count, padding excluded), the real tokens per batch, the
share of padding in the batches of one epoch, and the share of the text that line by line never
trains on (cut by truncation). Eval losses are not compared: each way evaluates on its own form of
the held-out text (blocks or lines).

Texts (../shared/data): the two books (Pride and Prejudice, Grimm's tales; the last 10% of lines
held out) and WikiText-2 raw (wiki.test.raw, the last 10% held out)."""

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
# Public data beside the clone, not in it; where to get it: docs/speed.md#the-benchmarks-data
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from bench_speed import script_rates  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import pretrain_mlm  # noqa: E402
from machinery import text_samples  # noqa: E402

TEXTS = {
    "two books": str(DATA / "books" / "*.txt"),
    "WikiText-2 raw": str(DATA / "wikitext-2-raw" / "wiki.test.raw"),
}


def run(train_file, out, steps, batch_size, seq_len, line_by_line):
    argv = [
        *("--train_file", train_file, "--output_dir", out, "--vocab_size", 8000),
        *("--num_hidden_layers", 4, "--hidden_size", 256, "--num_attention_heads", 4, "--intermediate_size", 1024),
        *("--max_seq_length", seq_len, "--per_device_train_batch_size", batch_size, "--max_train_steps", steps),
        *("--learning_rate", "5e-4", "--logging_steps", 5, "--save_every_minutes", 0),
        *("--fill_mask_prompt", "She was <mask> to see him."),
        *(["--line_by_line"] if line_by_line else []),
    ]
    pretrain_mlm.main([str(a) for a in argv])
    return script_rates(out)[0]  # tokens/s the script logged, without its warm-up window


def line_statistics(train_file, out, batch_size, seq_len):
    """For line by line: padding share over one epoch of shuffled batches, and the share of the
    text's tokens that truncation cuts off."""
    args = pretrain_mlm.parse_args(["--train_file", train_file, "--output_dir", str(out)])
    train_text, _ = text_samples.load_text_data(args, keep_linebreaks=False)
    tokenizer = AutoTokenizer.from_pretrained(out)
    lines = [t for t in train_text["text"] if t.strip()]
    lengths = torch.tensor([len(ids) for ids in tokenizer(lines)["input_ids"]])
    kept = lengths.clamp(max=seq_len)
    order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(42))
    real = computed = 0
    for i in range(0, len(order), batch_size):
        batch = kept[order[i : i + batch_size]]
        real += int(batch.sum())
        computed += len(batch) * int(batch.max())
    return {"padding": 1 - real / computed, "lost": 1 - int(kept.sum()) / int(lengths.sum())}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-mlm-"))
    rows = []
    for name, train_file in TEXTS.items():
        result = {}
        for way in ("packed", "line by line"):
            out = work / f"{name}-{way}".replace(" ", "_")
            result[way] = run(train_file, out, args.steps, args.batch_size, args.max_seq_length, way != "packed")
        stats = line_statistics(
            train_file, work / f"{name}-line_by_line".replace(" ", "_"), args.batch_size, args.max_seq_length
        )
        rows.append((name, result, stats))

    print(
        f"\npretrain_mlm.py, RoBERTa 4x256, BPE 8k, {args.batch_size} x {args.max_seq_length} tokens, "
        f"{args.steps} optimizer steps, torch {torch.__version__} on CPU, {torch.get_num_threads()} threads"
    )
    print("| text | packed tokens/s | line by line tokens/s | ratio | line by line: padding | text cut |")
    print("|---|---|---|---|---|---|")
    for name, result, stats in rows:
        packed, lines = result["packed"], result["line by line"]
        print(
            f"| {name} | {packed:,.0f} | {lines:,.0f} | {packed / lines:.2f}x | "
            f"{stats['padding']:.1%} | {stats['lost']:.1%} |"
        )


if __name__ == "__main__":
    main()
