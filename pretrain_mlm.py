"""Pretrain a small RoBERTa masked language model from scratch, tokenizer included.

    python pretrain_mlm.py --train_file "books/*.txt"          # the KantaiBERT tutorial, done well
    python pretrain_mlm.py                                     # WikiText-2 raw from the hub
    accelerate launch pretrain_mlm.py ...                      # any number of GPUs or TPU cores

1. Train a byte-level BPE tokenizer (RoBERTa's: <s> <pad> </s> <unk> <mask>) on the training text
   and save it in --output_dir (a resumed run reuses it, never retrains).
2. Build RobertaForMaskedLM from RobertaConfig (the tutorial's sizes by default).
3. Pack the text into blocks of --max_seq_length tokens (or --line_by_line), mask --mlm_probability
   of the tokens, train; evaluate the masked-LM loss every epoch.
4. Export the best model with the tokenizer to <output_dir>/best; fill in --fill_mask_prompt.
Re-running the same command continues from the newest checkpoint in --output_dir."""

import functools
import math
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    AutoModelForMaskedLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaTokenizerFast,
    default_data_collator,
    get_scheduler,
    pipeline,
)

import common
from machinery import engines, evaluation, flags, throughput, xla
from machinery.atomic_files import save_pretrained_whole
from machinery.data_files import from_pretrained
from machinery.errors import UserError
from machinery.fixed_masks import FixedMasks
from machinery.text_samples import language_model_samples, load_texts, token_samples
from machinery.token_files import tokenizer_fingerprint
from machinery.waits import main_process_first

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
BYTE_SYMBOLS = 256  # a byte-level BPE starts from one symbol per byte
MAY_CHANGE = ["fill_mask_prompt"]  # flags that may change on resume, besides the shared ones
ABOUT = {"pipeline_tag": "fill-mask", "task": "filling in masked words (masked language modeling)"}  # the model card


def parse_args(argv=None):
    defaults = {"dataset_name": "wikitext", "dataset_config_name": "wikitext-2-raw-v1", "learning_rate": 1e-4}
    parser = flags.build_parser(__doc__, per_device_train_batch_size=32, num_train_epochs=1, **defaults)
    a = parser.add_argument
    a("--vocab_size", type=int, default=52_000, help="size of the BPE vocabulary to learn (at most)")
    a("--min_frequency", type=int, default=2, help="merge only pairs seen at least this often")
    a("--num_hidden_layers", type=int, default=6, help="transformer layers")
    a("--num_attention_heads", type=int, default=12, help="attention heads per layer")
    a("--hidden_size", type=int, default=768, help="width of the model")
    a("--intermediate_size", type=int, default=3072, help="width of the feed-forward layers")
    a("--max_position_embeddings", type=int, default=514, help="RoBERTa's 512 positions + 2 (padding offset)")
    a("--max_seq_length", type=int, default=128, help="tokens per training sample")
    a("--line_by_line", action="store_true", help="one line per sample, padded (as the tutorial), instead of packing")
    a("--mlm_probability", type=float, default=0.15, help="share of the tokens masked for prediction")
    a("--fill_mask_prompt", default="Human thinking involves human <mask>.", help="must contain <mask>")
    args = parser.parse_args(argv)
    flags.check_pretraining_flags(args, SPECIAL_TOKENS, BYTE_SYMBOLS)  # each bad value: one line
    return args


def train(args):
    accelerator = common.setup(args, "pretrain_mlm")  # the device, its precision, the processes
    engines.refuse_fsdp_for_roberta_mlm(accelerator)  # FSDP2 cannot shard its head: one line, not a crash
    tokenizer, train_data, eval_data, test_data = get_data(args, accelerator)
    model = load_model(args, accelerator, tokenizer)
    dataloaders = get_dataloaders(args, accelerator, tokenizer, train_data, eval_data, test_data)
    train_dataloader, eval_dataloader, test_dataloader = dataloaders
    if args.eval_only:  # no training: the model as it is, prepared there, on the validation (and test) text
        return evaluation.evaluate_only(accelerator, args, model, run_evaluation, eval_dataloader, test_dataloader)

    masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=args.mlm_probability)  # for mask_tokens
    mask = functools.partial(mask_tokens, masker, device=accelerator.device)  # each batch, as the loop takes it
    steps = common.count_steps(args, accelerator, train_dataloader)  # optimizer steps: per epoch, in all
    optimizer = common.make_optimizer(model, args, accelerator.device)
    lr_scheduler = get_scheduler(args.lr_scheduler_type, optimizer, args.num_warmup_steps, steps.total)
    flops = throughput.flops_per_token(model, args.max_seq_length)  # counted now: prepare() may split the weights
    # One call for the model, optimizer and schedule (an engine wraps them together), then
    model, optimizer, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, eval_dataloader, lr_scheduler
    )
    # the training batches, kept where they are (the CPU; a TPU's loader moves them): mask_tokens.
    train_dataloader = accelerator.prepare_data_loader(train_dataloader, device_placement=False)
    # Resuming a checkpoint of other flags, tokenizer or number of samples is refused.
    data = {"tokenizer": tokenizer_fingerprint(tokenizer), "train_samples": None if args.streaming else len(train_data)}
    stream = train_data if args.streaming else None  # --streaming: checkpoints save the place in it
    checkpoints = common.Checkpoints(accelerator, args, data, MAY_CHANGE, stream)
    best = common.BestModel(accelerator, args, model, tokenizer, "loss", ABOUT)  # best/: the lowest loss
    state = checkpoints.resume()  # the newest whole checkpoint (made with other settings: refused), or step 0
    progress = common.Progress(accelerator, args, state, steps, flops)  # the plan, the bar, the logs
    common.catch_stop_signals()  # from here on, SIGTERM and Ctrl-C ask the loop to save, then stop

    while not common.finished(state, steps):  # the same in each script but for lines marked "this script"
        model.train()  # dropout on (the evaluation turns it off)
        train_dataloader.set_epoch(state.epoch)  # the epoch's order depends only on the seed and the epoch
        batches = common.EpochBatches(accelerator, train_dataloader, state, steps, args.seed, mask)  # this script
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
    # --test_file: best/ loaded and prepared there, scored with fixed masks (None without it)
    test_metrics = evaluation.score_best(accelerator, AutoModelForMaskedLM, best.dir, run_evaluation, test_dataloader)
    common.finish(accelerator, args, state, best, test_metrics)  # log_history.json, loss.png, best/'s card
    if accelerator.is_main_process:  # the demo, once: best/ loaded as users load it
        fill_mask(best.dir, args.fill_mask_prompt, xla.pipeline_device(accelerator))
    return state


def train_one_epoch(args, accelerator, model, optimizer, lr_scheduler, batches, state, checkpoints, progress):
    """The rest of one epoch, and each optimizer step's bookkeeping. Lines marked "this script"
    are the only ones that differ between the three scripts' loops."""
    for batch in batches:
        with accelerator.accumulate(model):  # an optimizer step every --gradient_accumulation_steps
            outputs = model(**batch)  # this script: masked as the loop takes it (mask_tokens)
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
        progress.add_batch(outputs.loss, batch["attention_mask"].sum())  # this script: real tokens, not padding
        if not accelerator.sync_gradients:
            continue  # a micro-batch of an accumulation: no optimizer step yet
        state.completed_steps += 1
        progress.log_if_due(lr_scheduler)  # the bar moves; the loss is logged every --logging_steps
        if checkpoints.due(state):  # every --checkpointing_steps, --save_every_minutes, or on a signal
            with progress.paused():  # saving is not training either
                checkpoints.save(state)
            common.stop_if_signalled(accelerator, state)  # SIGTERM or Ctrl-C: saved, now stop


def get_data(args, accelerator):
    """The tokenizer, and the training, validation and (--test_file) test samples. --eval_only
    needs no training samples."""
    texts = load_texts(args, accelerator, keep_linebreaks=False)  # training, validation, test
    tokenizer = get_tokenizer(accelerator, texts[0], args)  # trained on the training text
    what = f"samples of up to {args.max_seq_length} tokens"
    samples = language_model_samples(
        args, accelerator, texts, functools.partial(prepare_data, tokenizer=tokenizer, args=args), what
    )
    return tokenizer, *samples


def get_tokenizer(accelerator, texts, args):
    """--model_name_or_path's tokenizer, or the one in --output_dir; else train one (the main
    process; the others wait for it, outside a collective: it may take long)."""
    if args.model_name_or_path:
        return from_pretrained(AutoTokenizer, args.model_name_or_path, "tokenizer")
    output_dir = Path(args.output_dir)
    with main_process_first(accelerator):
        if accelerator.is_main_process and (args.no_resume or not (output_dir / "tokenizer.json").exists()):
            accelerator.print(f"Training a byte-level BPE tokenizer ({args.vocab_size:,} tokens) ...")
            # tokenizer.json last: a folder that has it (reused above) has the other files too.
            save_pretrained_whole(train_tokenizer(texts, args), output_dir, last="tokenizer.json")
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    accelerator.print(f"Tokenizer in {output_dir}: {len(tokenizer):,} tokens")
    return tokenizer


def train_tokenizer(texts, args):
    """A byte-level BPE learned from the text's non-blank lines (read a batch at a time: the
    trainer counts words as they come, never holding the text), as RoBERTa's tokenizer: its
    special tokens, <s> text </s> around every sequence."""
    lines = (line for batch in texts.iter(batch_size=10_000) for line in batch["text"] if line.strip())
    bpe = ByteLevelBPETokenizer()
    options = {"min_frequency": args.min_frequency, "special_tokens": SPECIAL_TOKENS, "show_progress": False}
    bpe.train_from_iterator(lines, args.vocab_size, **options)
    if bpe.get_vocab_size() < args.vocab_size:  # a small text has fewer words and merges to learn
        print(
            f"note: the training text yields {bpe.get_vocab_size():,} tokens at --min_frequency {args.min_frequency}, "
            f"fewer than --vocab_size {args.vocab_size:,}: the tokenizer and the model use {bpe.get_vocab_size():,}"
        )
    return RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, model_max_length=args.max_position_embeddings - 2)


def prepare_data(texts, split_name, tokenizer, args):
    """Blocks of --max_seq_length tokens cut from all lines in one stream, or (--line_by_line) each
    line cut to it, from a token file; blank lines dropped once encoded (before, a batch of them
    would be empty: tokenizers refuse that), <s> ... </s> around every line, special tokens said."""
    cut = {"truncation": True, "max_length": args.max_seq_length} if args.line_by_line else {}

    def tokenize(lines):  # whole lines when packing: packing cuts the blocks
        return [ids for ids, line in zip(tokenizer(lines, **cut)["input_ids"], lines) if line.strip()]

    block_size = None if args.line_by_line else args.max_seq_length
    recipe = f"lines of at most {args.max_seq_length}" if args.line_by_line else "whole lines"
    data = token_samples(texts, tokenize, tokenizer, args, split_name, recipe, block_size, tokenizer.all_special_ids)
    if not args.streaming and len(data) == 0:
        raise UserError(
            f"the {split_name} text is shorter than one block of --max_seq_length {args.max_seq_length} tokens; "
            "add text, lower --max_seq_length, or use --line_by_line"
        )
    return data


def load_model(args, accelerator, tokenizer):
    """A saved model folder (--model_name_or_path) continues its pretraining; without one, a new
    model."""
    new = args.model_name_or_path is None  # a new model, seeded by setup: the same start every time
    model = new_model(args, tokenizer) if new else from_pretrained(AutoModelForMaskedLM, args.model_name_or_path)
    accelerator.print(f"RoBERTa masked LM: {model.num_parameters():,} parameters")
    return model


def new_model(args, tokenizer):
    """RobertaForMaskedLM from RobertaConfig, the tutorial's sizes unless flags say otherwise."""
    sizes = ("max_position_embeddings", "num_attention_heads", "num_hidden_layers", "hidden_size", "intermediate_size")
    config = RobertaConfig(vocab_size=len(tokenizer), type_vocab_size=1, **{k: getattr(args, k) for k in sizes})
    config.pad_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    return RobertaForMaskedLM(config)


def get_dataloaders(args, accelerator, tokenizer, train_data, eval_data, test_data):
    """Training, validation and test batches (None without training or test data): packed blocks
    stacked, lines padded to the longest of each batch (evaluation's labels with -100: padding
    predicts nothing); the validation and test samples masked once and for all (FixedMasks)."""
    collator = DataCollatorWithPadding(tokenizer) if args.line_by_line else default_data_collator
    eval_collator = DataCollatorForTokenClassification(tokenizer) if args.line_by_line else default_data_collator
    eval_data = FixedMasks(eval_data, tokenizer, args)
    if test_data is not None:
        test_data = FixedMasks(test_data, tokenizer, args)
    return common.make_dataloaders(
        args, accelerator, collator, train_data, eval_data, test_data, eval_collate_fn=eval_collator
    )


def mask_tokens(masker, batch, device):
    """The model's inputs: DataCollatorForLanguageModeling's masking, the same draws as its
    torch_mask_tokens (a test checks), of the maskable tokens (--mlm_probability: 80% become
    <mask>, 10% a random token, 10% stay; only those are predicted), on the device. It runs as
    the loop takes each batch, drawing from the random state that checkpoints restore, so a
    resumed run masks as an uninterrupted one (a DataLoader draws ahead: Accelerate prefetches).
    On XLA (TPUs) the batch is on the device already, and so are the draws; each choice is made
    with torch.where, never by indexing with a mask, whose size XLA would stop the step to count."""
    ids, maskable = batch["input_ids"], ~batch["special_tokens_mask"].bool()
    with torch.device(ids.device):  # new tensors where the batch is
        masked = torch.bernoulli(torch.full(ids.shape, masker.mlm_probability) * maskable).bool()
        labels = torch.where(masked, ids, -100)  # only the masked tokens are predicted
        to_mask = torch.bernoulli(torch.full(ids.shape, masker.mask_replace_prob)).bool() & masked
        input_ids = torch.where(to_mask, masker.tokenizer.mask_token_id, ids)
        if masker.mask_replace_prob < 1 and masker.random_replace_prob > 0:  # of the rest, some random
            rest = masker.random_replace_prob / (1 - masker.mask_replace_prob)
            to_random = torch.bernoulli(torch.full(ids.shape, rest)).bool() & masked & ~to_mask
            input_ids = torch.where(to_random, torch.randint(len(masker.tokenizer), ids.shape), input_ids)
    inputs = {"input_ids": input_ids, "attention_mask": batch["attention_mask"], "labels": labels}
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


def run_evaluation(accelerator, model, eval_dataloader):
    """Masked-LM loss per masked token (the masks are fixed: see FixedMasks)."""

    def per_example(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), batch["labels"], reduction="none")
        return {"loss_sum": losses.sum(dim=1), "masked": (batch["labels"] != -100).sum(dim=1)}

    out = common.eval_loop(accelerator, model, eval_dataloader, per_example)
    # The mean over masked tokens (at least one: a tiny text may have none masked).
    loss = (out["loss_sum"].sum() / out["masked"].sum().clamp(min=1)).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50))}  # capped: exp(a diverged loss) overflows


def fill_mask(model_dir, prompt, device):
    """The exported model, loaded as users will load it, fills in the <mask>."""
    fill = pipeline("fill-mask", model=str(model_dir), device=device)
    print(f"\n{prompt}")
    for guess in fill(prompt, top_k=5):
        print(f"  {guess['score']:.3f}  {guess['sequence']}")
    return fill


def main(argv=None):
    return common.run_script(train, parse_args, argv)


if __name__ == "__main__":
    main()
