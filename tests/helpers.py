"""Tiny models and toy data, built inside the tests (no downloads)."""

import csv
import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FILLER = [f"w{i}" for i in range(40)]


def make_tiny_bert(path):
    """A 2-layer BERT with a word-level vocabulary, saved like a hub model."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "great", "awful", *FILLER]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def toy_rows(n, seed, pair=False):
    """Sentences of filler words with one sentiment word; the label follows it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        cue = rng.choice(["good", "great"] if label == "pos" else ["bad", "awful"])
        words = rng.choices(FILLER, k=rng.randint(3, 12))
        words.insert(rng.randrange(len(words) + 1), cue)
        if pair:
            rows.append(
                {
                    "sentence1": " ".join(rng.choices(FILLER, k=rng.randint(2, 8))),
                    "sentence2": " ".join(words),
                    "label": label,
                }
            )
        else:
            rows.append({"text": " ".join(words), "label": label})
    return rows


def write_csv(path, rows, delimiter=","):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def offline_env(**extra):
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", **extra
    )
    return env


def script_command(script, *args):
    return [sys.executable, str(REPO / script), *map(str, args)]


def run_script(script, *args, check=True, timeout=300):
    proc = subprocess.run(
        script_command(script, *args), cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def digest(folder):
    """sha256 of every file under folder: to show that nothing in it changed."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }
