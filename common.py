"""What the three training scripts share, written once: the device and its precision, the batches
and the optimizer, checkpoints saved and resumed, the bookkeeping the loop calls, the evaluation
loop, the outputs and Google Drive, and main(). Read a script first: its loop is the lesson, and
this file follows it in the order it calls. Nothing here knows a script's model or data.

The machinery behind the promises (the output folder's lock, stop signals, token files, streams,
the Hub, the engines, the batch finder) lives in machinery/, one job a module; a learner never
needs to open it. Imports go one way, downward: a script imports common.py and machinery/,
common.py imports machinery/, and nothing in machinery/ imports common.py or a script."""

import collections
import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import is_torch_xla_available, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
from transformers.trainer_pt_utils import get_parameter_names

from machinery import batch_finder, checkpoint_files, colab, command, engines, export, flags, xla
from machinery.atomic_files import delete_tree, recover_swaps, swap_in, write_json
from machinery.evaluation import format_metrics
from machinery.output_lock import lock_output_dir
from machinery.sampling import EpochSampler, global_batch_size
from machinery.signals import StopSignals
from machinery.throughput import Throughput


# ---- Device, precision and processes.
def setup(args, script_name):
    """Check the flags, start the Accelerator (device, precision, processes), check that
    --push_to_hub can upload, lock the output folder, seed, start the trackers."""
    flags.check_args(args)
    if torch.cuda.is_available():
        # TF32 matmuls: ~free speed on Ampere and newer, precision loss irrelevant for training.
        torch.backends.cuda.matmul.allow_tf32 = True
    xla.use_local_rank_zero()  # XLA without a TPU: one process is the first of its machine
    engines.forget_the_last_run()  # a notebook's second run in one process: its own precision
    accelerator = Accelerator(
        mixed_precision=choose_mixed_precision(args.mixed_precision),
        # torch.compile at prepare(): fuses kernels; the first steps are slow while it compiles.
        dynamo_backend="inductor" if args.torch_compile else "no",
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
        # One scheduler step per optimizer step; Accelerate's default (one per process) would
        # miscount warmup and decay.
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(
            # --streaming: each process reads the stream and keeps its share of each batch.
            dispatch_batches=False if args.streaming else None,
            # A GPU copies batches from pinned memory without making the CPU wait for the copy.
            non_blocking=torch.cuda.is_available(),
        ),
    )
    engines.adapt_to_the_engine(accelerator, args)  # DeepSpeed's config from the flags, XLA's gaps
    export.check_the_hub_first(accelerator, args)  # --push_to_hub: an upload that cannot happen stops the run now
    lock_output_dir(accelerator, args.output_dir)  # one run per output folder
    set_seed(args.seed)
    if args.report_to != "none":  # the settings, without a secret
        accelerator.init_trackers(script_name, config={k: v for k, v in vars(args).items() if k != "hub_token"})
    return accelerator


def choose_mixed_precision(requested):
    """--mixed_precision, else what `accelerate launch --mixed_precision` set, else (auto) the
    best for this device."""
    if requested != "auto":
        return requested
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no") != "no":
        return os.environ["ACCELERATE_MIXED_PRECISION"]
    # Accelerate runs on XLA wherever torch_xla is installed (a TPU, or its CPU client in tests).
    if is_torch_xla_available():
        return auto_mixed_precision("xla")
    if torch.cuda.is_available():
        return auto_mixed_precision("cuda", torch.cuda.get_device_capability())
    return auto_mixed_precision("cpu")


def auto_mixed_precision(device_type, capability=None):
    """bf16 on TPUs and on GPUs of compute capability 8.0 or more (A100, L4, H100), which compute
    in it natively. fp16 with loss scaling on older GPUs (Colab's T4 is 7.5, a V100 7.0): they
    have no bf16 units, and torch.cuda.is_bf16_supported() says yes there only because it counts
    slow emulation. "no" on a CPU."""
    if device_type == "xla":
        return "bf16"
    if device_type == "cuda":
        return "bf16" if tuple(capability) >= (8, 0) else "fp16"
    return "no"


# ---- Batches, optimizer steps, the optimizer.
def make_dataloaders(
    args, accelerator, collate_fn, train_data, eval_data, test_data=None, sampler=None, eval_collate_fn=None
):
    """The training DataLoader (None without training data: --eval_only), in an EpochSampler's
    order or `sampler`'s, and the evaluation ones (the test one None without test data), in
    order. `eval_collate_fn`: another collate_fn for evaluation. Every DataLoader has a generator
    of its own: without one, each new pass over it draws a seed from the global random state,
    which dropout uses and checkpoints restore, so a resumed run (one pass more) would drop other
    units. On a GPU, worker processes build the next batches while it computes, into pinned
    memory, which it copies from faster (not for a stream: its place is kept in this process)."""
    on_gpu = accelerator.device.type == "cuda"
    workers = (2 if on_gpu else 0) if args.dataloader_num_workers is None else args.dataloader_num_workers
    options = {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": on_gpu}

    def loader(data, batch_size, collate, **more_options):
        """A DataLoader with a generator of its own; None without data."""
        if data is None:
            return None
        return DataLoader(data, batch_size, collate_fn=collate, generator=torch.Generator(), **more_options)

    train_options = dict(options)
    if isinstance(train_data, torch.utils.data.IterableDataset):  # a stream: it keeps its place in this process
        train_options = {"pin_memory": on_gpu}
    elif train_data is not None:  # (no training data: --eval_only)
        batch = global_batch_size(args, accelerator)
        train_options["sampler"] = sampler or EpochSampler(len(train_data), batch, args.seed)
    eval_collate_fn = eval_collate_fn or collate_fn
    train = loader(train_data, args.per_device_train_batch_size, collate_fn, **train_options)
    evaluation = loader(eval_data, args.per_device_eval_batch_size, eval_collate_fn, **options)
    test = loader(test_data, args.per_device_eval_batch_size, eval_collate_fn, **options)
    return train, evaluation, test


def is_stream(dataloader):
    return isinstance(dataloader.dataset, torch.utils.data.IterableDataset)  # --streaming


Steps = collections.namedtuple("Steps", "per_epoch total epochs")  # how long a run trains, in optimizer steps


def count_steps(args, accelerator, train_dataloader):
    """Optimizer steps per epoch and in all, counted once, before `prepare` (the schedule needs
    them then): the dataloader gives every process's batches, and EpochSampler makes an epoch a
    whole number of global batches, so of optimizer steps. A stream (--streaming) has no length:
    it is one epoch of --max_train_steps (a stream that ends first starts again)."""
    if is_stream(train_dataloader):
        return Steps(args.max_train_steps, args.max_train_steps, 1)
    batches = len(train_dataloader) // accelerator.num_processes  # each process's share of an epoch
    per_epoch = math.ceil(batches / args.gradient_accumulation_steps)
    total = args.max_train_steps or args.num_train_epochs * per_epoch
    return Steps(per_epoch, total, math.ceil(total / per_epoch))


# Not decayed, as in transformers' Trainer: biases, norm weights of any class (Llama's RMSNorm too).
NO_DECAY_NAMES = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def make_optimizer(model, args, device):
    """AdamW without weight decay on biases and normalization weights (transformers' rule, as its
    Trainer applies it); fused on a GPU: one kernel for all parameters instead of one per tensor.
    On XLA (TPUs) the model is put on the device first, its tied weights tied again."""
    if device.type == "xla":
        xla.to_xla(model, device)
    decay = set(get_parameter_names(model, ALL_LAYERNORM_LAYERS, NO_DECAY_NAMES))
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in params if name in decay], "weight_decay": args.weight_decay},
        {"params": [p for name, p in params if name not in decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.learning_rate, fused=device.type == "cuda")


# ---- Where training stands, and checkpoints of it.
@dataclass
class TrainingState:
    """Where training stands, saved in every checkpoint (never guessed from folder names)."""

    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # micro-batches of the current epoch already trained on (per process)
    completed_steps: int = 0  # optimizer steps, over all epochs
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    evaluated_step: int | None = None  # the step of the last epoch-end evaluation, done and exported
    log_history: list = field(default_factory=list)
    stream_position: dict | None = None  # --streaming: where in the stream the used blocks end
    train_seconds: float = 0.0  # time spent in this run and the ones it resumed (for the model card)

    def __post_init__(self):
        self.clock = time.monotonic()  # not a field: not saved

    def count_train_time(self):
        """Add the time since the last count (or since this state was made or loaded)."""
        now = time.monotonic()
        self.train_seconds, self.clock = self.train_seconds + now - self.clock, now

    def start_next_epoch(self):
        self.epoch, self.batch_in_epoch, self.stream_position = self.epoch + 1, 0, None


class Checkpoints:
    """<output_dir>/checkpoints/step_N: folders that `accelerator.save_state` writes (the model as
    safetensors, optimizer, scheduler, gradient scaler and sampler states, random_states_<process>
    .pkl for each process; under FSDP or DeepSpeed, sub-folders of shards) plus training_state.json:
    the TrainingState, the settings and every file's size. `settings`: what the script's data adds
    to the flags that must match on resume (`may_change`: its flags that need not; the global batch
    may be split otherwise: another number of processes); `stream`: the StreamedBlocks of
    --streaming, whose place is saved too. A checkpoint made otherwise is refused in one line."""

    def __init__(self, accelerator, args, settings, may_change=(), stream=None):
        self.accelerator, self.args, self.stream = accelerator, args, stream
        self.dir = Path(args.output_dir) / "checkpoints"
        harmless = {*checkpoint_files.MAY_CHANGE_ON_RESUME, *may_change, "command"}
        self.settings = {k: v for k, v in vars(args).items() if k not in harmless}
        self.settings.update(settings, num_processes=accelerator.num_processes)
        self.last_save_time = time.monotonic()

    def resume(self):
        """The newest whole checkpoint (or --resume_from_checkpoint), loaded into the prepared
        objects: its TrainingState (one made with other settings is refused in one line). A fresh
        one if there is none, or with --no_resume, which deletes the checkpoints."""
        acc, args = self.accelerator, self.args
        if acc.is_main_process:
            recover_swaps(Path(args.output_dir))  # best/, if a crash came while it was replaced
        state = TrainingState()
        if args.no_resume:
            if acc.is_main_process:
                delete_tree(self.dir)
            acc.wait_for_everyone()
        else:
            saved = checkpoint_files.load_newest(acc, self.dir, self.settings, args)  # None: none to resume
            state = TrainingState(**saved) if saved else state
        if self.stream is not None:  # --streaming: the stream goes on from the checkpoint's place in it
            # Places kept: the blocks of 8 micro-batches of every process. The DataLoader reads at
            # most 2 of them ahead of those trained on (the one it hands out and the next).
            keep = 8 * args.per_device_train_batch_size * acc.num_processes
            self.stream.start_at(state.stream_position, keep)
        return state

    def due(self, state):
        """Whether to save now: every --checkpointing_steps, every --save_every_minutes, or when
        SIGTERM or Ctrl-C came. Step saves are the same on every process; the clock and signals
        are not, so with several processes they are compared (a collective: it waits for the
        devices) only at logging steps, which wait for them anyway."""
        steps, minutes = self.args.checkpointing_steps, self.args.save_every_minutes
        by_steps = bool(steps and state.completed_steps % steps == 0)
        by_clock = bool(minutes and time.monotonic() - self.last_save_time >= 60 * minutes)
        due = by_steps or by_clock or StopSignals.received is not None
        if self.accelerator.num_processes == 1:
            return due
        if state.completed_steps % self.args.logging_steps:
            return by_steps
        flag = torch.tensor([float(due)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def save(self, state):
        """Save a checkpoint of `state` under a temporary name, rename it when whole (a crash
        mid-save never leaves a newest one that cannot load), keep the newest --keep_last. With
        --streaming it records where the blocks used so far end, not those fetched ahead."""
        acc, name = self.accelerator, f"step_{state.completed_steps:08d}"
        state.count_train_time()  # a resumed run goes on counting from here
        if self.stream is not None and state.batch_in_epoch > 0:
            used = state.batch_in_epoch * self.args.per_device_train_batch_size * acc.num_processes
            state.stream_position = self.stream.position_after(used)
        tmp = self.dir / f".tmp-{name}"
        try:
            if acc.is_main_process:
                delete_tree(tmp)
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            acc.save_state(str(tmp))  # every process writes its part: its random state, its shards
            acc.wait_for_everyone()
            if acc.is_main_process:  # training_state.json, last: a checkpoint without it is not whole
                checkpoint_files.write_record(tmp, asdict(state), self.settings, self.dir)
        except OSError:  # a full disk or Drive: drop the partial save; the older checkpoints stay
            if acc.is_main_process:
                delete_tree(tmp)
            raise
        if acc.is_main_process:
            swap_in(tmp, self.dir / name)  # the same step saved again (at an epoch's end) replaces itself
            checkpoint_files.remove_old(self.dir, self.args.keep_last)
        acc.wait_for_everyone()
        self.last_save_time = time.monotonic()


def catch_stop_signals():
    """From here on SIGTERM (a scheduler's preemption, Colab's stop button) and Ctrl-C are only
    noted: the loop saves at its next optimizer step (several processes: its next logging step),
    then stops. A second one stops at once."""
    StopSignals.catch()


def stop_if_signalled(accelerator, state):
    """After a save: stop if SIGTERM or Ctrl-C asked for it (exit code 128 + the signal, as if it
    had killed the run)."""
    if StopSignals.received is None:
        return
    name = signal.Signals(StopSignals.received).name
    accelerator.print(f"\n{name} received: saved step {state.completed_steps}. Run the same command again to continue.")
    raise SystemExit(128 + StopSignals.received)


# ---- What the loop calls.
def finished(state, steps):
    """A run is finished when its last evaluation and export are done, not when its last
    optimizer step is: a run killed between the two (its last step's checkpoint was saved)
    evaluates again when it is re-run, exactly as the uninterrupted run did."""
    if state.stopped_early:
        return True
    return state.completed_steps >= steps.total and state.evaluated_step == state.completed_steps


class EpochBatches:
    """This epoch's batches still to train on: without those a resumed run already trained on
    (Accelerate's skip_first_batches), and none after the run's last optimizer step. After the
    loop, `ran_out` says whether the epoch's batches were all given (then the epoch is over; the
    last step may come before, with --max_train_steps). `transform(batch)`, if given, makes each
    batch what the model takes, as the loop takes it: in this process, in the order of training
    (the masked LM draws its masks there, from the random state that checkpoints restore)."""

    def __init__(self, accelerator, dataloader, state, steps, seed, transform=None):
        self.accelerator, self.state, self.steps, self.seed = accelerator, state, steps, seed
        self.dataloader, self.transform, self.ran_out = dataloader, transform, False
        if state.batch_in_epoch and not is_stream(dataloader):  # (a stream starts at its saved place)
            self.dataloader = accelerator.skip_first_batches(dataloader, state.batch_in_epoch)

    def __iter__(self):
        for batch in self.dataloader:
            if self.state.completed_steps >= self.steps.total:
                return  # the run's last step came inside this epoch
            xla.seed_xla_for_batch(self.accelerator, self.seed, self.state)  # TPUs: dropout as if never stopped
            yield batch if self.transform is None else self.transform(batch)
        self.ran_out = True


class Progress:
    """What a run shows while it trains: the plan, the progress bar, and every --logging_steps
    steps the training loss, learning rate, tokens/s and MFU, logged into the training state
    (saved with checkpoints) and the trackers. The loss stays on the device until then: .item()
    waits for the device, so it happens only every --logging_steps steps."""

    def __init__(self, accelerator, args, state, steps, flops_per_token):
        self.accelerator, self.args, self.state, self.steps = accelerator, args, state, steps
        self.throughput = Throughput(accelerator, flops_per_token)
        self.losses = []
        self.say_plan()
        disable = not accelerator.is_main_process  # one bar, on the main process
        self.bar = tqdm(total=steps.total, initial=state.completed_steps, disable=disable)

    def say_plan(self):
        acc, args, state, steps = self.accelerator, self.args, self.state, self.steps
        if finished(state, steps):
            acc.print(
                f"Training already finished in {args.output_dir} ({state.completed_steps} steps); "
                "raise --num_train_epochs or --max_train_steps to train further."
            )
            return
        per_device, accumulated = args.per_device_train_batch_size, args.gradient_accumulation_steps
        acc.print(
            f"Training for {steps.epochs} epochs, {steps.total} optimizer steps ({steps.per_epoch} per epoch), global "
            f"batch {global_batch_size(args, acc)} ({per_device} per device x {accumulated} accumulated x "
            f"{acc.num_processes} process(es)), {acc.device}, mixed precision: {acc.mixed_precision}"
        )

    def add_batch(self, loss, num_tokens):
        """A micro-batch's loss (kept on the device) and tokens, for the next log."""
        self.losses.append(loss.detach())
        self.throughput.add(num_tokens)

    def log_if_due(self, lr_scheduler):
        """After an optimizer step: the bar moves; every --logging_steps the mean loss is logged."""
        self.bar.update(1)
        if self.state.completed_steps % self.args.logging_steps:
            return
        mean = self.accelerator.reduce(torch.stack(self.losses).float().mean(), reduction="mean").item()
        metrics = {"train_loss": mean, "learning_rate": lr_scheduler.get_last_lr()[0], **self.throughput.report()}
        self.log(metrics)
        self.losses = []
        postfix = {"loss": f"{mean:.4f}", "lr": f"{metrics['learning_rate']:.2e}"}
        postfix["tok/s"] = f"{metrics['tokens_per_second']:.0f}"
        if "mfu" in metrics:
            postfix["mfu"] = f"{100 * metrics['mfu']:.1f}%"
        self.bar.set_postfix(postfix)

    def log_evaluation(self, metrics):
        """An epoch's evaluation: logged, and printed with the step and epoch it was made at."""
        self.log({f"eval_{k}": v for k, v in metrics.items()})
        epochs = self.state.completed_steps / self.steps.per_epoch  # a fraction if --max_train_steps ends mid-epoch
        self.accelerator.print(f"step {self.state.completed_steps} (epoch {epochs:.2f}): {format_metrics(metrics)}")

    def log(self, metrics):
        state = self.state
        state.log_history.append({"step": state.completed_steps, "epoch": state.epoch, **metrics})
        self.accelerator.log(metrics, step=state.completed_steps)

    @contextlib.contextmanager
    def paused(self):
        """Evaluating and saving are not training: their time is left out of tokens/s."""
        self.throughput.pause()
        yield
        self.throughput.resume()


# ---- Evaluation, and the best model.
@torch.no_grad()
def eval_loop(accelerator, model, dataloader, per_example):
    """`per_example(model, batch)` -> dict of tensors with one row per example, over the whole
    dataloader and every process. `gather_for_metrics` drops the examples that the last batch
    repeats to keep processes even, so metrics are exact for any number of processes; per-example
    values keep a small last batch from skewing means."""
    model.eval()  # dropout off; the loop turns it on again at its next epoch (model.train())
    parts, dtypes = {}, {}
    with batch_finder.out_of_memory_in_evaluation():  # says --per_device_eval_batch_size, in one line
        for batch in dataloader:
            for k, v in accelerator.gather_for_metrics(per_example(model, batch)).items():
                # Python numbers, not many small CPU tensors: on a CPU those would sit between the
                # freed big buffers of each batch (logits) and keep the allocator from returning
                # them (GBs over a long evaluation).
                parts.setdefault(k, []).extend(v.cpu().tolist())
                dtypes[k] = v.dtype
    return {k: torch.tensor(v, dtype=dtypes[k]) for k, v in parts.items()}


class BestModel:
    """<output_dir>/best: the model of the best evaluation so far, exported as a model folder
    that from_pretrained and pipeline load, with its model card and eval_results.json.
    `metric` picks it (for a loss, lower is better); `about`: the script's pipeline tag and task,
    for the model card."""

    def __init__(self, accelerator, args, model, tokenizer, metric, about):
        self.accelerator, self.args, self.model, self.tokenizer = accelerator, args, model, tokenizer
        self.metric_name, self.about = metric, about
        self.dir = Path(args.output_dir) / "best"

    def keep_if_better(self, state, metrics):
        """Export the model if `metrics` beat the best so far (best/ and eval_results.json), else
        count one more evaluation without improvement."""
        value, best = metrics[self.metric_name], state.best_metric
        # Lower is better for a loss, higher for any other metric (accuracy, F1, correlations); a
        # value that is no number (a diverged loss) never beats a number, and every number beats it.
        beaten = best is None or math.isnan(best) or (value < best if self.metric_name == "loss" else value > best)
        if not beaten:
            state.evals_without_improvement += 1
            return
        state.best_metric, state.best_step, state.evals_without_improvement = value, state.completed_steps, 0
        results = {"step": state.completed_steps, **metrics}
        state.count_train_time()  # for the model card
        card = export.model_card(self.args, self.about, state, results, self.accelerator, self.model)
        export.export_model(self.accelerator, self.model, self.tokenizer, self.dir, card)
        if self.accelerator.is_main_process:
            write_json(Path(self.args.output_dir) / "eval_results.json", results)


def stop_early_if_stuck(accelerator, args, state, metric_name):
    """--early_stopping_patience: after that many evaluations without improvement, mark the run
    stopped early (finished() then ends the loop; the epoch's checkpoint records it)."""
    patience = args.early_stopping_patience
    if patience and state.evals_without_improvement >= patience:
        accelerator.print(f"No improvement in {metric_name} for {patience} evaluations: stopping early.")
        state.stopped_early = True


def finish(accelerator, args, state, best, test_metrics=None):
    """The end of training: peak GPU memory; then, once, log_history.json and loss.png, best/'s
    test metrics (test_*, from score_best) into eval_results.json, its model card with the whole
    run's evaluations and curve, and the upload to the Hub with --push_to_hub."""
    accelerator.end_training()
    engines.load_whole_from_now_on(accelerator)  # DeepSpeed: the demo loads best/ whole, as users will
    if accelerator.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
        accelerator.print(f"Peak GPU memory: {peak:.2f} GiB")
    if accelerator.is_main_process:
        export.write_final_outputs(accelerator, args, state, best, test_metrics)


# ---- Where the outputs go, and main().
def resolve_output_dir(args, script_name):
    """--output_dir, else a folder on Google Drive in Colab with Drive mounted, else ./outputs."""
    colab.mount_drive_if_asked(args)  # --drive
    if args.output_dir:
        return Path(args.output_dir)
    if args.drive or (colab.in_colab() and os.path.isdir(colab.DRIVE_ROOT)):
        return Path(colab.DRIVE_ROOT) / colab.DRIVE_FOLDER / script_name
    return Path("outputs") / script_name


def run_script(train, parse_args, argv=None):
    """Every script's main(): train(parse_args(argv)), its outputs in --output_dir (else on Drive in
    Colab, else ./outputs); bad input, or a full disk, ends it with one line on stderr and exit code
    2, no traceback (machinery/command.py, which also runs --auto_find_batch_size's retries)."""
    script = Path(sys.modules[train.__module__].__file__)

    def parse(argv):
        args = parse_args(argv)
        args.output_dir = str(resolve_output_dir(args, script.stem))  # the last of parsing
        return args

    return command.run(train, parse, script.name, argv)
