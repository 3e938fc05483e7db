"""pretrain_mlm.py end to end: tokenizer from scratch, a tiny RoBERTa, masked-LM training."""

import json
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import helpers
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast, pipeline

import pretrain_mlm
from machinery import fixed_masks

SUBJECTS = ["the cat", "a dog", "my bird", "the fox", "our fish", "the horse"]
VERBS = ["sat on", "ran to", "looked at", "jumped over", "slept near"]
PLACES = ["the mat .", "the house .", "a tree .", "the river .", "the old wall ."]
EPOCHS = 4


def repetitive_lines(n, seed):
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(PLACES)}" for _ in range(n)]


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    (d / "train.txt").write_text("\n".join(repetitive_lines(600, seed=1)) + "\n")
    (d / "valid.txt").write_text("\n".join(repetitive_lines(80, seed=2)) + "\n")
    return d / "train.txt", d / "valid.txt"


def argv(train, valid, out, *extra):
    base = ["--train_file", train, "--validation_file", valid, "--output_dir", out]
    base += ["--vocab_size", 300, "--min_frequency", 2, "--max_seq_length", 32, "--max_position_embeddings", 34]
    base += ["--num_hidden_layers", 2, "--hidden_size", 64, "--num_attention_heads", 2, "--intermediate_size", 128]
    base += ["--learning_rate", "1e-3", "--num_warmup_steps", 10]
    base += ["--per_device_train_batch_size", 8, "--per_device_eval_batch_size", 6]
    base += ["--num_train_epochs", EPOCHS, "--logging_steps", 2, "--save_every_minutes", 0]
    base += ["--fill_mask_prompt", "the cat sat on the <mask> ."]
    return [str(a) for a in base + list(extra)]


def checkpoints(out):
    return sorted((Path(out) / "checkpoints").iterdir())


def final_weights(out):
    return (checkpoints(out)[-1] / "model.safetensors").read_bytes()


def newest_state(out):
    return json.loads((checkpoints(out)[-1] / "training_state.json").read_text())["state"]


@torch.no_grad()
def hand_masked_lm_loss(model_dir, path, block=32, seed=42, probability=0.15):
    """The masked-LM loss of a saved model on a text file, by hand: every non-blank line with <s>
    ... </s>, in one stream cut into blocks, block i masked by a generator seeded with seed + i;
    the mean over masked tokens."""
    from transformers import AutoModelForMaskedLM, DataCollatorForLanguageModeling

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    stream = [t for line in lines for t in tokenizer(line)["input_ids"]]
    masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=probability)
    total, masked = 0.0, 0
    for i in range(len(stream) // block):
        ids = torch.tensor(stream[i * block : (i + 1) * block])[None]
        special = torch.tensor(tokenizer.get_special_tokens_mask(ids[0].tolist(), already_has_special_tokens=True))
        masker.generator = torch.Generator().manual_seed(seed + i)
        inputs, labels = masker.torch_mask_tokens(ids.clone(), special_tokens_mask=special[None])
        logits = model(input_ids=inputs).logits
        total += torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="sum").item()
        masked += (labels != -100).sum().item()
    return total / masked


@pytest.fixture(scope="module")
def trained(text_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    pretrain_mlm.main(argv(*text_files, out, "--test_file", text_files[1]))
    return out


def test_tokenizer_round_trips_and_knows_its_special_tokens(trained):
    tokenizer = AutoTokenizer.from_pretrained(trained)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == 300
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]]
    assert ids == [0, 1, 2, 3, 4]
    assert (tokenizer.bos_token, tokenizer.pad_token, tokenizer.eos_token) == ("<s>", "<pad>", "</s>")
    assert tokenizer.mask_token == "<mask>"
    for text in ["the cat sat on the mat .", "A new Zebra, unseen: ünïcödé 123!"]:
        encoded = tokenizer(text)["input_ids"]
        assert encoded[0] == 0 and encoded[-1] == 2  # <s> ... </s>, as RoBERTa
        assert tokenizer.decode(encoded, skip_special_tokens=True) == text  # byte-level: nothing is lost
    assert len(tokenizer("word " * 1000, truncation=True)["input_ids"]) == 32  # the model's length


def test_default_configuration_has_the_documented_parameter_count():
    args = pretrain_mlm.parse_args([])
    assert (args.num_hidden_layers, args.num_attention_heads, args.hidden_size) == (6, 12, 768)
    assert (args.max_position_embeddings, args.vocab_size) == (514, 52_000)
    # Only the vocabulary size and the special ids of the tokenizer matter to the model.
    tokenizer = type("Vocab", (), {"__len__": lambda self: 52_000, "pad_token_id": 1, "bos_token_id": 0})()
    tokenizer.eos_token_id = 2
    with torch.device("meta"):  # counted, not allocated or trained
        model = pretrain_mlm.new_model(args, tokenizer)
    assert sum(p.numel() for p in model.parameters()) == 83_504_416


def test_masked_lm_loss_falls_well_below_its_start(trained):
    history = json.loads((trained / "log_history.json").read_text())
    first_train_loss = [e["train_loss"] for e in history if "train_loss" in e][0]
    best = json.loads((trained / "eval_results.json").read_text())
    assert first_train_loss > 4.5  # about ln(300): a uniform guess
    assert best["loss"] < 0.65 * first_train_loss
    evals = [e["eval_loss"] for e in history if "eval_loss" in e]
    assert len(evals) == EPOCHS


def test_exported_model_fills_the_mask(trained, text_files):
    fill = pipeline("fill-mask", model=str(trained / "best"))
    guesses = fill("the cat sat on the <mask> .", top_k=5)
    assert len(guesses) == 5 and all("the cat sat on the" in g["sequence"] for g in guesses)
    # Trained, not just loaded: its guesses are pieces of the training text, each far likelier than
    # a uniform guess over the 300 tokens (an untrained model's top guess has about 1/300).
    text = text_files[0].read_text()
    assert all(g["token_str"].strip() in text for g in guesses) and guesses[0]["score"] > 10 / 300


def test_best_is_scored_on_the_test_file_with_fixed_masks_and_eval_only_too(trained, text_files, tmp_path):
    from huggingface_hub import ModelCard

    by_hand = hand_masked_lm_loss(trained / "best", text_files[1])
    assert json.loads((trained / "eval_results.json").read_text())["test_loss"] == pytest.approx(by_hand, rel=1e-5)
    out = tmp_path / "eval"
    best = ["--model_name_or_path", trained / "best", "--eval_only", "--test_file", text_files[1]]
    metrics = pretrain_mlm.main(argv(*text_files, out, *best))
    assert metrics["loss"] == pytest.approx(by_hand, rel=1e-5) and metrics["test_loss"] == metrics["loss"]
    card = ModelCard.load(trained / "best" / "README.md")
    assert card.data.pipeline_tag == "fill-mask" and card.data.base_model is None
    assert "trained from scratch (RobertaConfig: num_hidden_layers 2, hidden_size 64" in card.text


def test_resumed_run_reuses_the_saved_tokenizer(trained, text_files, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    saved = (out / "tokenizer.json").read_bytes()

    def must_not_train(*args):
        raise AssertionError("the tokenizer was trained again under an existing checkpoint")

    monkeypatch.setattr(pretrain_mlm, "train_tokenizer", must_not_train)
    state = pretrain_mlm.main(argv(*text_files, out, "--num_train_epochs", EPOCHS + 1))
    assert state.epoch == EPOCHS + 1
    assert (out / "tokenizer.json").read_bytes() == saved
    assert AutoTokenizer.from_pretrained(out / "best").get_vocab() == AutoTokenizer.from_pretrained(out).get_vocab()


def test_evaluation_masks_the_same_way_every_time(trained, text_files):
    """One model evaluated twice, from other global random states (which training's masking draws
    from), and on batches of other sizes: the same masks each time, so the same loss, which a
    hand computation (block i masked by a generator seeded with --seed + i) gives too. On any
    number of processes the same: test_launch_paths.py."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers import AutoModelForMaskedLM, default_data_collator

    from machinery import text_samples

    args = pretrain_mlm.parse_args(argv(*text_files, "unused"))
    tokenizer = AutoTokenizer.from_pretrained(trained / "best")
    model = AutoModelForMaskedLM.from_pretrained(trained / "best")
    _, eval_text = text_samples.load_text_data(args, keep_linebreaks=False)
    samples = fixed_masks.FixedMasks(
        pretrain_mlm.prepare_data(eval_text, "validation", tokenizer, args), tokenizer, args
    )
    losses = []
    for seed, batch_size in ((1, 6), (2, 7)):
        torch.manual_seed(seed)
        batches = DataLoader(samples, batch_size, collate_fn=default_data_collator)
        losses.append(pretrain_mlm.run_evaluation(Accelerator(cpu=True), model, batches)["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert losses[0] == pytest.approx(hand_masked_lm_loss(trained / "best", text_files[1]), rel=1e-5)


def test_training_masks_draw_what_the_collator_draws(trained):
    """mask_tokens chooses with torch.where (fixed shapes, for XLA: tests/test_xla.py) where
    DataCollatorForLanguageModeling indexes with masks: from the same random state, the same inputs
    and labels, special tokens never masked."""
    from transformers import DataCollatorForLanguageModeling

    tokenizer = AutoTokenizer.from_pretrained(trained / "best")
    masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.3)
    ids = torch.randint(len(tokenizer.all_special_ids), len(tokenizer), (32, 24))
    special = torch.zeros_like(ids)
    special[:, [0, -1]] = 1
    batch = {"input_ids": ids, "special_tokens_mask": special, "attention_mask": torch.ones_like(ids)}
    torch.manual_seed(0)
    ours = pretrain_mlm.mask_tokens(masker, batch, torch.device("cpu"))
    torch.manual_seed(0)
    input_ids, labels = masker.torch_mask_tokens(ids.clone(), special_tokens_mask=special)
    assert torch.equal(ours["input_ids"], input_ids) and torch.equal(ours["labels"], labels)
    masked = labels != -100
    assert masked.sum() > 100 and not masked[:, [0, -1]].any()
    assert (input_ids[masked] == tokenizer.mask_token_id).float().mean() > 0.6  # 80% <mask>, the rest random or kept
    assert torch.equal(ids, batch["input_ids"])  # the batch itself untouched


def test_line_by_line(text_files, tmp_path, capsys):
    state = pretrain_mlm.main(argv(*text_files, tmp_path / "lines", "--line_by_line", "--max_train_steps", 6))
    assert state.completed_steps == 6
    assert any("eval_perplexity" in e for e in state.log_history)
    # One sample per line (600 and 80 of them), not packed blocks (far fewer: a line is about 8
    # tokens).
    assert "600 training and 80 validation samples of up to 32 tokens" in capsys.readouterr().out


def test_packed_and_line_by_line_tokens_are_other_files_of_the_same_text(trained, text_files):
    """The token file's name includes how lines were cut: packing keeps whole lines, while
    --line_by_line cuts each to --max_seq_length. Made from the same text by the same tokenizer,
    one after the other, the cut lines are not read from the file of whole ones."""
    import argparse

    import datasets

    tokenizer = AutoTokenizer.from_pretrained(trained / "best")
    texts = datasets.load_dataset("text", data_files=str(text_files[0]), split="train")
    flags = {"streaming": False, "preprocessing_num_workers": 1, "max_seq_length": 6}
    packed = pretrain_mlm.prepare_data(texts, "training", tokenizer, argparse.Namespace(line_by_line=False, **flags))
    lines = pretrain_mlm.prepare_data(texts, "training", tokenizer, argparse.Namespace(line_by_line=True, **flags))
    assert packed.token_file.tokens_path != lines.token_file.tokens_path
    assert max(len(lines[i]["input_ids"]) for i in range(len(lines))) == 6  # the lines are longer: cut


# ---------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing damaged.
# ---------------------------------------------------------------------------


def run_bad(args, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        pretrain_mlm.main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_input(trained, text_files, tmp_path, capsys):
    train, valid = text_files
    before = helpers.digest(trained)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n\n")
    cases = {
        "no text": (argv(empty, valid, trained), ["empty"]),
        "vocabulary below the byte symbols": (argv(train, valid, trained, "--vocab_size", 200), ["261"]),
        "prompt without <mask>": (argv(train, valid, trained, "--fill_mask_prompt", "no mask here"), ["<mask>"]),
        "missing file": (argv(tmp_path / "nope.txt", valid, trained), ["not found"]),
    }
    for name, (args, words) in cases.items():
        line = run_bad(args, capsys)
        for word in words:
            assert word in line, (name, line)
    assert helpers.digest(trained) == before


def test_a_small_text_trains_with_the_vocabulary_it_yields(text_files, tmp_path, capsys):
    """Asked for more tokens than the text has words and merges for: the tokenizer stops where
    the text does, says so, and the model is sized to it (as the tutorial went on)."""
    state = pretrain_mlm.main(argv(*text_files, tmp_path / "small", "--vocab_size", 5000, "--max_train_steps", 2))
    assert state.completed_steps == 2
    got = len(AutoTokenizer.from_pretrained(tmp_path / "small"))
    assert 261 < got < 5000
    assert f"yields {got:,} tokens at --min_frequency 2, fewer than --vocab_size 5,000" in capsys.readouterr().out
    config = json.loads((tmp_path / "small" / "best" / "config.json").read_text())
    assert config["vocab_size"] == got


WORDS = (
    "the of and to a in that it was he her his she had you i not with as for be at on my by all but which so "
    "from they this were what have would no mr been one very there could their them when said an will more "
    "said elizabeth darcy bennet jane bingley sister mother lady room house time little great good think know"
).split()


def write_book(path, title, chapters, seed):
    """A short novel as Project Gutenberg prints one: a title block, CHAPTER headings and
    paragraphs hard-wrapped at 70 columns."""
    import textwrap

    rng = random.Random(seed)
    lines = [f"The Project Gutenberg eBook of {title}", "", f"Title: {title}", "", ""]
    for chapter in range(1, chapters + 1):
        lines += [f"CHAPTER {chapter}.", ""]
        for _ in range(6):
            words = [rng.choice(WORDS[: rng.randint(10, len(WORDS))]) for _ in range(rng.randint(30, 90))]
            paragraph = " ".join(words).capitalize() + "."
            lines += textwrap.wrap(paragraph, 70) + [""]
    path.write_text("\n".join(lines))


def test_the_readme_books_example_runs_as_printed(tmp_path):
    """`python pretrain_mlm.py --train_file "books/*.txt"`, word for word from the README, with
    every default (the tutorial's 52,000-token vocabulary, 6 x 768 RoBERTa, one epoch), on two
    short books: the text yields fewer tokens than asked, and the run goes on with them."""
    readme = (helpers.REPO / "README.md").read_text()
    command = next(
        line for line in readme.splitlines() if line.startswith('python pretrain_mlm.py --train_file "books')
    )
    args = shlex.split(command.split("#")[0])[2:]
    (tmp_path / "books").mkdir()
    write_book(tmp_path / "books" / "novel.txt", "A Novel", chapters=4, seed=1)
    write_book(tmp_path / "books" / "tales.txt", "Some Tales", chapters=3, seed=2)
    proc = subprocess.run(
        [sys.executable, str(helpers.REPO / "pretrain_mlm.py"), *args],
        cwd=tmp_path,
        env=helpers.offline_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fewer than --vocab_size 52,000: the tokenizer and the model use" in proc.stdout
    out = tmp_path / "outputs" / "pretrain_mlm"
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["vocab_size"] == len(AutoTokenizer.from_pretrained(out)) < 52_000
    assert (config["num_hidden_layers"], config["hidden_size"]) == (6, 768)
    assert "Human thinking involves human" in proc.stdout  # the fill-mask demo ran
