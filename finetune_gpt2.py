"""Fine-tune GPT-2 (or any causal language model) on plain text, then generate from a prompt.

    python finetune_gpt2.py                                  # gpt2 on WikiText-2 raw
    python finetune_gpt2.py --train_file my_text.txt --block_size 512
    python finetune_gpt2.py --model_name_or_path outputs/finetune_gpt2/best ...   # continue a tuned model
    accelerate launch finetune_gpt2.py ...                   # any number of GPUs or TPU cores

The text is tokenized once and packed into blocks of --block_size tokens: no padding,
every position is a prediction. Evaluation reports the loss and the perplexity,
exp(mean loss per predicted token). The best model goes to <output_dir>/best; at the
end a sample is generated from --prompt and saved to <output_dir>/samples.txt.
Re-running the same command continues from the newest checkpoint in --output_dir.
"""

import math
import shutil
import tarfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator, get_scheduler, pipeline, set_seed

import common


def parse_args(argv=None):
    parser = common.build_parser(__doc__.split("\n")[0])
    parser.add_argument(
        "--block_size",
        type=int,
        help="tokens per training sample (default: the smaller of 1024 and the model's maximum)",
    )
    parser.add_argument("--prompt", default="= Toronto Raptors =", help="text to continue at the end")
    parser.add_argument("--max_new_tokens", type=int, default=100, help="length of the sample (0: no sample)")
    parser.add_argument("--top_k", type=int, default=50, help="sample from the k likeliest tokens (0: all)")
    parser.add_argument("--top_p", type=float, default=0.95, help="... whose probabilities add up to p (1: all)")
    parser.add_argument("--temperature", type=float, default=1.0, help="below 1: safer, above 1: wilder (0: greedy)")
    parser.add_argument("--archive", action="store_true", help="also write <output_dir>.tar.gz of the best model")
    parser.set_defaults(
        model_name_or_path="gpt2",
        dataset_name="wikitext",
        dataset_config_name="wikitext-2-raw-v1",
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        num_train_epochs=3,
    )
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------
# Data: tokenize once, pack into blocks.
# ---------------------------------------------------------------------------


def load_tokenizer(name):
    tokenizer = common.from_pretrained(AutoTokenizer.from_pretrained, name, "tokenizer")
    if tokenizer.eos_token_id is None:
        raise common.UserError(
            f"the tokenizer of {name} has no end-of-text token (eos_token); give it one "
            "(e.g. '<|endoftext|>', as GPT-2's) or use a causal-LM tokenizer that has it"
        )
    return tokenizer


def check_generation_args(args):
    """Checked before training: a bad sampling flag must not surface only after hours of it."""
    if args.max_new_tokens < 0 or args.top_k < 0 or args.temperature < 0:
        raise common.UserError("--max_new_tokens, --top_k and --temperature cannot be negative")
    if not 0 < args.top_p <= 1:
        raise common.UserError(f"--top_p must be more than 0 and at most 1 (got {args.top_p})")


def max_positions(model, tokenizer):
    """How many tokens the model can see at once. GPT-2 says so in its config; a model with
    no position table (ALiBi, e.g. BLOOM) has none there, so ask its tokenizer instead."""
    return getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length


def choose_block_size(args, model_max):
    if args.block_size is None:
        return min(1024, model_max)
    if args.block_size < 2:
        raise common.UserError(f"--block_size must be at least 2 (got {args.block_size})")
    if args.block_size > model_max:
        raise common.UserError(
            f"--block_size {args.block_size} is more than the model's maximum of {model_max} positions; "
            f"use --block_size {model_max} or less"
        )
    return args.block_size


def tokenize_and_pack(texts, tokenizer, block_size, split_name):
    """Token ids of all lines, one stream, cut into blocks of exactly block_size tokens.
    Only the final partial block is dropped (map with batch_size=None sees the whole text)."""
    tokenized = texts.map(
        lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=texts.column_names, desc="tokenize"
    )
    tokenized = tokenized.remove_columns([c for c in tokenized.column_names if c != "input_ids"])
    blocks = tokenized.map(
        common.group_texts, batched=True, batch_size=None, fn_kwargs={"block_size": block_size}, desc="pack"
    )
    if len(blocks) == 0:
        found = sum(len(ids) for ids in tokenized["input_ids"])
        raise common.UserError(
            f"the {split_name} text has {found} tokens: fewer than one block of --block_size {block_size}; "
            f"add text or pass --block_size {max(2, found)} or less"
        )
    return blocks


# ---------------------------------------------------------------------------
# Evaluation: loss per predicted token, perplexity.
# ---------------------------------------------------------------------------


def run_evaluation(accelerator, model, eval_dataloader):
    def per_example(model, batch):
        logits = model(input_ids=batch["input_ids"]).logits.float()
        # Position t predicts token t+1: the model shifts labels the same way.
        shifted_logits, targets = logits[:, :-1], batch["input_ids"][:, 1:]
        losses = torch.nn.functional.cross_entropy(shifted_logits.transpose(1, 2), targets, reduction="none")
        return {"loss_sum": losses.sum(dim=1), "tokens": torch.full_like(losses[:, 0], targets.shape[1])}

    out = common.evaluate(accelerator, model, eval_dataloader, per_example)
    loss = (out["loss_sum"].sum() / out["tokens"].sum()).item()  # mean over tokens, not batches
    return {"loss": loss, "perplexity": math.exp(min(loss, 50))}


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def train(args):
    common.check_args(args)
    check_generation_args(args)
    output_dir = common.resolve_output_dir(args, "finetune_gpt2")
    accelerator = common.make_accelerator(args, output_dir)

    tokenizer = load_tokenizer(args.model_name_or_path)
    model = common.from_pretrained(AutoModelForCausalLM.from_pretrained, args.model_name_or_path)
    block_size = choose_block_size(args, max_positions(model, tokenizer))
    with accelerator.main_process_first():  # the main process tokenizes; the others read its cache
        train_text, eval_text = common.load_text_data(args)
        train_data = tokenize_and_pack(train_text, tokenizer, block_size, "training")
        eval_data = tokenize_and_pack(eval_text, tokenizer, block_size, "validation")
    accelerator.print(
        f"{args.model_name_or_path}: {common.params_summary(model)}; {len(train_data)} training and "
        f"{len(eval_data)} validation blocks of {block_size} tokens"
    )

    options = common.loader_options(args, accelerator.device)
    train_dataloader = DataLoader(
        train_data.with_format("torch"),
        shuffle=True,
        collate_fn=default_data_collator,
        batch_size=args.per_device_train_batch_size,
        generator=common.data_generator(args.seed),
        **options,
    )
    eval_dataloader = DataLoader(
        eval_data.with_format("torch"),
        collate_fn=default_data_collator,
        batch_size=args.per_device_eval_batch_size,
        **options,
    )

    flops_per_token = common.flops_per_token(model, block_size)  # counted while the weights are whole
    optimizer = common.make_optimizer(model, args, accelerator.device)
    model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader
    )
    steps_per_epoch, total_steps, num_epochs = common.training_steps(len(train_dataloader), args)
    lr_scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps, num_training_steps=total_steps
    )
    lr_scheduler = accelerator.prepare(lr_scheduler)

    # Resume: reload the newest complete checkpoint, if any.
    settings = {"block_size": block_size, "vocab_size": len(tokenizer), "train_blocks": len(train_data)}
    demo_flags = ["prompt", "max_new_tokens", "top_k", "top_p", "temperature", "archive"]
    checkpointer = common.Checkpointer(accelerator, output_dir, args, settings, demo_flags)
    state = checkpointer.resume()
    best_dir = output_dir / "best"

    if args.report_to != "none":
        accelerator.init_trackers("finetune_gpt2", config=vars(args) | {"output_dir": str(output_dir)})

    def finished():
        return state.completed_steps >= total_steps

    if finished():
        accelerator.print(
            f"Training already finished in {output_dir} ({state.completed_steps} steps); "
            "raise --num_train_epochs or --max_train_steps to train further."
        )
    else:
        accelerator.print(common.describe_training(accelerator, args, num_epochs, total_steps, steps_per_epoch))

    progress_bar = tqdm(total=total_steps, initial=state.completed_steps, disable=not accelerator.is_main_process)
    throughput = common.Throughput(accelerator, flops_per_token)
    losses = []
    model.train()
    while not finished():
        train_dataloader.set_epoch(state.epoch)  # the epoch's shuffle depends only on seed and epoch
        batches = train_dataloader
        if state.batch_in_epoch:  # resuming mid-epoch: skip what was already trained on
            batches = accelerator.skip_first_batches(train_dataloader, state.batch_in_epoch)
        for batch in batches:
            if state.completed_steps >= total_steps:
                break
            with accelerator.accumulate(model):
                # The labels are the inputs: the model shifts them by one position itself.
                outputs = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    lr_scheduler.step()
                optimizer.zero_grad()
            state.batch_in_epoch += 1
            losses.append(outputs.loss.detach())
            throughput.add(batch["input_ids"].numel())  # every token is real: no padding

            if not accelerator.sync_gradients:
                continue
            state.completed_steps += 1
            progress_bar.update(1)
            if state.completed_steps % args.logging_steps == 0:
                entry = common.log_metrics(
                    accelerator,
                    state,
                    {
                        "train_loss": common.mean_over_processes(accelerator, losses),
                        "learning_rate": lr_scheduler.get_last_lr()[0],
                        **throughput.report(),
                    },
                )
                losses = []
                progress_bar.set_postfix(common.progress_postfix(entry))
            if checkpointer.save_due(state):
                throughput.pause()  # saving is not training: keep it out of tokens/s
                checkpointer.save(state)
                throughput.resume()
                checkpointer.exit_if_signalled(state)

        if state.batch_in_epoch == len(train_dataloader):
            state.epoch += 1
            state.batch_in_epoch = 0

        throughput.pause()  # evaluating and saving are not training either
        metrics = run_evaluation(accelerator, model, eval_dataloader)
        common.log_metrics(accelerator, state, {f"eval_{k}": v for k, v in metrics.items()})
        accelerator.print(
            f"epoch {state.epoch}, step {state.completed_steps}: "
            f"eval loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f}"
        )
        if common.improved(metrics["loss"], state.best_metric, greater_is_better=False):
            state.best_metric, state.best_step = metrics["loss"], state.completed_steps
            common.export_model(accelerator, model, tokenizer, best_dir)
            if accelerator.is_main_process:
                common.write_json(output_dir / "eval_results.json", {"step": state.completed_steps, **metrics})
        checkpointer.save(state)
        throughput.resume()
        checkpointer.exit_if_signalled(state)
    progress_bar.close()
    accelerator.end_training()
    if common.peak_memory(accelerator.device) is not None:
        accelerator.print(f"Peak GPU memory: {common.peak_memory(accelerator.device):.2f} GiB")

    if accelerator.is_main_process:
        common.write_json(output_dir / "log_history.json", state.log_history)
        common.plot_history(state.log_history, output_dir / "loss.png", ("eval_loss",))
        accelerator.print(
            f"Best eval loss {state.best_metric:.4f} (perplexity {math.exp(min(state.best_metric, 50)):.2f}) "
            f"at step {state.best_step}; model in {best_dir}"
        )
        generate_sample(args, best_dir, output_dir / "samples.txt", accelerator.device)
        if args.archive:
            archive(best_dir, output_dir)
    return state


def generate_sample(args, model_dir, path, device):
    """Continue --prompt with the exported model, loaded as users will load it."""
    if args.max_new_tokens == 0:
        return None
    generator = pipeline("text-generation", model=str(model_dir), device=device)
    # The model sees at most max_positions tokens: the prompt and what it adds.
    positions = max_positions(generator.model, generator.tokenizer)
    room = positions - len(generator.tokenizer(args.prompt)["input_ids"])
    if room < 1:
        print(f"\nThe prompt is longer than the model's {positions} positions")
        return None
    set_seed(args.seed)  # the same sample for the same model and settings
    sampling = {"do_sample": True, "top_k": args.top_k, "top_p": args.top_p, "temperature": args.temperature}
    text = generator(
        args.prompt,
        max_new_tokens=min(args.max_new_tokens, room),
        **(sampling if args.temperature > 0 else {"do_sample": False}),  # temperature 0: the likeliest token
        pad_token_id=generator.tokenizer.eos_token_id,
    )[0]["generated_text"]
    print(f"\nSample from {model_dir}:\n{text}\n")
    path.write_text(text + "\n")
    return text


def archive(model_dir, output_dir):
    """<output_dir>.tar.gz of the exported model, next to the output folder (on Drive
    when the output is there); written under a temporary name, then renamed."""
    target = Path(f"{output_dir}.tar.gz")
    tmp = target.with_name(f".tmp-{target.name}")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(model_dir, arcname=Path(output_dir).name)
    shutil.move(tmp, target)
    print(f"Archived {model_dir} to {target}")


def main(argv=None):
    args = parse_args(argv)
    return common.run(train, args)


if __name__ == "__main__":
    main()
