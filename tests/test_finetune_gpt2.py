"""finetune_gpt2.py end to end, on a tiny GPT-2 with a byte-level BPE tokenizer trained here."""

import json
import math
import os
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
from machinery import streaming, token_files

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
    finetune_gpt2.main(argv(tiny_gpt2, *text_files, out, "--archive", "--test_file", text_files[1]))
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


def test_packing_loses_only_the_final_partial_block(tiny_gpt2, tmp_path):
    """A text of many batches, tokenized by 2 worker processes into a token file and cut into
    blocks: the blocks are the one token stream of all lines in order, only its final partial
    block left out."""
    import argparse

    path = tmp_path / "long.txt"
    path.write_text("\n".join(repetitive_lines(25_000, seed=3)) + "\n")  # 3 write batches of 10,000 lines
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    lines = datasets.load_dataset("text", data_files=str(path), split="train", keep_linebreaks=True)
    args = argparse.Namespace(preprocessing_num_workers=2, streaming=False)
    blocks = finetune_gpt2.tokenize_and_pack(lines, tokenizer, BLOCK, "training", args)
    stream = stream_of_tokens(tokenizer, path)
    packed = torch.cat([blocks[i]["input_ids"] for i in range(len(blocks))]).tolist()
    assert all(len(blocks[i]["input_ids"]) == BLOCK for i in range(len(blocks)))
    assert len(stream) - len(packed) < BLOCK  # only the final partial block is dropped
    assert packed == stream[: len(packed)]
    each_line = token_files.TokenSamples(blocks.token_file)  # where each line starts, across the batches too
    assert len(each_line) == len(lines)
    for i in [0, 9_999, 10_000, 19_999, 20_000, len(lines) - 1]:  # either side of each batch's edge
        assert each_line[i]["input_ids"].tolist() == tokenizer(lines[i]["text"])["input_ids"], i


def test_a_worker_tokenizes_on_one_thread_and_the_setting_is_given_back(tiny_gpt2, tmp_path, monkeypatch):
    """--preprocessing_num_workers N uses N cores: even a single worker runs the fast tokenizer
    without its own threads, and the user's TOKENIZERS_PARALLELISM is restored afterwards."""
    import argparse

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    path = tmp_path / "short.txt"
    path.write_text("\n".join(repetitive_lines(200, seed=4)) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    lines = datasets.load_dataset("text", data_files=str(path), split="train")
    seen = []

    def tokenize(batch):
        seen.append(os.environ.get("TOKENIZERS_PARALLELISM"))
        return tokenizer(batch)["input_ids"]

    args = argparse.Namespace(preprocessing_num_workers=1, streaming=False)
    token_files.tokenize_to_file(lines, tokenize, tokenizer, args, "training", recipe="one thread")
    assert seen and set(seen) == {"false"}
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"


def test_best_is_scored_on_the_test_file_and_eval_only_scores_a_model_without_training(trained, text_files, tmp_path):
    results = json.loads((trained / "eval_results.json").read_text())
    by_hand = hand_mean_token_loss(trained / "best", text_files[1])  # (the validation text, as a test file here)
    assert results["test_loss"] == pytest.approx(by_hand, rel=1e-5)
    assert results["test_perplexity"] == pytest.approx(math.exp(by_hand), rel=1e-5)
    out = tmp_path / "eval"
    metrics = finetune_gpt2.main(argv(trained / "best", *text_files, out, "--eval_only", "--test_file", text_files[0]))
    assert metrics["loss"] == pytest.approx(by_hand, rel=1e-5)
    assert metrics["test_loss"] == pytest.approx(hand_mean_token_loss(trained / "best", text_files[0]), rel=1e-5)
    assert json.loads((out / "eval_results.json").read_text()) == metrics and not (out / "checkpoints").exists()


def test_the_model_card_says_what_the_model_is_and_how_to_make_it_again(trained, tiny_gpt2, text_files):
    from huggingface_hub import ModelCard

    card = ModelCard.load(trained / "best" / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.base_model is None  # a local folder, not a model on the Hub
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    expected = json.loads((trained / "eval_results.json").read_text())
    assert results == {k: v for k, v in expected.items() if k != "step"}  # test scores included
    text = card.text
    assert f"fine-tuned from {tiny_gpt2}" in text and f"Training: {text_files[0]}" in text
    assert f"python finetune_gpt2.py --model_name_or_path {tiny_gpt2}" in text and "--block_size 32" in text
    assert f"Evaluated at optimizer step {expected['step']} of" in text
    assert len([line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]) == EPOCHS
    assert "![The training loss and the evaluations](loss.png)" in text and (trained / "best" / "loss.png").exists()


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
    """main() called twice in one Python process (a notebook): Accelerate's process-wide state,
    which the first run fixes (precision, --torch_compile), is made anew for the second."""
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


# ---------------------------------------------------------------------------
# --streaming: text read as training goes, for corpora larger than the disk.
# ---------------------------------------------------------------------------


def test_a_stream_packs_like_a_token_file_and_resumes_at_any_block(tiny_gpt2, tmp_path):
    """The blocks of a stream are the token stream's blocks; and from the place after any block
    (mid-line, in a later batch of 1,000 lines, in a line that makes several blocks), a new
    stream goes on with the next block."""

    lines = repetitive_lines(2_500, seed=4)
    lines[1_500] = " ".join(lines[:40])  # one line of several blocks
    path = tmp_path / "stream.txt"
    path.write_text("\n".join(lines) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)

    def stream():
        text = datasets.load_dataset("text", data_files=str(path), split="train", streaming=True, keep_linebreaks=True)
        return streaming.StreamedBlocks(text, lambda batch: tokenizer(batch)["input_ids"], BLOCK)

    first = stream()
    first.start_at(None, keep=10_000)  # the places of every block: any can be resumed from
    blocks = [sample["input_ids"].tolist() for sample in first]
    tokens = stream_of_tokens(tokenizer, path)
    assert [t for block in blocks for t in block] == tokens[: len(blocks) * BLOCK]
    assert len(tokens) - len(blocks) * BLOCK < BLOCK
    assert len(blocks) < 10_000
    for used in (1, 7, 1_010, len(blocks) - 3):
        again = stream()
        again.start_at(json.loads(json.dumps(first.position_after(used))), keep=1)  # as a checkpoint stores it
        assert [sample["input_ids"].tolist() for sample in again] == blocks[used:], used


def test_a_stream_keeps_the_places_a_large_job_needs(tmp_path):
    """On 313 processes of 32 blocks each (pretrain_mlm's default batch), one micro-batch is
    10,016 blocks: a checkpoint after two of them needs the place of block 20,032 while the
    DataLoader has read a micro-batch further. A fixed 10,000 places kept lost it, and the
    resumed run started over from the stream's first block."""

    text = datasets.Dataset.from_dict({"text": ["a b c d"] * 16_000}).to_iterable_dataset()
    micro_batch = 32 * 313
    stream = streaming.StreamedBlocks(text, lambda lines: [[1, 2, 3, 4] for _ in lines], block_size=2)
    stream.start_at(None, keep=8 * micro_batch)  # what Run keeps for this job
    blocks = iter(stream)
    for _ in range(3 * micro_batch):  # two micro-batches used, the third read ahead
        next(blocks)
    place = stream.position_after(2 * micro_batch)
    assert place is not None and place["given"] == 2 * micro_batch


def test_streaming_trains_and_a_killed_run_resumes_at_its_place_in_the_stream(tiny_gpt2, text_files, tmp_path):
    runs = []
    for name, stop in (("uninterrupted", None), ("killed", [9, 4, str(tmp_path / "killed")]), ("rerun", None)):
        out = tmp_path / ("killed" if name != "uninterrupted" else "uninterrupted")
        # 13 steps, a checkpoint every 2: the last one is the end's, and holds the place too.
        argv_ = argv(tiny_gpt2, *text_files, out, "--streaming", "--max_train_steps", 13, "--checkpointing_steps", 2)
        if name == "uninterrupted":  # best/ scored on test text, streamed like the rest
            argv_ += ["--test_file", text_files[1]]
        runs.append({"script": "finetune_gpt2", "argv": argv_ + ["--max_new_tokens", 0], "engine": "one"})
        runs[-1] |= {"name": name, "signal_when_saved": stop} if stop else {"name": name}
    assert helpers.launch(runs, tmp_path / "logs") == [0, -9, 0], helpers.log_of(runs[1])[-2000:]
    assert "Resumed from" in helpers.log_of(runs[2]) and "streamed training" in helpers.log_of(runs[0])
    assert final_weights(tmp_path / "killed") == final_weights(tmp_path / "uninterrupted")
    state = newest_state(tmp_path / "uninterrupted")
    assert state["completed_steps"] == 13 and state["stream_position"]["given"] == 13 * 8  # 13 steps of 8 blocks
    assert "test_loss" in json.loads((tmp_path / "uninterrupted" / "eval_results.json").read_text())


def test_streaming_says_what_it_cannot_do(tiny_gpt2, text_files, tmp_path, capsys):
    train, valid = text_files
    line = run_bad(argv(tiny_gpt2, train, valid, tmp_path / "a", "--streaming"), capsys)
    assert "--streaming needs --max_train_steps" in line
    assert not (tmp_path / "a").exists()  # said before anything is touched
    line = run_bad(argv(tiny_gpt2, train, None, tmp_path / "b", "--streaming", "--max_train_steps", 2), capsys)
    assert "cannot hold out --validation_split_percentage" in line and "--validation_file" in line
    short = tmp_path / "short.txt"
    short.write_text("too short\n")  # fewer tokens than one block: a stream is only found short when read
    line = run_bad(argv(tiny_gpt2, train, short, tmp_path / "c", "--streaming", "--max_train_steps", 2), capsys)
    assert "validation text is too short for one sample" in line
