"""finetune_gpt2.py end to end, on a tiny GPT-2 with a byte-level BPE tokenizer trained here."""

import json
import math
import random
import tarfile
from pathlib import Path

import datasets
import helpers
import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, pipeline

import finetune_gpt2

BLOCK = 32
EPOCHS = 3
SUBJECTS = ["the cat", "a dog", "my bird", "the fox", "our fish", "the horse"]
VERBS = ["sat on", "ran to", "looked at", "jumped over", "slept near"]
PLACES = ["the mat .", "the house .", "a tree .", "the river .", "the old wall ."]


def repetitive_lines(n, seed):
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(PLACES)}" for _ in range(n)]


def make_tiny_gpt2(path, text, eos=True, vocab_size=300, min_frequency=1, seed=0, **sizes):
    """A byte-level BPE trained on `text` and a GPT-2 of `sizes` (default 2 x 32, 64 positions)
    with weights from `seed`, saved like a hub model. The benchmarks build theirs here too."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=["<|endoftext|>"])
    end = "<|endoftext|>" if eos else None
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=end, bos_token=end, unk_token=end)
    end_id = tokenizer.eos_token_id if eos else None
    sizes = {"n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2} | sizes
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=end_id, eos_token_id=end_id, **sizes)
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    (d / "train.txt").write_text("\n".join(repetitive_lines(400, seed=1)) + "\n")
    (d / "valid.txt").write_text("\n".join(repetitive_lines(60, seed=2)) + "\n")
    return d / "train.txt", d / "valid.txt"


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, text_files):
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), text_files[0].read_text().splitlines())


def argv(model, train, valid, out, *extra):
    base = ["--model_name_or_path", model, "--train_file", train, "--output_dir", out]
    base += ["--block_size", BLOCK, "--learning_rate", "3e-3", "--num_train_epochs", EPOCHS]
    base += ["--per_device_train_batch_size", 8, "--per_device_eval_batch_size", 5, "--logging_steps", 2]
    base += ["--save_every_minutes", 0, "--max_new_tokens", 12, "--prompt", "the cat"]
    if valid:
        base += ["--validation_file", valid]
    return [str(a) for a in base + list(extra)]


def checkpoints(out):
    return sorted((Path(out) / "checkpoints").iterdir())


def final_weights(out):
    return (checkpoints(out)[-1] / "model.safetensors").read_bytes()


def newest_state(out):
    return json.loads((checkpoints(out)[-1] / "training_state.json").read_text())["state"]


@pytest.fixture(scope="module")
def trained(tiny_gpt2, text_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    finetune_gpt2.main(argv(tiny_gpt2, *text_files, out, "--archive"))
    return out


def stream_of_tokens(tokenizer, path):
    """What packing must start from: every line (with its line break) tokenized, in order."""
    lines = Path(path).read_text().splitlines(keepends=True)
    return [t for line in lines for t in tokenizer(line)["input_ids"]]


@torch.no_grad()
def hand_mean_token_loss(model_dir, path):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokens = stream_of_tokens(AutoTokenizer.from_pretrained(model_dir), path)
    blocks = torch.tensor(tokens[: len(tokens) // BLOCK * BLOCK]).view(-1, BLOCK)
    # The model's loss is the mean over the block's BLOCK - 1 predictions; every block has
    # the same number, so the token-weighted mean is the mean over blocks.
    losses = [model(input_ids=b[None], labels=b[None]).loss.item() for b in blocks]
    return sum(losses) / len(losses)


def test_training_drives_perplexity_far_down(trained, tiny_gpt2, text_files):
    untrained = math.exp(hand_mean_token_loss(tiny_gpt2, text_files[1]))
    results = json.loads((trained / "eval_results.json").read_text())
    assert untrained > 100  # about the vocabulary size: a uniform guess
    assert results["perplexity"] < untrained / 10
    assert newest_state(trained)["epoch"] == EPOCHS
    assert (trained / "loss.png").exists()


def test_perplexity_is_exp_of_the_mean_token_loss(trained, text_files):
    results = json.loads((trained / "eval_results.json").read_text())
    by_hand = hand_mean_token_loss(trained / "best", text_files[1])
    assert results["loss"] == pytest.approx(by_hand, rel=1e-5)
    assert results["perplexity"] == pytest.approx(math.exp(by_hand), rel=1e-5)


def test_packing_loses_only_the_final_partial_block(tiny_gpt2, text_files):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    lines = datasets.load_dataset("text", data_files=str(text_files[0]), split="train", keep_linebreaks=True)
    blocks = finetune_gpt2.tokenize_and_pack(lines, tokenizer, BLOCK, "training")
    stream = stream_of_tokens(tokenizer, text_files[0])
    packed = [t for block in blocks["input_ids"] for t in block]
    assert all(len(block) == BLOCK for block in blocks["input_ids"])
    assert len(stream) - len(packed) < BLOCK  # only the final partial block is dropped
    assert packed == stream[: len(packed)]


def test_exported_model_generates_in_pipeline(trained):
    generator = pipeline("text-generation", model=str(trained / "best"))
    text = generator("the dog", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("the dog") and len(text) > len("the dog")
    sample = (trained / "samples.txt").read_text()
    assert sample.startswith("the cat") and len(sample.strip()) > len("the cat")
    with tarfile.open(f"{trained}.tar.gz") as tar:  # --archive
        assert f"{trained.name}/model.safetensors" in tar.getnames()


def test_continue_from_the_exported_model(trained, text_files, tmp_path):
    best_loss = json.loads((trained / "eval_results.json").read_text())["loss"]
    more = tmp_path / "more"
    state = finetune_gpt2.main(argv(trained / "best", *text_files, more, "--max_train_steps", 4, "--temperature", 0))
    assert state.completed_steps == 4
    first_eval = [e["eval_loss"] for e in state.log_history if "eval_loss" in e][0]
    assert first_eval < best_loss + 0.2  # starts from the tuned model, not from scratch
    # --temperature 0: greedy decoding, what the pipeline gives without sampling
    greedy = pipeline("text-generation", model=str(more / "best"))("the cat", max_new_tokens=12, do_sample=False)
    assert (more / "samples.txt").read_text() == greedy[0]["generated_text"] + "\n"


def test_validation_split_from_the_training_text(tiny_gpt2, text_files, tmp_path):
    out = tmp_path / "split"
    state = finetune_gpt2.main(argv(tiny_gpt2, text_files[0], None, out, "--max_train_steps", 3, "--max_new_tokens", 0))
    assert state.completed_steps == 3
    assert any("eval_perplexity" in e for e in state.log_history)
    assert not (out / "samples.txt").exists()  # --max_new_tokens 0: no sample


def test_each_run_in_one_process_gets_its_own_accelerate_settings(tiny_gpt2, text_files, tmp_path, capsys):
    """main() called twice in one Python process (a notebook): Accelerate's process-wide state, which the first run
    fixes (precision, --torch_compile), is made anew for the second."""
    finetune_gpt2.main(
        argv(tiny_gpt2, *text_files, tmp_path / "a", "--max_train_steps", 1, "--mixed_precision", "bf16")
    )
    assert "mixed precision: bf16" in capsys.readouterr().out
    finetune_gpt2.main(argv(tiny_gpt2, *text_files, tmp_path / "b", "--max_train_steps", 1, "--max_new_tokens", 0))
    assert "mixed precision: no" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing damaged.
# ---------------------------------------------------------------------------


def run_bad(args, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        finetune_gpt2.main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_input(trained, tiny_gpt2, text_files, tmp_path, capsys):
    train, valid = text_files
    out = trained  # a finished run with checkpoints: none of this may touch them
    before = helpers.digest(out)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    short = tmp_path / "short.txt"
    short.write_text("the cat sat\n")
    cases = {
        "missing": (argv(tiny_gpt2, tmp_path / "nope.txt", valid, out), ["not found", "nope.txt"]),
        "empty": (argv(tiny_gpt2, empty, valid, out), ["empty"]),
        "extension": (argv(tiny_gpt2, tmp_path / "data.csv", valid, out), ["unsupported extension"]),
        "short": (argv(tiny_gpt2, train, short, out), ["validation text has", "tokens", "--block_size"]),
        "too long a block": (argv(tiny_gpt2, train, valid, out, "--block_size", 65), ["maximum of 64", "64 or less"]),
        # sampling flags are checked before training, not after it
        "top_p": (argv(tiny_gpt2, train, valid, out, "--top_p", 1.5), ["--top_p must be"]),
        "temperature": (argv(tiny_gpt2, train, valid, out, "--temperature", -1), ["cannot be negative"]),
    }
    (tmp_path / "data.csv").write_text("text\nhello\n")
    for name, (args, words) in cases.items():
        line = run_bad(args, capsys)
        for word in words:
            assert word in line, (name, line)
    assert helpers.digest(out) == before

    no_eos = make_tiny_gpt2(tmp_path / "no-eos", repetitive_lines(50, seed=3), eos=False)
    line = run_bad(argv(no_eos, train, valid, tmp_path / "o"), capsys)
    assert "no end-of-text token" in line


def test_short_text_message_says_what_block_size_works(tiny_gpt2, text_files, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("the cat sat on the mat .\n")
    line = run_bad(argv(tiny_gpt2, text_files[0], short, tmp_path / "o"), capsys)
    found = int(line.split("validation text has ")[1].split()[0])
    assert 0 < found < BLOCK and f"--block_size {found} or less" in line
