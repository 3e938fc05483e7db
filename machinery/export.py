"""best/: an ordinary Hugging Face model folder that from_pretrained and pipeline load, gathered
from any engine's shards, swapped in whole, with a model card (README.md) that says what the
model is and how to make it again, a loss curve, and the upload to the Hub.

Tests (in tests/, unless named otherwise):
- test_launch_paths.py::test_every_engine_exports_what_it_evaluated
- test_finetune_gpt2.py::test_the_model_card_says_what_the_model_is_and_how_to_make_it_again
- test_train_classifier.py (push_to_hub tests)"""

import json
import shutil
from pathlib import Path

import huggingface_hub
import torch
from accelerate.utils import broadcast_object_list
from matplotlib.figure import Figure

from machinery.atomic_files import delete_tree, swap_in, write_json
from machinery.errors import UserError, first_line
from machinery.evaluation import format_metrics
from machinery.xla import to_cpu


def export_model(accelerator, model, tokenizer, path, card=None):
    """A model folder that `from_pretrained` and `pipeline` load, with its model card
    (README.md), swapped in atomically. Every process takes part: under FSDP or DeepSpeed ZeRO-3
    each holds a shard, and `get_state_dict` gathers the full weights."""
    try:
        state_dict = accelerator.get_state_dict(model)
    except ValueError as err:  # ZeRO-3 without stage3_gather_16bit_weights_on_model_save
        raise UserError(
            f"cannot gather the model's weights to export them ({first_line(err)}); set "
            "stage3_gather_16bit_weights_on_model_save: true in the DeepSpeed config (as configs/deepspeed_zero3.yaml)"
        ) from None
    if accelerator.is_main_process:
        # A compiled model (--torch_compile) names each weight "_orig_mod.<name>"; from_pretrained
        # wants <name>.
        state_dict = {name.removeprefix("_orig_mod."): weight for name, weight in state_dict.items()}
        state_dict = to_cpu(state_dict)
        tmp = path.with_name(f".tmp-{path.name}")
        delete_tree(tmp)
        accelerator.unwrap_model(model, keep_torch_compile=False).save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if card is not None:
            card.save(tmp / "README.md")
        swap_in(tmp, path)
    accelerator.wait_for_everyone()


def model_card(args, about, state, metrics, accelerator, model, loss_curve=False):
    """best/README.md, for people and for the Hub (which reads the metadata that
    huggingface_hub's ModelCardData writes), from the template model_card.md: what the model does
    and what it started from, its data, its metrics and the step they were reached at, the
    command that trains it again, the main settings, the hardware and the time, the evaluations
    so far. `about`: the script's pipeline_tag and task; `metrics`: eval_results.json's;
    `loss_curve`: best/ holds loss.png, which the card then shows."""
    config, hardware = accelerator.unwrap_model(model).config, hardware_of(accelerator)
    scores = {key: value for key, value in metrics.items() if key != "step"}
    meta = card_metadata(args, about, scores)
    base = args.model_name_or_path
    if base:
        origin = (
            f"fine-tuned from [{base}](https://huggingface.co/{base})" if meta.base_model else f"fine-tuned from {base}"
        )
    else:
        sizes = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
        origin = f"trained from scratch ({type(config).__name__}: "
        origin += ", ".join(f"{size} {getattr(config, size)}" for size in sizes) + ")"
    batch = f"{args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} accumulated"
    settings = {
        "learning rate": f"{args.learning_rate}, {args.lr_scheduler_type}, {args.num_warmup_steps} warmup steps",
        "weight decay, gradient clipping": f"{args.weight_decay}, {args.max_grad_norm}",
        "batch": f"{batch} x {hardware['processes']} process(es)",
        "seed": args.seed,
        "hardware": f"{hardware['processes']} x {hardware['device']}, mixed precision {hardware['precision']}",
        "training time": f"{state.train_seconds / 60:.1f} minutes",
    }
    evaluations = [entry for entry in state.log_history if "eval_loss" in entry]
    eval_keys = [key for key in evaluations[-1] if key.startswith("eval_")] if evaluations else []
    held_out = f"the last {args.validation_split_percentage}% of the training lines or rows"
    return huggingface_hub.ModelCard.from_template(
        meta, template_path=str(Path(__file__).with_name("model_card.md")), name=Path(args.output_dir).name,
        task=about["task"], origin=origin, step=metrics.get("step"), steps_done=state.completed_steps, scores=scores,
        data=data_name(args), validation=args.validation_file or held_out, command=args.command, settings=settings,
        evaluations=evaluations, eval_keys=eval_keys, loss_curve=loss_curve,
    )  # fmt: skip


def hardware_of(accelerator):
    """How many processes on which device (a GPU by its name), in which precision."""
    device = accelerator.device.type.upper()
    if device == "CUDA":
        device = torch.cuda.get_device_name(accelerator.device)
    return {"processes": accelerator.num_processes, "device": device, "precision": accelerator.mixed_precision}


def write_final_outputs(accelerator, args, state, best, test_metrics=None):
    """The end of a run, on the main process: log_history.json and loss.png in --output_dir;
    best/'s test metrics (test_*) added to eval_results.json; best/'s model card rewritten with
    the whole run's evaluations and its loss curve; best/ uploaded with --push_to_hub. `best`:
    common.BestModel."""
    output_dir = Path(args.output_dir)
    write_json(output_dir / "log_history.json", state.log_history)
    plot_history(state.log_history, output_dir / "loss.png", ("eval_loss", f"eval_{best.metric_name}"))
    results = json.loads((output_dir / "eval_results.json").read_text()) | (test_metrics or {})
    write_json(output_dir / "eval_results.json", results)
    shutil.copy(output_dir / "loss.png", best.dir / "loss.png")
    state.count_train_time()
    model_card(args, best.about, state, results, accelerator, best.model, loss_curve=True).save(best.dir / "README.md")
    print(f"Best {best.metric_name}: {state.best_metric:.4f} at step {state.best_step}; model in {best.dir}")
    if test_metrics:
        print(f"best/ on the test data: {format_metrics(test_metrics)}")
    if args.push_to_hub:
        push_to_hub(args, best.dir, state.best_step)


def card_metadata(args, about, scores):
    """The model card's metadata, which the Hub reads: library, pipeline, base model and data set
    (when they are on the Hub), metrics and results (model-index)."""
    base = args.model_name_or_path
    hub_data = None if args.train_file else args.dataset_name
    results = []
    for key, value in scores.items():
        result = huggingface_hub.EvalResult(
            task_type=about["pipeline_tag"], dataset_type=hub_data or "local", dataset_name=data_name(args),
            metric_type=key, metric_value=value,
        )  # fmt: skip
        results.append(result)
    return huggingface_hub.ModelCardData(
        library_name="transformers",
        pipeline_tag=about["pipeline_tag"],
        base_model=base if base and not Path(base).exists() else None,  # a hub name, not a local folder
        datasets=[hub_data] if hub_data else None,
        metrics=sorted({key.removeprefix("test_") for key in scores}),
        model_name=Path(args.output_dir).name,
        eval_results=results,
    )


def data_name(args):
    return args.train_file or f"{args.dataset_name} ({args.dataset_config_name or 'default'})"


def plot_history(log_history, path, eval_keys=("eval_loss",)):
    """loss.png: the training loss and the eval metrics against optimizer steps; losses on the
    left axis, other metrics (accuracy, perplexity, ...) on the right. A bare Figure, without
    pyplot: no display needed."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for key in ("train_loss", *dict.fromkeys(eval_keys)):
        points = [(e["step"], e[key]) for e in log_history if key in e]
        if points and key.endswith("loss"):
            ax.plot(*zip(*points), "-" if key == "train_loss" else "o-", label=key.replace("_", " "))
        elif points:  # a metric that is no loss: on an axis of its own, on the right
            other = ax.twinx()
            other.plot(*zip(*points), "s--", color="tab:green", label=key.replace("_", " "))
            other.set(ylabel=key.replace("_", " "))
            other.legend(loc="upper right")
    ax.set(xlabel="optimizer step", ylabel="loss")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def check_the_hub_first(accelerator, args):
    """--push_to_hub, checked before any data or model is loaded: an upload that cannot happen
    stops the run now, on every process, with the main process's reason."""
    if args.push_to_hub:
        problem = broadcast_object_list([hub_problem(args) if accelerator.is_main_process else None])[0]
        if problem:
            raise UserError(problem)


def hub_problem(args):
    """--push_to_hub: why the model could not be uploaded at the end, or None. The Hub must
    answer and the token may write to the repository, which is made now (or found), as Hugging
    Face's example scripts do: not after hours of training."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "--push_to_hub: HF_HUB_OFFLINE is set, so the Hub cannot be reached; unset it, or drop --push_to_hub"
    try:
        api = huggingface_hub.HfApi(token=args.hub_token)
        api.create_repo(hub_repository(api, args), private=args.hub_private_repo, exist_ok=True)
    except Exception as err:  # no network, no token saved, a token that may only read
        refused = getattr(getattr(err, "response", None), "status_code", None) == 403
        why = "the token may not write there" if refused else "check the network and `hf auth login`"
        return (
            f"--push_to_hub: {first_line(err)}; {why}: pass --hub_token, another --hub_model_id, or drop --push_to_hub"
        )
    return None


def hub_repository(api, args):
    """--hub_model_id, else <the logged-in user>/<the output folder's name>."""
    return args.hub_model_id or f"{api.whoami()['name']}/{Path(args.output_dir).name}"


def push_to_hub(args, folder, step):
    """Upload best/ and its card: one call to huggingface_hub. A failure leaves the local model
    as it is, and the same command, run again after the training finished, tries only the upload
    again."""
    api = huggingface_hub.HfApi(token=args.hub_token)
    try:
        repo = hub_repository(api, args)
        api.upload_folder(repo_id=repo, folder_path=folder, commit_message=f"best/ at step {step}")
    except Exception as err:  # the network, the Hub, the quota: the model is safe on disk
        raise UserError(
            f"--push_to_hub: uploading {folder} failed ({first_line(err)}); it is safe on disk: run the same command "
            "again to retry the upload"
        ) from None
    print(f"Uploaded {folder} to https://huggingface.co/{repo}")
