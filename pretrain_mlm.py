"""Pretrain a small RoBERTa masked language model from scratch, tokenizer included.

    python pretrain_mlm.py --train_file "books/*.txt"          # the KantaiBERT tutorial, done well
    python pretrain_mlm.py                                     # WikiText-2 raw from the hub
    accelerate launch pretrain_mlm.py ...                      # any number of GPUs or TPU cores

1. Train a byte-level BPE tokenizer (RoBERTa's: <s> <pad> </s> <unk> <mask>) on the training text
   and save it in --output_dir (a resumed run reuses it, never retrains).
2. Build RobertaForMaskedLM from RobertaConfig (the tutorial's sizes by default).
3. Pack the text into blocks of --max_seq_length tokens (or --line_by_line), mask --mlm_probability
   of the tokens, train; evaluate the masked-LM loss every epoch.
4. Export the best model with the tokenizer to <output_dir>/best and fill in the <mask> of
   --fill_mask_prompt. Re-running the same command continues from the newest checkpoint in
   --output_dir."""

import math
from pathlib import Path

import torch
from accelerate import PartialState  # print() on the main process only, from anywhere
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
    pipeline,
)

import common

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
BYTE_SYMBOLS = 256  # a byte-level BPE starts from one symbol per byte
MAY_CHANGE = ["fill_mask_prompt"]  # flags that may change on resume, besides common.MAY_CHANGE_ON_RESUME
ABOUT = {"pipeline_tag": "fill-mask", "task": "filling in masked words (masked language modeling)"}  # the model card


def parse_args(argv=None):
    defaults = {"dataset_name": "wikitext", "dataset_config_name": "wikitext-2-raw-v1", "learning_rate": 1e-4}
    parser = common.build_parser(__doc__, per_device_train_batch_size=32, num_train_epochs=1, **defaults)
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
    if "<mask>" not in args.fill_mask_prompt:
        raise common.UserError(
            f"--fill_mask_prompt {args.fill_mask_prompt!r} has no <mask>; put <mask> where the model should fill in"
        )
    smallest = len(SPECIAL_TOKENS) + BYTE_SYMBOLS
    if args.vocab_size < smallest:
        raise common.UserError(
            f"--vocab_size {args.vocab_size} is too small: the {len(SPECIAL_TOKENS)} special tokens and "
            f"{BYTE_SYMBOLS} byte symbols alone take {smallest}; use --vocab_size {smallest} or more"
        )
    if args.eval_only and not args.model_name_or_path:
        raise common.UserError("--eval_only evaluates a trained model: pass it with --model_name_or_path")
    if not 0 < args.mlm_probability < 1:
        raise common.UserError(f"--mlm_probability must be between 0 and 1 (got {args.mlm_probability})")
    if args.max_seq_length > args.max_position_embeddings - 2:
        raise common.UserError(
            f"--max_seq_length {args.max_seq_length} needs --max_position_embeddings {args.max_seq_length + 2} "
            "or more (RoBERTa offsets positions by 2)"
        )
    return args


def train(args):
    accelerator = common.setup(args, "pretrain_mlm")
    refuse_fsdp(accelerator)
    tokenizer, train_data, eval_data, test_data = get_data(args, accelerator)
    model = load_model(args, tokenizer)
    train_dataloader, eval_dataloader, test_dataloader = get_dataloaders(
        args, accelerator, tokenizer, train_data, eval_data, test_data
    )
    if args.eval_only:  # no training: the model as it is, on the validation (and test) text
        return common.evaluate_only(accelerator, args, model, run_evaluation, eval_dataloader, test_dataloader)

    masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=args.mlm_probability)
    flops = common.flops_per_token(model, args.max_seq_length)  # counted now: prepare() may split the weights
    optimizer = common.make_optimizer(model, args, accelerator.device)
    lr_scheduler = common.make_scheduler(accelerator, optimizer, args, train_dataloader)
    # One call for all: an engine (DDP, DeepSpeed) wraps the model, its optimizer and its schedule
    # together. All but the training batches, which are prepared on their own just below.
    model, optimizer, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, eval_dataloader, lr_scheduler
    )
    # The training batches stay on the CPU: they are masked there (see mask_tokens), then moved.
    train_dataloader = accelerator.prepare_data_loader(train_dataloader, device_placement=False)
    # A checkpoint made with another tokenizer or text is not resumed (common.Checkpointer).
    train_samples = None if args.streaming else len(train_data)  # (a stream's length is not known)
    data = {"tokenizer": common.tokenizer_fingerprint(tokenizer), "train_samples": train_samples}
    run = common.Run(
        accelerator, args, model=model, tokenizer=tokenizer, lr_scheduler=lr_scheduler,
        train_dataloader=train_dataloader, flops_per_token=flops, settings=data, may_change=MAY_CHANGE,
        stream=train_data if args.streaming else None, about=ABOUT,
    )  # fmt: skip
    run.resume_or_start()  # from the newest checkpoint in --output_dir made with these settings, if any

    for epoch in run.epochs():  # from where a resumed run stands; none if the run had finished
        model.train()  # dropout on (the evaluation at each epoch's end turns it off)
        train_dataloader.set_epoch(epoch)  # the epoch's order depends only on the seed and the epoch
        for batch in run.batches(train_dataloader):  # without those a resumed run already trained on
            with accelerator.accumulate(model):  # an optimizer step every --gradient_accumulation_steps
                # this script: masking makes the inputs and the labels (see mask_tokens)
                outputs = model(**mask_tokens(masker, batch, accelerator.device))  # this script
                accelerator.backward(outputs.loss)  # scaled for fp16, divided over the accumulated batches
                if accelerator.sync_gradients and args.max_grad_norm:  # a step's last batch: gradients whole
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                # accumulate() makes the optimizer act on each step's last batch only.
                # The schedule is ours to keep: once per optimizer step, not when fp16 skipped one.
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    lr_scheduler.step()
                optimizer.zero_grad()
            run.count_batch(outputs.loss, batch["attention_mask"].sum())  # this script: real tokens, not padding
        run.end_epoch(run_evaluation(accelerator, model, eval_dataloader))  # this script: its metrics

    # --test_file: best/ scored on held-out text, with fixed masks (None without it)
    test_metrics = common.score_best(accelerator, AutoModelForMaskedLM, run.best_dir, run_evaluation, test_dataloader)
    run.finish(test_metrics)
    if accelerator.is_main_process:  # the demo, once: best/ loaded as users load it
        fill_mask(run.best_dir, args.fill_mask_prompt, common.pipeline_device(accelerator))
    return run.state


def refuse_fsdp(accelerator):
    """FSDP2, in one line rather than an error from its depths."""
    if accelerator.distributed_type == common.DistributedType.FSDP:
        raise common.UserError(
            "FSDP2 cannot shard RoBERTa's masked-LM head (its bias is shared between two FSDP units, which torch 2.13 "
            "refuses): use DeepSpeed (configs/deepspeed_zero3.yaml) or DDP (configs/multi_gpu.yaml)"
        )


def get_data(args, accelerator):
    """The tokenizer, and the training, validation and (--test_file) test samples. --eval_only
    needs no training samples."""
    texts = common.load_texts(args, accelerator, keep_linebreaks=False)  # training, validation, test
    tokenizer = get_tokenizer(accelerator, texts[0], args)  # trained on the training text

    def samples_of(text, split_name):
        return prepare_data(text, tokenizer, args, split_name)

    what = f"samples of up to {args.max_seq_length} tokens"
    train_data, eval_data, test_data = common.language_model_samples(args, accelerator, texts, samples_of, what)
    return tokenizer, train_data, eval_data, test_data


def get_tokenizer(accelerator, texts, args):
    """--model_name_or_path's tokenizer, or the one in --output_dir; else train one (main
    process, others wait)."""
    if args.model_name_or_path:
        return common.from_pretrained(AutoTokenizer, args.model_name_or_path, "tokenizer")
    output_dir = Path(args.output_dir)
    with common.main_process_first(accelerator):  # the others wait (outside a collective: it may take long)
        if accelerator.is_main_process and (args.no_resume or not (output_dir / "tokenizer.json").exists()):
            accelerator.print(f"Training a byte-level BPE tokenizer ({args.vocab_size:,} tokens) ...")
            train_tokenizer(texts, args, output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    accelerator.print(f"Tokenizer in {output_dir}: {len(tokenizer):,} tokens")
    return tokenizer


def train_tokenizer(texts, args, output_dir):
    """A byte-level BPE learned from the text, saved as RoBERTa's tokenizer: its special tokens,
    <s> text </s> around every sequence."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        batches_of_lines(texts),
        args.vocab_size,
        min_frequency=args.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    if bpe.get_vocab_size() < args.vocab_size:  # a small text has fewer words and merges to learn
        print(
            f"note: the training text yields {bpe.get_vocab_size():,} tokens at --min_frequency {args.min_frequency}, "
            f"fewer than --vocab_size {args.vocab_size:,}: the tokenizer and the model use {bpe.get_vocab_size():,}"
        )
    tokenizer = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, model_max_length=args.max_position_embeddings - 2)
    # Into a temporary folder, then moved in with tokenizer.json last: get_tokenizer reuses any
    # folder that has it, so a kill midway must never leave tokenizer.json beside half of the other
    # files.
    tmp = output_dir / ".tmp-tokenizer"
    common.delete_tree(tmp)
    tokenizer.save_pretrained(tmp)
    for file in tmp.iterdir():
        if file.name != "tokenizer.json":
            file.replace(output_dir / file.name)
    (tmp / "tokenizer.json").replace(output_dir / "tokenizer.json")
    tmp.rmdir()


def batches_of_lines(texts):
    """The non-blank lines, a batch at a time: the tokenizer's trainer counts words as they come,
    never holding the text."""
    for batch in texts.iter(batch_size=10_000):
        yield [line for line in batch["text"] if line.strip()]


def prepare_data(texts, tokenizer, args, split_name):
    """Packed blocks of exactly --max_seq_length tokens cut from all lines in one stream, or
    (--line_by_line) each line cut to --max_seq_length: from a token file, made once and reused
    (with --streaming, tokenized as training reads them). Blank lines are left out; every line
    gets RoBERTa's <s> ... </s>. The samples say which tokens are special (<s>, </s>, <pad>):
    those are never masked."""
    cut = {"truncation": True, "max_length": args.max_seq_length} if args.line_by_line else {}

    def tokenize(lines):  # whole lines when packing: packing cuts the blocks
        return tokenizer([line for line in lines if line.strip()], **cut)["input_ids"]

    block_size = None if args.line_by_line else args.max_seq_length
    recipe = f"lines of at most {args.max_seq_length}" if args.line_by_line else "whole lines"
    special = tokenizer.all_special_ids
    data = common.token_samples(texts, tokenize, tokenizer, args, split_name, recipe, block_size, special)
    if not args.streaming and len(data) == 0:
        raise common.UserError(
            f"the {split_name} text is shorter than one block of --max_seq_length {args.max_seq_length} tokens; "
            "add text, lower --max_seq_length, or use --line_by_line"
        )
    return data


def load_model(args, tokenizer):
    """A saved model folder (--model_name_or_path) continues its pretraining; without one, a new
    model."""
    if args.model_name_or_path:
        model = common.from_pretrained(AutoModelForMaskedLM, args.model_name_or_path)
    else:
        model = new_model(args, tokenizer)  # seeded by setup: the same start every time
    PartialState().print(f"RoBERTa masked LM: {model.num_parameters():,} parameters")
    return model


def new_model(args, tokenizer):
    """RobertaForMaskedLM from RobertaConfig, the tutorial's sizes unless flags say otherwise."""
    sizes = ("max_position_embeddings", "num_attention_heads", "num_hidden_layers", "hidden_size", "intermediate_size")
    config = RobertaConfig(vocab_size=len(tokenizer), type_vocab_size=1, **{k: getattr(args, k) for k in sizes})
    config.pad_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    return RobertaForMaskedLM(config)


def get_dataloaders(args, accelerator, tokenizer, train_data, eval_data, test_data):
    """Training, validation and test batches (None without training or test data). Packed blocks
    all have the same length: they are stacked. Lines are padded to the longest of each batch
    (the evaluation's labels with -100: padding predicts nothing). The validation and test
    samples are masked once and for all (FixedMasks)."""
    collator = DataCollatorWithPadding(tokenizer) if args.line_by_line else default_data_collator
    eval_collator = DataCollatorForTokenClassification(tokenizer) if args.line_by_line else default_data_collator
    eval_data = FixedMasks(eval_data, tokenizer, args)
    if test_data is not None:
        test_data = FixedMasks(test_data, tokenizer, args)
    return common.make_dataloaders(
        args, accelerator, collator, train_data, eval_data, test_data, eval_collate_fn=eval_collator
    )


class FixedMasks(torch.utils.data.Dataset):
    """Validation (or test) samples, masked once and for all: sample i's masks come from a
    generator seeded with --seed + i, so every evaluation predicts the same tokens, on any number
    of processes and at any batch size, and losses from one evaluation to the next differ only by
    what the model learned. It has a masker of its own: giving the training loop's masker a
    generator would take training's masks off the global random state that checkpoints restore."""

    def __init__(self, samples, tokenizer, args):
        self.samples, self.seed = samples, args.seed
        self.masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=args.mlm_probability)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        sample = self.samples[index]
        self.masker.generator = torch.Generator().manual_seed(self.seed + index)
        # The masker takes a batch: [None] makes the one sample a batch of one, [0] takes it back.
        input_ids, labels = self.masker.torch_mask_tokens(
            sample["input_ids"][None].clone(), special_tokens_mask=sample["special_tokens_mask"][None]
        )
        return {"input_ids": input_ids[0], "attention_mask": sample["attention_mask"], "labels": labels[0]}


def mask_tokens(masker, batch, device):
    """The model's inputs: DataCollatorForLanguageModeling's masking (of the maskable tokens,
    --mlm_probability: 80% become <mask>, 10% a random token, 10% stay; only those are
    predicted), moved to the device. It runs in the loop, on the CPU batch, drawing from the
    global random state that checkpoints save and restore, so a resumed run masks exactly as an
    uninterrupted one (inside the DataLoader it would draw ahead of training: Accelerate
    prefetches a batch). On XLA (TPUs) Accelerate's loader has put the batch on the device
    already: the masks are drawn there, from the device's generator (common.seed_xla_for_batch).
    The draws are the masker's own (torch_mask_tokens: the same numbers on a CPU), but each choice
    is made with torch.where, never by indexing with a mask: a tensor whose size depends on how
    many tokens were drawn would make XLA stop the step to count them and compile a graph for
    each count."""
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

    out = common.evaluate(accelerator, model, eval_dataloader, per_example)
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
    return common.run(train, parse_args, argv)


if __name__ == "__main__":
    main()
