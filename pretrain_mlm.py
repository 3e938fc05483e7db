"""Pretrain a small RoBERTa masked language model from scratch, tokenizer included.

    python pretrain_mlm.py --train_file "books/*.txt"          # the KantaiBERT tutorial, done properly
    python pretrain_mlm.py                                     # WikiText-2 raw from the hub
    accelerate launch pretrain_mlm.py ...                      # any number of GPUs or TPU cores

1. Train a byte-level BPE tokenizer (RoBERTa's: <s> <pad> </s> <unk> <mask>) on the
   training text and save it in --output_dir (a resumed run reuses it, never retrains).
2. Build RobertaForMaskedLM from RobertaConfig (the tutorial's sizes by default).
3. Pack the text into blocks of --max_seq_length tokens (or --line_by_line), mask
   --mlm_probability of the tokens, and train; evaluate masked-LM loss and perplexity
   every epoch with a fixed masking seed.
4. Export the best model with the tokenizer to <output_dir>/best and fill in the
   <mask> of --fill_mask_prompt.
Re-running the same command continues from the newest checkpoint in --output_dir.
"""

import hashlib
import math
import shutil
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from tokenizers.processors import RobertaProcessing
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoModelForMaskedLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaTokenizerFast,
    default_data_collator,
    get_scheduler,
    pipeline,
)

import common

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
BYTE_SYMBOLS = 256  # a byte-level BPE starts from one symbol per byte


def parse_args(argv=None):
    parser = common.build_parser(__doc__.split("\n")[0])
    a = parser.add_argument
    a("--vocab_size", type=int, default=52_000, help="size of the BPE vocabulary to learn")
    a("--min_frequency", type=int, default=2, help="merge only pairs seen at least this often")
    a("--num_hidden_layers", type=int, default=6)
    a("--num_attention_heads", type=int, default=12)
    a("--hidden_size", type=int, default=768)
    a("--intermediate_size", type=int, default=3072)
    a("--max_position_embeddings", type=int, default=514, help="RoBERTa's 512 positions + 2 (padding offset)")
    a("--max_seq_length", type=int, default=128, help="tokens per training sample")
    a("--line_by_line", action="store_true", help="one line per sample, padded (as the tutorial), instead of packing")
    a("--mlm_probability", type=float, default=0.15, help="share of tokens masked for prediction")
    a("--fill_mask_prompt", default="Human thinking involves human <mask>.", help="must contain <mask>")
    parser.set_defaults(
        model_name_or_path=None,  # from scratch; a saved model directory continues its pretraining
        dataset_name="wikitext",
        dataset_config_name="wikitext-2-raw-v1",
        learning_rate=1e-4,
        per_device_train_batch_size=32,
        num_train_epochs=1,
    )
    return parser.parse_args(argv)


def check_mlm_args(args):
    if "<mask>" not in args.fill_mask_prompt:
        raise common.UserError(
            f"--fill_mask_prompt {args.fill_mask_prompt!r} has no <mask>; "
            "put <mask> where the model should fill in a word"
        )
    smallest = len(SPECIAL_TOKENS) + BYTE_SYMBOLS
    if args.vocab_size < smallest:
        raise common.UserError(
            f"--vocab_size {args.vocab_size} is too small: the {len(SPECIAL_TOKENS)} special tokens and "
            f"{BYTE_SYMBOLS} byte symbols alone take {smallest}; use --vocab_size {smallest} or more"
        )
    if not 0 < args.mlm_probability < 1:
        raise common.UserError(f"--mlm_probability must be between 0 and 1 (got {args.mlm_probability})")
    if args.max_seq_length > args.max_position_embeddings - 2:
        raise common.UserError(
            f"--max_seq_length {args.max_seq_length} needs --max_position_embeddings {args.max_seq_length + 2} "
            "or more (RoBERTa offsets positions by 2)"
        )


# ---------------------------------------------------------------------------
# Tokenizer: byte-level BPE, trained once, saved in --output_dir.
# ---------------------------------------------------------------------------


def train_tokenizer(texts, args, output_dir):
    """Train on the training text; save as a fast RoBERTa tokenizer that
    AutoTokenizer.from_pretrained(output_dir) loads."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        (line for line in texts["text"] if line.strip()),
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    if bpe.get_vocab_size() < args.vocab_size:  # a small text has fewer words and merges to learn
        print(
            f"note: the training text yields {bpe.get_vocab_size():,} tokens at --min_frequency {args.min_frequency}, "
            f"fewer than --vocab_size {args.vocab_size:,}: the tokenizer and the model use {bpe.get_vocab_size():,}"
        )
    # <s> text </s> around every sequence, as RoBERTa; truncation at the model's length.
    sep, cls = ("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>"))
    bpe._tokenizer.post_processor = RobertaProcessing(sep, cls)
    bpe.enable_truncation(max_length=args.max_position_embeddings - 2)
    tokenizer = RobertaTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=args.max_position_embeddings - 2,
    )
    # Written to a temporary folder, then moved in with tokenizer.json last: a kill
    # midway never leaves a half tokenizer that a resumed run would take for whole.
    tmp = output_dir / ".tmp-tokenizer"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "tokenizer.json"):
        f.replace(output_dir / f.name)
    tmp.rmdir()


def get_tokenizer(accelerator, texts, args, output_dir):
    """The tokenizer in --output_dir if there is one (a resumed run); else train it, on
    the main process only, while the others wait."""
    if args.model_name_or_path:
        return common.from_pretrained(AutoTokenizer.from_pretrained, args.model_name_or_path, "tokenizer")
    saved = output_dir / "tokenizer.json"
    if accelerator.is_main_process and (args.no_resume or not saved.exists()):
        accelerator.print(f"Training a byte-level BPE tokenizer ({args.vocab_size:,} tokens) ...")
        train_tokenizer(texts, args, output_dir)
    accelerator.wait_for_everyone()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    accelerator.print(f"Tokenizer in {output_dir}: {len(tokenizer):,} tokens")
    return tokenizer


def new_model(args, tokenizer):
    """RobertaForMaskedLM from RobertaConfig, the tutorial's sizes unless flags say otherwise."""
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=args.max_position_embeddings,
        num_attention_heads=args.num_attention_heads,
        num_hidden_layers=args.num_hidden_layers,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return RobertaForMaskedLM(config)


# ---------------------------------------------------------------------------
# Data and masking
# ---------------------------------------------------------------------------


def prepare_data(texts, tokenizer, args, split_name):
    """Packed blocks of exactly --max_seq_length tokens, or (--line_by_line) one line per
    sample. special_tokens_mask marks <s>, </s> and <pad>, which are never masked."""
    texts = texts.filter(lambda row: bool(row["text"].strip()), desc="drop empty lines")
    if args.line_by_line:
        options = {"truncation": True, "max_length": args.max_seq_length}
    else:
        options = {"truncation": False}  # whole lines; packing cuts the blocks

    def tokenize(batch):
        return tokenizer(batch["text"], return_special_tokens_mask=True, **options)

    data = texts.map(tokenize, batched=True, remove_columns=texts.column_names, desc="tokenize")
    if not args.line_by_line:
        data = data.map(
            common.group_texts, batched=True, batch_size=None, fn_kwargs={"block_size": args.max_seq_length}
        )
    if len(data) == 0:
        raise common.UserError(
            f"the {split_name} text is shorter than one block of --max_seq_length {args.max_seq_length} tokens; "
            "add text, lower --max_seq_length, or use --line_by_line"
        )
    return data


def mask_tokens(masker, batch, generator=None):
    """DataCollatorForLanguageModeling's masking (of the maskable tokens, --mlm_probability:
    80% become <mask>, 10% a random token, 10% stay; only those are predicted).

    It runs here, in the loop, on the CPU batch, drawing from the global random state
    that checkpoints save and restore, so a resumed run masks exactly as an
    uninterrupted one. (Masking inside the DataLoader would draw ahead of training:
    Accelerate prefetches a batch.) Evaluation passes its own fixed generator."""
    masker.generator = generator
    return masker.torch_mask_tokens(batch["input_ids"].clone(), special_tokens_mask=batch["special_tokens_mask"])


def run_evaluation(accelerator, model, eval_dataloader, masker, seed):
    generator = torch.Generator().manual_seed(seed)  # the same masks at every evaluation

    def per_example(model, batch):
        input_ids, labels = mask_tokens(masker, batch, generator)
        input_ids, labels = input_ids.to(accelerator.device), labels.to(accelerator.device)
        logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(accelerator.device)).logits
        losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")
        return {"loss_sum": losses.sum(dim=1), "masked": (labels != -100).sum(dim=1)}

    out = common.evaluate(accelerator, model, eval_dataloader, per_example)
    loss = (out["loss_sum"].sum() / out["masked"].sum().clamp(min=1)).item()  # mean over masked tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50))}


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def train(args):
    common.check_args(args)
    check_mlm_args(args)
    output_dir = common.resolve_output_dir(args, "pretrain_mlm")
    accelerator = common.make_accelerator(args, output_dir)

    with accelerator.main_process_first():
        train_text, eval_text = common.load_text_data(args, keep_linebreaks=False)
    tokenizer = get_tokenizer(accelerator, train_text, args, output_dir)
    with accelerator.main_process_first():
        train_data = prepare_data(train_text, tokenizer, args, "training")
        eval_data = prepare_data(eval_text, tokenizer, args, "validation")

    if args.model_name_or_path:
        model = common.from_pretrained(AutoModelForMaskedLM.from_pretrained, args.model_name_or_path)
    else:
        model = new_model(args, tokenizer)  # seeded by make_accelerator: the same start every time
    accelerator.print(
        f"RoBERTa masked LM: {common.params_summary(model)}; {len(train_data):,} training and "
        f"{len(eval_data):,} validation samples of up to {args.max_seq_length} tokens"
    )

    # Packed blocks all have the same length: stack them. Lines: pad each batch to its longest.
    collator = DataCollatorWithPadding(tokenizer) if args.line_by_line else default_data_collator
    options = common.loader_options(args, accelerator.device)
    train_dataloader = DataLoader(
        train_data.with_format("torch"),
        shuffle=True,
        collate_fn=collator,
        batch_size=args.per_device_train_batch_size,
        generator=common.data_generator(args.seed),
        **options,
    )
    eval_dataloader = DataLoader(
        eval_data.with_format("torch"), collate_fn=collator, batch_size=args.per_device_eval_batch_size, **options
    )
    masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=args.mlm_probability)

    flops_per_token = common.flops_per_token(model, args.max_seq_length)  # counted while the weights are whole
    optimizer = common.make_optimizer(model, args, accelerator.device)
    # The dataloaders stay on the CPU (device_placement False): batches are masked there,
    # then moved to the device.
    model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, device_placement=[True, True, False, False]
    )
    steps_per_epoch, total_steps, num_epochs = common.training_steps(len(train_dataloader), args)
    lr_scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps, num_training_steps=total_steps
    )
    lr_scheduler = accelerator.prepare(lr_scheduler)

    # Resume: reload the newest complete checkpoint, if any.
    settings = {"tokenizer_sha256": tokenizer_hash(args, output_dir), "train_samples": len(train_data)}
    checkpointer = common.Checkpointer(accelerator, output_dir, args, settings, ["fill_mask_prompt"])
    state = checkpointer.resume()
    best_dir = output_dir / "best"

    if args.report_to != "none":
        accelerator.init_trackers("pretrain_mlm", config=vars(args) | {"output_dir": str(output_dir)})

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
    device = accelerator.device
    losses = []
    model.train()
    while not finished():
        train_dataloader.set_epoch(state.epoch)
        batches = train_dataloader
        if state.batch_in_epoch:
            batches = accelerator.skip_first_batches(train_dataloader, state.batch_in_epoch)
        for batch in batches:
            if state.completed_steps >= total_steps:
                break
            input_ids, labels = mask_tokens(masker, batch)
            attention_mask = batch["attention_mask"]
            with accelerator.accumulate(model):
                outputs = model(
                    input_ids=input_ids.to(device, non_blocking=True),
                    attention_mask=attention_mask.to(device, non_blocking=True),
                    labels=labels.to(device, non_blocking=True),
                )
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    lr_scheduler.step()
                optimizer.zero_grad()
            state.batch_in_epoch += 1
            losses.append(outputs.loss.detach())
            throughput.add(attention_mask.sum().to(device))  # real tokens, not padding

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
        metrics = run_evaluation(accelerator, model, eval_dataloader, masker, args.seed)
        common.log_metrics(accelerator, state, {f"eval_{k}": v for k, v in metrics.items()})
        accelerator.print(
            f"epoch {state.epoch}, step {state.completed_steps}: "
            f"masked-LM loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f}"
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
        accelerator.print(f"Best masked-LM loss {state.best_metric:.4f} at step {state.best_step}; model in {best_dir}")
        fill_mask(best_dir, args.fill_mask_prompt, accelerator.device)
    return state


def tokenizer_hash(args, output_dir):
    path = Path(args.model_name_or_path or output_dir) / "tokenizer.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def fill_mask(model_dir, prompt, device):
    """The exported model, loaded as users will load it, fills in the <mask>."""
    fill = pipeline("fill-mask", model=str(model_dir), device=device)
    print(f"\n{prompt}")
    for guess in fill(prompt, top_k=5):
        print(f"  {guess['score']:.3f}  {guess['sequence']}")
    return fill


def main(argv=None):
    args = parse_args(argv)
    return common.run(train, args)


if __name__ == "__main__":
    main()
