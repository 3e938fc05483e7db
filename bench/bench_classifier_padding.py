"""What each padding change buys the classifier, on the real MRPC files.

    python bench/bench_classifier_padding.py [--steps 60] [--data ../shared/data/mrpc]

Runs train_classifier.py itself three times in one process (same small BERT, same data, same number
of optimizer steps), adding one change at a time:

- padded to 128: every example padded to --max_seq_length (--pad_to_max_length);
- dynamic padding: each batch padded to its longest example (--no-group_by_length);
- + length grouping: batches of examples of similar length (the default).

It prints tokens/s (real tokens, not padding), the share of padding in what the model computed
on, and the ratio to the first. Offline: the tokenizer is a WordPiece vocabulary trained here on
the MRPC training text."""

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from tokenizers import BertWordPieceTokenizer  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer  # noqa: E402

import train_classifier  # noqa: E402


def convert_mrpc(src, dst):
    """GLUE's MRPC TSV (with a BOM, quotes inside sentences) -> sentence1, sentence2, label."""
    with open(src, encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    with open(dst, "w") as f:
        f.write("sentence1\tsentence2\tlabel\n")
        for r in rows:
            f.write(f"{r['#1 String']}\t{r['#2 String']}\t{r['Quality']}\n")
    return rows


def build_model(rows, path):
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator([r["#1 String"] for r in rows] + [r["#2 String"] for r in rows], vocab_size=8000)
    tokenizer = BertTokenizer(vocab=wordpiece.get_vocab())
    config = BertConfig(
        vocab_size=len(wordpiece.get_vocab()),
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def padding_share(tokenizer_dir, train_file, pad_to_128, batch_size, grouped=False):
    """Share of padding over one epoch of batches as the script builds them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    with open(train_file) as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    lengths = [
        len(tokenizer(r["sentence1"], r["sentence2"], truncation=True, max_length=128)["input_ids"]) for r in rows
    ]
    if grouped:
        order = list(train_classifier.LengthGroupedSampler(lengths, batch_size, seed=42))
    else:
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    real = computed = 0
    for i in range(0, len(order), batch_size):
        batch = [lengths[j] for j in order[i : i + batch_size]]
        real += sum(batch)
        computed += len(batch) * (128 if pad_to_128 else max(batch))
    return 1 - real / computed


def main():
    p = argparse.ArgumentParser()
    # Public data beside the clone, not in it; where to get it: docs/speed.md#the-benchmarks-data
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mrpc"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch_size", type=int, default=32)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-cls-"))
    rows = convert_mrpc(Path(args.data) / "train.tsv", work / "train.tsv")
    convert_mrpc(Path(args.data) / "dev.tsv", work / "dev.tsv")
    build_model(rows, work / "model")

    results = {}
    ways = {
        "padded to 128": ["--pad_to_max_length", "--no-group_by_length"],
        "dynamic padding": ["--no-group_by_length"],
        "+ length grouping": [],
    }
    for name, extra in ways.items():
        out = work / name.replace(" ", "_").replace("+", "and")
        start = time.perf_counter()
        train_classifier.main(
            [
                "--model_name_or_path",
                str(work / "model"),
                "--train_file",
                str(work / "train.tsv"),
                "--validation_file",
                str(work / "dev.tsv"),
                "--output_dir",
                str(out),
                "--max_seq_length",
                "128",
                "--per_device_train_batch_size",
                str(args.batch_size),
                "--max_train_steps",
                str(args.steps),
                "--logging_steps",
                "10",
                "--save_every_minutes",
                "0",
                "--max_eval_samples",
                "64",
                *extra,
            ]
        )
        history = json.loads((out / "log_history.json").read_text())
        rates = [e["tokens_per_second"] for e in history if "tokens_per_second" in e][1:]  # first window: warm-up
        eval_loss = [e["eval_loss"] for e in history if "eval_loss" in e][-1]
        results[name] = {
            "tokens_per_second": sum(rates) / len(rates),
            "padding": padding_share(
                work / "model", work / "train.tsv", "--pad_to_max_length" in extra, args.batch_size, grouped=not extra
            ),
            "eval_loss": eval_loss,
            "wall_s": time.perf_counter() - start,
        }

    base = results["padded to 128"]["tokens_per_second"]
    print(
        f"\nMRPC train, BERT 4x256, batch {args.batch_size}, {args.steps} optimizer steps, "
        f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}"
    )
    print(f"| {'padding':<17} | {'real tokens/s':>13} | {'padding share':>13} | {'eval loss':>9} | {'vs 128':>6} |")
    print(f"|{'-' * 19}|{'-' * 15}|{'-' * 15}|{'-' * 11}|{'-' * 8}|")
    for name, r in results.items():
        print(
            f"| {name:<17} | {r['tokens_per_second']:>13,.0f} | {r['padding']:>13.1%} | "
            f"{r['eval_loss']:>9.4f} | {r['tokens_per_second'] / base:>5.2f}x |"
        )


if __name__ == "__main__":
    main()
