"""The flags every script takes, named as in Hugging Face's example scripts, with --help showing
each default once, and the settings that can never work refused before anything is touched; the
command line written down (for the model card) without the Hub token.

Tests (in tests/, unless named otherwise):
- test_readme.py::test_help_shows_each_flag_default_once
- test_every_script.py::test_bad_input_sweep
- test_common.py::test_the_command_line_never_holds_the_hub_token"""

import argparse
import shlex

from machinery.colab import DRIVE_ROOT
from machinery.errors import UserError


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default once: a help text that says its own default ("default:
    every core") keeps it, rather than getting a second "(default: None)" after it."""

    def _get_help_string(self, action):
        if "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(docstring, **defaults):
    """The flags every script takes (names as in Hugging Face's examples), with its `defaults`;
    it adds its own."""
    description = docstring.split("\n")[0]
    p = argparse.ArgumentParser(description=description, formatter_class=HelpWithDefaults)
    a = p.add_argument
    a("--model_name_or_path", help="hub name or local folder of the model to start from")
    a("--dataset_name", help="hub data set, or a folder saved with save_to_disk (when no --train_file)")
    a("--dataset_config_name", help="configuration of --dataset_name")
    a("--train_file", help="local training data")
    a("--validation_file", help="local validation data")
    a("--test_file", help="local test data, scored (or, for the classifier, predicted) with best/ after training")
    a("--validation_split_percentage", type=int, default=10, help="held out when there is no validation data")
    a("--max_train_samples", type=int, help="use only this many training samples (quick runs)")
    a("--max_eval_samples", type=int, help="use only this many validation samples (quick runs)")
    a("--preprocessing_num_workers", type=int, help="tokenizing processes, one core each (default: every core)")
    a(
        "--streaming",
        action="store_true",
        help="read the data as training goes (larger than the disk); needs --max_train_steps",
    )
    a("--output_dir", help=f"checkpoints and the model (default: outputs/<script>, in Colab {DRIVE_ROOT}/...)")
    a("--drive", action="store_true", help="Colab: put the outputs on Google Drive")
    a("--per_device_train_batch_size", type=int, default=8, help="batch size per GPU or process")
    a("--per_device_eval_batch_size", type=int, default=32, help="evaluation batch size per GPU or process")
    a("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    a("--learning_rate", type=float, default=5e-5, help="AdamW's peak learning rate")
    a("--weight_decay", type=float, default=0.0, help="AdamW's decay (never on biases and norms)")
    a("--max_grad_norm", type=float, default=1.0, help="clip gradients to this norm (0: off)")
    schedules = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]
    a("--lr_scheduler_type", default="linear", choices=schedules, help="how the learning rate changes")
    a("--num_warmup_steps", type=int, default=0, help="warmup, in optimizer steps")
    a("--num_train_epochs", type=int, default=3, help="epochs to train")
    a("--max_train_steps", type=int, help="optimizer steps to train; overrides --num_train_epochs")
    a("--early_stopping_patience", type=int, default=0, help="stop after N evaluations without improvement (0: never)")
    a("--seed", type=int, default=42, help="model initialization, data order, dropout")
    a("--mixed_precision", default="auto", choices=["auto", "no", "fp16", "bf16"], help="auto: bf16, fp16 on a T4")
    a("--torch_compile", action="store_true", help="compile the model (pays off on GPUs, fixed shapes, long runs)")
    a("--dataloader_num_workers", type=int, help="processes preparing batches (default: 2 on a GPU, 0 on CPU)")
    a("--checkpointing_steps", type=int, default=0, help="also save every N optimizer steps (0: off)")
    a("--save_every_minutes", type=float, default=10.0, help="also save every N minutes (0: off)")
    a("--keep_last", type=int, default=2, help="checkpoints to keep")
    a("--resume_from_checkpoint", help="resume from this checkpoint folder instead of the newest")
    a("--no_resume", action="store_true", help="start fresh, deleting the checkpoints in --output_dir")
    a("--logging_steps", type=int, default=10, help="log the training loss every N optimizer steps")
    a("--report_to", default="none", help="tensorboard, wandb, ... or all (Accelerate's trackers)")
    a("--eval_only", action="store_true", help="only evaluate --model_name_or_path (and --test_file), no training")
    a("--auto_find_batch_size", action="store_true", help="on a GPU out of memory: halve the batch, accumulate twice")
    a("--push_to_hub", action="store_true", help="upload best/ with its model card to the Hugging Face Hub at the end")
    a("--hub_model_id", help="the Hub repository (default: <your user>/<the output folder's name>)")
    a("--hub_token", help="a Hub token that may write there (default: the one `hf auth login` saved)")
    a("--hub_private_repo", action="store_true", help="make the Hub repository private")
    p.set_defaults(**defaults)
    return p


def check_args(args):
    """Settings that can never work get one clear line before anything is touched."""
    length = "num_train_epochs" if args.max_train_steps is None else "max_train_steps"
    sizes = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
    for name in (*sizes, length, "keep_last", "logging_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if not 0 < args.validation_split_percentage < 100:
        raise UserError("--validation_split_percentage must be between 1 and 99")
    if args.streaming and args.max_train_steps is None:
        raise UserError("--streaming needs --max_train_steps: a stream's length is not known before it ends")


def command_line(script, argv, secret=None):
    """The command that runs this again, as a shell reads it. The Hub token (`secret`) is never
    written down, however it was passed: `--hub_token T`, `--hub_token=T`, or an abbreviation
    argparse accepts, such as `--hub_tok T`."""
    argv = [str(arg) for arg in argv]
    if secret:
        argv = [arg.replace(secret, "$HF_TOKEN") for arg in argv]
    return shlex.join(["python", script, *argv])


def check_pretraining_flags(args, special_tokens, byte_symbols):
    """pretrain_mlm.py's own flags: values that can never work get one clear line before
    anything is touched."""
    if "<mask>" not in args.fill_mask_prompt:
        raise UserError(
            f"--fill_mask_prompt {args.fill_mask_prompt!r} has no <mask>; put <mask> where the model should fill in"
        )
    smallest = len(special_tokens) + byte_symbols
    if args.vocab_size < smallest:
        raise UserError(
            f"--vocab_size {args.vocab_size} is too small: the {len(special_tokens)} special tokens and "
            f"{byte_symbols} byte symbols alone take {smallest}; use --vocab_size {smallest} or more"
        )
    if args.eval_only and not args.model_name_or_path:
        raise UserError("--eval_only evaluates a trained model: pass it with --model_name_or_path")
    if not 0 < args.mlm_probability < 1:
        raise UserError(f"--mlm_probability must be between 0 and 1 (got {args.mlm_probability})")
    if args.max_seq_length > args.max_position_embeddings - 2:
        raise UserError(
            f"--max_seq_length {args.max_seq_length} needs --max_position_embeddings {args.max_seq_length + 2} "
            "or more (RoBERTa offsets positions by 2)"
        )
