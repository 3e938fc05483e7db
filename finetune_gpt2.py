"""Fine-tune GPT-2 (or any causal language model) on plain text, then generate from a prompt.

    python finetune_gpt2.py                                  # gpt2 on WikiText-2 raw
    python finetune_gpt2.py --train_file my_text.txt --block_size 512
    python finetune_gpt2.py --model_name_or_path outputs/finetune_gpt2/best --output_dir out/more
    accelerate launch finetune_gpt2.py ...                   # any number of GPUs or TPU cores

The text is tokenized once and packed into blocks of --block_size tokens: no padding, every
position is a prediction. Each epoch reports the loss and the perplexity, exp(mean loss per
predicted token); the best model goes to <output_dir>/best, and at the end a sample continues
--prompt (saved to samples.txt). Re-running the same command continues from the newest checkpoint
in --output_dir."""

import math
import tarfile
from pathlib import Path

import torch.nn.functional as F
from accelerate import PartialState  # print() on the main process only, from anywhere
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    default_data_collator,
    get_scheduler,
    pipeline,
    set_seed,
)

import common
from machinery import engines, evaluation, flags, throughput, xla
from machinery.data_files import from_pretrained
from machinery.errors import UserError
from machinery.text_samples import language_model_samples, load_texts, token_samples

# Flags that may change on resume, besides the shared ones: they only shape the final sample.
MAY_CHANGE = ["prompt", "max_new_tokens", "top_k", "top_p", "temperature", "archive"]
ABOUT = {"pipeline_tag": "text-generation", "task": "generating text (causal language modeling)"}  # model card


def parse_args(argv=None):
    defaults = {"model_name_or_path": "gpt2", "dataset_name": "wikitext", "dataset_config_name": "wikitext-2-raw-v1"}
    parser = flags.build_parser(__doc__, per_device_train_batch_size=4, per_device_eval_batch_size=8, **defaults)
    a = parser.add_argument
    a("--block_size", type=int, help="tokens per sample (default: the smaller of 1024 and the model's maximum)")
    a("--prompt", default="= Toronto Raptors =", help="text the sample at the end continues")
    a("--max_new_tokens", type=int, default=100, help="length of the sample (0: no sample)")
    a("--top_k", type=int, default=50, help="sample from the k likeliest tokens (0: all)")
    a("--top_p", type=float, default=0.95, help="... whose probabilities add up to p (1: all)")
    a("--temperature", type=float, default=1.0, help="below 1: safer, above 1: wilder (0: greedy)")
    a("--archive", action="store_true", help="also write <output_dir>.tar.gz of the best model")
    args = parser.parse_args(argv)
    # Checked before training: a bad sampling flag must not surface only after hours of it.
    if args.max_new_tokens < 0 or args.top_k < 0 or args.temperature < 0:
        raise UserError("--max_new_tokens, --top_k and --temperature cannot be negative")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top_p must be more than 0 and at most 1 (got {args.top_p})")
    return args


def train(args):
    accelerator = common.setup(args, "finetune_gpt2")  # the device, its precision, the processes
    tokenizer, model, block_size = load_model(args)
    train_data, eval_data, test_data = get_data(args, accelerator, tokenizer, block_size)
    # Every block has block_size tokens: batches are stacked, never padded.
    dataloaders = common.make_dataloaders(args, accelerator, default_data_collator, train_data, eval_data, test_data)
    train_dataloader, eval_dataloader, test_dataloader = dataloaders
    if args.eval_only:  # no training: the model as it is, prepared there, on the validation (and test) text
        return evaluation.evaluate_only(accelerator, args, model, run_evaluation, eval_dataloader, test_dataloader)

    steps = common.count_steps(args, accelerator, train_dataloader)  # optimizer steps: per epoch, in all
    optimizer = common.make_optimizer(model, args, accelerator.device)
    lr_scheduler = get_scheduler(args.lr_scheduler_type, optimizer, args.num_warmup_steps, steps.total)
    flops = throughput.flops_per_token(model, block_size)  # counted now: prepare() may split the weights
    engines.set_fsdp_units(accelerator, model)  # FSDP only: which layers it shards as units
    # One call for all: an engine (DDP, FSDP, DeepSpeed) wraps the model, its optimizer and its
    # schedule together, and each dataloader learns to give each process its share of every batch.
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler
    )
    # Resuming a checkpoint of other flags, block size, vocabulary or number of blocks is refused.
    train_blocks = None if args.streaming else len(train_data)  # (a stream's length is not known)
    data = {"block_size": block_size, "vocab_size": len(tokenizer), "train_blocks": train_blocks}
    stream = train_data if args.streaming else None  # --streaming: checkpoints save the place in it
    checkpoints = common.Checkpoints(accelerator, args, data, MAY_CHANGE, stream)
    best = common.BestModel(accelerator, args, model, tokenizer, "loss", ABOUT)  # best/: the lowest loss
    state = checkpoints.resume()  # the newest whole checkpoint (made with other settings: refused), or step 0
    progress = common.Progress(accelerator, args, state, steps, flops)  # the plan, the bar, the logs
    common.catch_stop_signals()  # from here on, SIGTERM and Ctrl-C ask the loop to save, then stop

    while not common.finished(state, steps):  # the same in each script but for lines marked "this script"
        model.train()  # dropout on (the evaluation turns it off)
        train_dataloader.set_epoch(state.epoch)  # the epoch's order depends only on the seed and the epoch
        batches = common.EpochBatches(accelerator, train_dataloader, state, steps, args.seed)  # this script: as is
        train_one_epoch(args, accelerator, model, optimizer, lr_scheduler, batches, state, checkpoints, progress)
        if batches.ran_out:  # all the epoch's batches were used (--max_train_steps may end a run mid-epoch)
            state.start_next_epoch()
        with progress.paused():  # evaluating and saving are not training: left out of tokens/s
            metrics = run_evaluation(accelerator, model, eval_dataloader)  # this script: its metrics
            progress.log_evaluation(metrics)
            best.keep_if_better(state, metrics)  # exports best/ when the metric improves
            common.stop_early_if_stuck(accelerator, args, state, best.metric_name)  # ends the while if so
            state.evaluated_step = state.completed_steps  # in the checkpoint: this step is evaluated
            checkpoints.save(state)
        common.stop_if_signalled(accelerator, state)  # SIGTERM or Ctrl-C came meanwhile: saved, now stop

    progress.bar.close()
    # --test_file: best/ loaded and prepared there, scored on held-out text (None without it)
    test_metrics = evaluation.score_best(accelerator, AutoModelForCausalLM, best.dir, run_evaluation, test_dataloader)
    common.finish(accelerator, args, state, best, test_metrics)  # log_history.json, loss.png, best/'s card
    if accelerator.is_main_process:  # the demo, once: best/ loaded as users load it
        generate_sample(args, best.dir, Path(args.output_dir) / "samples.txt", xla.pipeline_device(accelerator))
        if args.archive:
            archive(best.dir, args.output_dir)
    return state


def train_one_epoch(args, accelerator, model, optimizer, lr_scheduler, batches, state, checkpoints, progress):
    """The rest of one epoch, and each optimizer step's bookkeeping. Lines marked "this script"
    are the only ones that differ between the three scripts' loops."""
    for batch in batches:
        with accelerator.accumulate(model):  # an optimizer step every --gradient_accumulation_steps
            # this script: labels = inputs (the model shifts them by one position itself)
            outputs = model(input_ids=batch["input_ids"], labels=batch["input_ids"])  # this script
            accelerator.backward(outputs.loss)  # scaled for fp16, divided over the accumulated batches
            if accelerator.sync_gradients and args.max_grad_norm:  # a step's last batch: gradients whole
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            # accumulate() makes step() and zero_grad() act on each step's last batch only.
            # The schedule is ours to keep: once per optimizer step, not when fp16 skipped one.
            optimizer.step()
            if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                lr_scheduler.step()
            optimizer.zero_grad()
        state.batch_in_epoch += 1  # a resumed run skips the batches counted here
        progress.add_batch(outputs.loss, batch["input_ids"].numel())  # this script: every token is real
        if not accelerator.sync_gradients:
            continue  # a micro-batch of an accumulation: no optimizer step yet
        state.completed_steps += 1
        progress.log_if_due(lr_scheduler)  # the bar moves; the loss is logged every --logging_steps
        if checkpoints.due(state):  # every --checkpointing_steps, --save_every_minutes, or on a signal
            with progress.paused():  # saving is not training either
                checkpoints.save(state)
            common.stop_if_signalled(accelerator, state)  # SIGTERM or Ctrl-C: saved, now stop


def load_model(args):
    """The tokenizer, the model, and the block size: --block_size, or the smaller of 1024 and the
    model's maximum."""
    tokenizer = from_pretrained(AutoTokenizer, args.model_name_or_path, "tokenizer")
    if tokenizer.eos_token_id is None:  # the sample at the end pads with it
        raise UserError(
            f"the tokenizer of {args.model_name_or_path} has no end-of-text token (eos_token); give it one "
            "(e.g. '<|endoftext|>', as GPT-2's) or use a causal-LM tokenizer that has it"
        )
    model = from_pretrained(AutoModelForCausalLM, args.model_name_or_path)
    PartialState().print(f"{args.model_name_or_path}: {model.num_parameters():,} parameters")
    most = max_positions(model, tokenizer)
    if args.block_size is None:
        return tokenizer, model, min(1024, most)
    if not 2 <= args.block_size <= most:
        raise UserError(
            f"--block_size {args.block_size} is not between 2 and the model's maximum of {most} positions; "
            f"use --block_size {most} or less"
        )
    return tokenizer, model, args.block_size


def max_positions(model, tokenizer):
    """Tokens the model sees at once: in its config (GPT-2), or with no position table (ALiBi)
    its tokenizer's limit."""
    return getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length


def get_data(args, accelerator, tokenizer, block_size):
    """The training, validation and (--test_file) test blocks. --eval_only needs no training
    blocks."""
    texts = load_texts(args, accelerator)

    def blocks_of(text, split_name):
        return tokenize_and_pack(text, tokenizer, block_size, split_name, args)

    return language_model_samples(args, accelerator, texts, blocks_of, f"blocks of {block_size} tokens")


def tokenize_and_pack(texts, tokenizer, block_size, split_name, args):
    """All lines tokenized into one stream (a token file, made once and reused; with --streaming,
    tokenized as training reads them), cut into blocks of exactly block_size tokens. Only the
    final partial block is left out."""

    def tokenize(lines):
        return tokenizer(lines)["input_ids"]

    blocks = token_samples(texts, tokenize, tokenizer, args, split_name, recipe="causal-lm", block_size=block_size)
    if not args.streaming and len(blocks) == 0:
        found = blocks.token_file.num_tokens
        raise UserError(
            f"the {split_name} text has {found} tokens: fewer than one block of --block_size {block_size}; "
            f"add text or pass --block_size {max(2, found)} or less"
        )
    return blocks


def run_evaluation(accelerator, model, eval_dataloader):
    """Loss per predicted token over the whole validation text, and its perplexity."""

    def per_example(model, batch):
        logits = model(input_ids=batch["input_ids"]).logits.float()
        # Position t predicts token t+1: the model shifts the labels the same way.
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
        return {"loss": losses.mean(dim=1)}  # one number per block

    out = common.eval_loop(accelerator, model, eval_dataloader, per_example)
    # The mean over blocks, not over batches (a small last batch weighs what it holds): every block
    # predicts as many tokens, so it is the mean over tokens too.
    loss = out["loss"].mean().item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50))}  # capped: exp(a diverged loss) overflows


def generate_sample(args, model_dir, path, device):
    """Continue --prompt with the exported model, loaded as users will load it."""
    if args.max_new_tokens == 0:
        return None
    generator = pipeline("text-generation", model=str(model_dir), device=device)
    # The model sees at most max_positions tokens: the prompt and what it adds.
    room = max_positions(generator.model, generator.tokenizer) - len(generator.tokenizer(args.prompt)["input_ids"])
    if room < 1:
        print("\nThe prompt is longer than the model's positions: no sample")
        return None
    set_seed(args.seed)  # the same sample for the same model and settings
    # GPT-2 has no padding token: generate() is told to use its end-of-text token (else it warns).
    options = {"max_new_tokens": min(args.max_new_tokens, room), "pad_token_id": generator.tokenizer.eos_token_id}
    if args.temperature == 0:
        options["do_sample"] = False  # always the likeliest token
    else:
        options.update(do_sample=True, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature)
    text = generator(args.prompt, **options)[0]["generated_text"]
    print(f"\nSample from {model_dir}:\n{text}\n")
    path.write_text(text + "\n")
    return text


def archive(model_dir, output_dir):
    """<output_dir>.tar.gz of the exported model, next to the output folder (on Drive when the
    output is there); written under a temporary name, then renamed."""
    target = Path(f"{output_dir}.tar.gz")
    tmp = target.with_name(f".tmp-{target.name}")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(model_dir, arcname=Path(output_dir).name)
    tmp.replace(target)
    print(f"Archived {model_dir} to {target}")


def main(argv=None):
    return common.run_script(train, parse_args, argv)


if __name__ == "__main__":
    main()
