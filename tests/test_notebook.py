"""The Colab notebook runs from top to bottom: its settings cell is replaced with tiny models and
data written here, no Drive, no install, no hub; everything else runs as users run it (the three
scripts as shell commands, GPT-2 on "your own text" and with --report_to tensorboard, then the
results cells). The cells that mount, flush or show need Colab and are skipped by the settings
(USE_DRIVE, INSTALL, SHOW_TENSORBOARD), as users skip them."""

import json
import os
import re
import sys
from pathlib import Path

import helpers
import nbformat
import test_finetune_gpt2 as gpt2_tests
from nbclient import NotebookClient

NOTEBOOK = helpers.REPO / "notebooks" / "colab_quickstart.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1


def test_notebook_runs_end_to_end(tiny_bert, toy_files, tmp_path, monkeypatch):
    text = tmp_path / "train.txt", tmp_path / "valid.txt"
    text[0].write_text("\n".join(gpt2_tests.repetitive_lines(200, seed=1)) + "\n")
    text[1].write_text("\n".join(gpt2_tests.repetitive_lines(40, seed=2)) + "\n")
    gpt2 = gpt2_tests.make_tiny_gpt2(tmp_path / "gpt2", text[0].read_text().splitlines())
    out = tmp_path / "out"
    launch = f"{sys.executable} -m accelerate.commands.launch --cpu --num_processes 1 --num_machines 1"
    launch += " --mixed_precision no --dynamo_backend no"
    quick = "--num_train_epochs 1 --save_every_minutes 0 --per_device_train_batch_size 16"
    settings = f"""
REPO_URL = None
USE_DRIVE = False
OUT = {str(out)!r}
INSTALL = False
LAUNCH = "{launch}"
CLASSIFIER_ARGS = (
    "--model_name_or_path {tiny_bert} --train_file {toy_files[0]} --validation_file {toy_files[1]} {quick}"
)
CLASSIFIER_EXAMPLE = ["w1 good w2", "w3 good"]
GPT2_ARGS = (
    "--model_name_or_path {gpt2} --train_file {text[0]} --validation_file {text[1]} --block_size 32 {quick} "
    "--report_to tensorboard"
)
MY_TEXT = {str(text[0])!r}
MY_PROMPT = "w1 w2"
MY_TEXT_ARGS = "--model_name_or_path {gpt2} --block_size 32 {quick}"
MLM_ARGS = (
    "--train_file {text[0]} --validation_file {text[1]} --vocab_size 300 --max_seq_length 32 "
    "--max_position_embeddings 34 --num_hidden_layers 1 --hidden_size 32 --num_attention_heads 2 "
    "--intermediate_size 64 {quick}"
)
FILL_MASK_PROMPT = "the cat sat on the <mask> ."
SHOW_TENSORBOARD = False
"""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = settings
    # The notebook's `!python ...` cells run the `python` on PATH: this interpreter's, as in Colab,
    # even when the tests run as <venv>/bin/python without the venv activated.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(helpers.REPO)}})
    client.execute()

    printed = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream"
    )
    assert re.search(r"'label': '(pos|neg)', 'score'", printed)  # the classifier's pipeline answered
    assert json.loads((out / "finetune_gpt2" / "eval_results.json").read_text())["perplexity"] > 0
    assert (out / "finetune_gpt2" / "samples.txt").read_text().startswith("= Toronto Raptors =")
    assert printed.count("the cat sat on the") >= 5  # the fill-mask top 5
    assert (out / "gpt2_my_text" / "samples.txt").read_text().startswith("w1 w2")  # your own text, your prompt
    assert list((out / "finetune_gpt2").rglob("events.out.tfevents.*"))  # what the TensorBoard cell shows
    for script in ("train_classifier", "finetune_gpt2", "pretrain_mlm"):
        assert (Path(out) / script / "loss.png").exists()
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the loss curves shown inline
