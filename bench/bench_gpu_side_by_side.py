"""finetune_gpt2.py beside Hugging Face's Trainer and a minimal PyTorch loop, doing the same work.

On a GPU (GPT-2 124M, 16 x 1024 tokens, bf16 from Ampere on, fp16 before; a few minutes):

    python bench/bench_gpu_side_by_side.py --json side_by_side.json

Each row trains in a process of its own, on the same device, from the same model folder (the same
initial weights), on the same token stream, with the same block size, batch, precision, learning
rate (linear decay, no warmup, gradients clipped at 1.0) and number of optimizer steps:

- ours: finetune_gpt2.py at its defaults for everything the rows do not share;
- ours-compile: the same with --torch_compile;
- trainer: the Trainer as run_clm.py drives it (the text tokenized and cut into blocks whose labels
  are their inputs, default_data_collator), TrainingArguments at their defaults;
- trainer-fast: the Trainer with every speed option it has: torch_compile, fused AdamW and TF32 on a
  GPU, no NaN check of the loss at every step (logging_nan_inf_filter: a host sync per step), 2 data
  workers kept alive, non-blocking copies to the GPU (SDPA is transformers 5's default);
- minimal: a nanoGPT-style loop in plain PyTorch: the same model with SDPA attention, compiled (on a
  GPU; on a CPU with --compile_on_cpu), fused AdamW on a GPU, autocast, batches gathered on the
  device from one token tensor, the loss read back only every --logging_steps steps. What the
  hardware gives: the reference for the others.

Per row: tokens/s (the median over the logging windows after --warmup_steps, which hold the
compilation), MFU (one formula for every row: flops_per_token, training FLOPs per token as
nanoGPT counts them, x tokens/s / the GPU's dense bf16/fp16 peak; "n/a" on a CPU or a GPU not in the
table), peak memory (GPU: what tensors allocated; CPU: the process's peak resident memory; ours'
evaluation at the end included), the training loss of the last logging window, and the steps it
trained.

The targets (ours at MFU >= 40%, >= 1.5x the Trainer at its defaults, within 15% of the minimal
loop) are measured on a GPU only. On a CPU the bench runs (tiny model, fp32) to show that it works;
its speeds say nothing about a GPU.

--model 124m is GPT2Config()'s defaults (12 layers x 768, 1,024 positions, 50,257-entry vocabulary)
with random weights. Its tokenizer is a byte-level BPE trained here to 16,000 entries: a few MB of
text gives no 50,257 useful merges, and the FLOPs do not depend on the tokenizer. The model keeps
GPT-2's 50,257 rows, so every step computes what GPT-2 124M computes (the output layer is a third of
its matrix FLOPs); the ids above 16,000 are never seen. --model tiny (2 layers x 64, a BPE of up to
1,000 entries) is for CPUs and the test.

The text (--data) is WikiText-2 raw from ../shared/data (or a text file; made-up words without
either), repeated until one epoch holds all the steps: ours then evaluates only once, after
training (untimed), on the text's last lines, held out for it."""

import argparse
import io
import itertools
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from machinery import throughput  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROWS = {
    "ours": "finetune_gpt2.py",
    "ours-compile": "finetune_gpt2.py --torch_compile",
    "trainer": "Trainer, defaults",
    "trainer-fast": "Trainer, every speed option",
    "minimal": "minimal PyTorch loop",
}
END = "<|endoftext|>"


def parse_args(argv=None):
    on_gpu = DEVICE.type == "cuda"
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    a = p.add_argument
    # Public data beside the clone, not in it; where to get it: docs/speed.md#the-benchmarks-data
    a("--data", type=Path, default=REPO.parent / "shared" / "data", help="a text file, or the shared data folder")
    a("--model", choices=["124m", "tiny"], default="124m" if on_gpu else "tiny", help="GPT-2 124M, or 2 x 64")
    a("--block_size", type=int, default=1024, help="tokens per sample")
    a("--batch_size", type=int, default=16 if on_gpu else 8, help="samples per optimizer step")
    a("--steps", type=int, default=100, help="optimizer steps per row")
    a("--warmup_steps", type=int, default=30, help="steps left out of tokens/s (compiling happens in them)")
    a("--logging_steps", type=int, default=10, help="steps per logging window (the loss is read back then)")
    a("--learning_rate", type=float, default=6e-4, help="peak learning rate, decayed linearly to 0")
    precision = common.auto_mixed_precision("cuda", torch.cuda.get_device_capability()) if on_gpu else "no"
    a("--precision", choices=["bf16", "fp16", "no"], default=precision, help="no: fp32")
    a("--rows", default=",".join(ROWS), help=f"which rows, of {','.join(ROWS)}")
    a("--compile_on_cpu", action="store_true", help="on a CPU, compile the minimal loop too (on a GPU it always is)")
    a("--work", type=Path, help="folder for the model, the text and the runs (default: a new temporary one)")
    a("--json", type=Path, help="also write the results here")
    a("--child", choices=list(ROWS), help=argparse.SUPPRESS)  # the row this process runs
    args = p.parse_args(argv)
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        p.error(f"--rows: no row named {', '.join(sorted(unknown))}; choose from {','.join(ROWS)}")
    if args.warmup_steps % args.logging_steps or args.steps < args.warmup_steps + args.logging_steps:
        p.error("--warmup_steps must be a multiple of --logging_steps, with a logging window or more after it")
    if args.model == "124m" and args.block_size > 1024:
        p.error("--block_size: GPT-2 124M has 1024 positions")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    args = parse_args(argv)
    if args.child:
        return run_row(args)
    work = args.work or Path(tempfile.mkdtemp(prefix="side-by-side-"))
    prepare(args, work)
    results = {row: run_in_own_process(argv, work, row) for row in args.rows.split(",")}
    print_table(args, results)
    if args.json:
        about = {"device": device_name(), "torch": torch.__version__, "settings": settings(args)}
        args.json.write_text(json.dumps({**about, "rows": results}, indent=2))
    if any("error" in result for result in results.values()):
        raise SystemExit(1)


# ---- Shared by every row: the model folder and the text, made once.
def prepare(args, work):
    """<work>/model (tokenizer, random weights), train.txt and valid.txt for ours, and
    train_tokens.npy for the others: the very tokens ours makes of train.txt (each line tokenized
    alone, one after the other)."""
    work.mkdir(parents=True, exist_ok=True)
    lines = io.StringIO(read_text(args.data)).readlines()  # as `datasets` splits: on "\n" only
    if not lines[-1].endswith("\n"):
        lines[-1] += "\n"  # so that copies of the text stay the same lines
    tokenizer = build_model(args, lines, work / "model")
    lines, held_out = hold_out(tokenizer, lines, 2 * args.block_size)
    ids = np.fromiter(itertools.chain.from_iterable(tokenizer(lines)["input_ids"]), dtype=np.int32)
    if len(ids) < args.block_size + 2:
        raise SystemExit(f"error: {args.data}: too little text for a block of {args.block_size} tokens")
    # Copies enough for one epoch to hold every step and a batch more: ours never stops mid-run
    # to evaluate.
    needed = (args.steps + 1) * args.batch_size * args.block_size
    copies = -(-needed // len(ids))
    (work / "train.txt").write_text("".join(lines) * copies, encoding="utf-8")
    (work / "valid.txt").write_text("".join(held_out), encoding="utf-8")
    np.save(work / "train_tokens.npy", np.tile(ids, copies))
    print(f"{len(ids) * copies:,} training tokens (the text x {copies}), in {work}", file=sys.stderr)


def read_text(data):
    """A text file, WikiText-2 raw in the shared data folder, or made-up words (speed does not
    depend on the words)."""
    if data.is_file():
        return data.read_text(encoding="utf-8")
    wiki = data / "wikitext-2-raw" / "wiki.test.raw"
    if wiki.is_file():
        return wiki.read_text(encoding="utf-8")
    print(f"note: no text in {data}; made-up words instead", file=sys.stderr)
    rng = random.Random(0)
    words = [f"word{i}" for i in range(5000)]
    return "\n".join(" ".join(rng.choices(words, k=rng.randint(5, 60))) for _ in range(40_000)) + "\n"


def build_model(args, lines, folder):
    """A byte-level BPE trained on the text, and a GPT-2 with random weights from one seed."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=16_000 if args.model == "124m" else 1_000, special_tokens=[END])
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=END, bos_token=END, unk_token=END)
    ends = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if args.model == "124m":
        # 12 x 768, 1024 positions, 50,257 rows (not len(tokenizer): the docstring says why)
        config = GPT2Config(**ends)
    else:
        sizes = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": args.block_size}
        config = GPT2Config(vocab_size=len(tokenizer), **sizes, **ends)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)  # as every row loads it


def hold_out(tokenizer, lines, count):
    """The lines, and the last of them that hold `count` tokens or more: ours' validation text."""
    n, held = len(lines), 0
    while held < count and n > 1:
        n -= 1
        held += len(tokenizer(lines[n])["input_ids"])
    return lines[:n], lines[n:]


def run_in_own_process(argv, work, row):
    """One row in a fresh Python process: its peak memory is its own, and no row inherits
    another's compiled code or Accelerate state. Its output goes to <work>/<row>.log; a row that
    fails is reported, and the others still run."""
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", row, "--work", str(work)]
    env = dict(os.environ, HF_DATASETS_CACHE=str(work / "datasets-cache"), PYTHONUNBUFFERED="1")
    print(f"{row}: running ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    log = work / f"{row}.log"
    log.write_text(proc.stdout + proc.stderr)
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not found:
        last = (proc.stderr.strip() or proc.stdout.strip() or "?").splitlines()[-1][:300]
        print(f"{row}: FAILED (exit code {proc.returncode}): {last}; see {log}", file=sys.stderr)
        return {"error": last}
    print(f"{row}: done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return json.loads(found[-1][len("RESULT ") :])


# ---- The rows, each in its own process.
def run_row(args):
    """Train this process's row, then print one RESULT line for the parent."""
    if args.child in ("ours", "ours-compile"):
        result = ours(args, compiled=args.child == "ours-compile")
    elif args.child in ("trainer", "trainer-fast"):
        result = trainer(args, fast=args.child == "trainer-fast")
    else:
        result = minimal(args)
    print("RESULT " + json.dumps(result))


def ours(args, compiled):
    """finetune_gpt2.py itself; tokens/s and the loss from the log_history.json it writes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import finetune_gpt2

    work, out = args.work, args.work / args.child
    shutil.rmtree(out, ignore_errors=True)  # fresh: with checkpoints there, the script resumes
    argv = [
        *("--model_name_or_path", work / "model", "--output_dir", out),
        *("--train_file", work / "train.txt", "--validation_file", work / "valid.txt"),
        *("--block_size", args.block_size, "--per_device_train_batch_size", args.batch_size),
        *("--max_train_steps", args.steps, "--mixed_precision", args.precision),
        *("--learning_rate", args.learning_rate, "--logging_steps", args.logging_steps),
        *("--save_every_minutes", 0, "--max_new_tokens", 0),
    ]
    finetune_gpt2.main([str(arg) for arg in argv] + (["--torch_compile"] if compiled else []))
    logged = [e for e in json.loads((out / "log_history.json").read_text()) if "tokens_per_second" in e]
    rate = statistics.median(e["tokens_per_second"] for e in logged if e["step"] > args.warmup_steps)
    with torch.device("meta"):  # counting FLOPs needs the shapes only
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(work / "model"))
    return summary(args, model, rate, logged[-1]["train_loss"], logged[-1]["step"])


def trainer(args, fast):
    """Hugging Face's Trainer, fed as run_clm.py feeds it; a callback notes the time of each log."""
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, default_data_collator

    class LogClock(TrainerCallback):
        """(step, time) where training starts and at each log, and the logged losses. A log comes
        after the loss is read back (a host sync): the device's work is done by then."""

        def __init__(self):
            self.times, self.losses = [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.times.append((0, time.perf_counter()))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:  # not the summary at the end
                self.times.append((state.global_step, time.perf_counter()))
                self.losses.append(logs["loss"])

    model = AutoModelForCausalLM.from_pretrained(args.work / "model")
    # run_clm's group_texts: the token stream cut into blocks (the rest dropped), labels = inputs
    # (the model shifts them).
    tokens = torch.from_numpy(np.load(args.work / "train_tokens.npy")).long()
    blocks = tokens[: len(tokens) // args.block_size * args.block_size].view(-1, args.block_size)
    train_dataset = [{"input_ids": block, "labels": block} for block in blocks]
    options = dict(
        output_dir=str(args.work / args.child), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.learning_rate, bf16=args.precision == "bf16", fp16=args.precision == "fp16",
        logging_steps=args.logging_steps, save_strategy="no", report_to=[],
    )  # fmt: skip
    if fast:
        options |= dict(torch_compile=True, logging_nan_inf_filter=False, accelerator_config={"non_blocking": True})
        if DEVICE.type == "cuda":
            options |= dict(optim="adamw_torch_fused", dataloader_num_workers=2, dataloader_persistent_workers=True)
            options["tf32"] = torch.cuda.get_device_capability() >= (8, 0)  # from Ampere on
    clock = LogClock()
    hf_trainer = Trainer(
        model=model, args=TrainingArguments(**options), train_dataset=train_dataset,
        data_collator=default_data_collator, callbacks=[clock],
    )  # fmt: skip
    hf_trainer.train()
    # Its loss reads (block - 1) / block of the others' (0.1% at 1024): transformers 5.24's Trainer
    # divides by every label, the last one of each block too, which predicts nothing (GPT-2's
    # `loss_type` is None, so it does not see a shifting loss). As it is, not corrected here.
    return summary(args, model, median_rate(args, clock.times), clock.losses[-1], hf_trainer.state.global_step)


def minimal(args):
    """The loop nanoGPT's train.py runs, on the same model: what the hardware gives."""
    from transformers import AutoModelForCausalLM

    on_gpu = DEVICE.type == "cuda"
    torch.manual_seed(42)  # the seed ours and the Trainer use (dropout)
    torch.backends.cuda.matmul.allow_tf32 = True  # as ours; it matters only with --precision no
    model = AutoModelForCausalLM.from_pretrained(args.work / "model", attn_implementation="sdpa").to(DEVICE)
    model.train()
    # The whole token stream on the device (a few MB): batches are gathered there, host-free.
    tokens = torch.from_numpy(np.load(args.work / "train_tokens.npy")).long().to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0, fused=on_gpu)
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=args.precision == "fp16")  # loss scaling
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)

    def loss_of(x, y):
        """Every position predicts the next token. Compiled together with the model (nanoGPT's
        forward returns the loss), so that Inductor may fuse the loss with the output layer."""
        with torch.autocast(DEVICE.type, dtype=dtype, enabled=dtype is not None):
            logits = model(input_ids=x).logits
            return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    if on_gpu or args.compile_on_cpu:
        loss_of = torch.compile(loss_of)
    offsets = torch.arange(args.block_size + 1, device=DEVICE)
    generator = torch.Generator(device=DEVICE).manual_seed(42)
    window, times = [], [(0, time.perf_counter())]
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:  # the linear decay to 0 the other rows use
            group["lr"] = args.learning_rate * (1 - (step - 1) / args.steps)
        starts = torch.randint(
            len(tokens) - args.block_size - 1, (args.batch_size,), device=DEVICE, generator=generator
        )
        # batch x (block + 1) tokens: the inputs and, one position further, the targets
        chunk = tokens[starts[:, None] + offsets]
        loss = loss_of(chunk[:, :-1], chunk[:, 1:])
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients, at 1.0 as the others do
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.detach())
        if step % args.logging_steps == 0:
            last_loss = torch.stack(window).mean().item()  # the one host sync: waits for the device
            times.append((step, time.perf_counter()))
            window = []
    return summary(args, model, median_rate(args, times), last_loss, times[-1][0])


def median_rate(args, times):
    """The median of the tokens/s in each logging window that ends after --warmup_steps, from
    (step, time) at the windows' ends: what ours' logged windows give."""
    tokens_per_step = args.batch_size * args.block_size
    pairs = zip(times, times[1:])
    rates = [(s1 - s0) * tokens_per_step / (t1 - t0) for (s0, t0), (s1, t1) in pairs if s1 > args.warmup_steps]
    return statistics.median(rates)


def summary(args, model, tokens_per_second, last_loss, steps):
    """A row's result. One MFU formula for every row: flops_per_token of the model at this
    block size, x tokens/s, / the device's dense peak."""
    flops = throughput.flops_per_token(model, args.block_size)
    peak = throughput.peak_flops(DEVICE, args.precision)  # None on a CPU or a GPU not in its table
    return {
        "tokens_per_second": tokens_per_second,
        "mfu": tokens_per_second * flops / peak if peak else None,
        "flops_per_token": flops,
        "peak_memory_gib": peak_memory_gib(),
        "last_loss": last_loss,
        "steps": steps,
    }


def peak_memory_gib():
    """GPU: the most that tensors held at once. CPU: the process's peak resident memory (each row
    has a process of its own)."""
    if DEVICE.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---- The table.
def device_name():
    return torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"


def settings(args):
    names = ("model", "block_size", "batch_size", "steps", "warmup_steps", "logging_steps", "learning_rate")
    return {name: getattr(args, name) for name in names} | {"precision": args.precision}


def print_table(args, results):
    memory = "GPU" if DEVICE.type == "cuda" else "RSS"
    print(
        f"\n{device_name()}, torch {torch.__version__}; GPT-2 {args.model}, {args.batch_size} x {args.block_size} "
        f"tokens, precision {args.precision}, {args.steps} steps ({args.warmup_steps} warm-up); each row alone"
    )
    print(f"| row | runs | tokens/s | MFU | peak memory ({memory}) | last loss | vs trainer | vs minimal |")
    print("|---|---|---|---|---|---|---|---|")
    for row, r in results.items():
        what = ROWS[row]
        if row == "minimal":
            what += ", compiled" if DEVICE.type == "cuda" or args.compile_on_cpu else ", not compiled"
        if "error" in r:
            print(f"| {row} | {what} | FAILED: {r['error']} | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(
            f"| {row} | {what} | {r['tokens_per_second']:,.0f} | {mfu} | {r['peak_memory_gib']:.2f} GiB | "
            f"{r['last_loss']:.4f} | {ratio(r, results.get('trainer'))} | {ratio(r, results.get('minimal'))} |"
        )
    if throughput.peak_flops(DEVICE, args.precision) is None:
        print("MFU n/a: no dense peak FLOP/s is known for this device (GPUs in throughput.PEAK_FLOPS only).")


def ratio(result, base):
    if not base or "error" in base:
        return "-"
    return f"{result['tokens_per_second'] / base['tokens_per_second']:.2f}x"


if __name__ == "__main__":
    main()
