"""Evaluating without training: --eval_only (a model as it is, on the validation data and the test
file) and --test_file after training (best/, loaded whole on every process as users load it), and
metrics that do not need the network.

Tests (in tests/, unless named otherwise):
- test_finetune_gpt2.py::test_best_is_scored_on_the_test_file_and_eval_only_scores_a_model_without_
  training
- test_pretrain_mlm.py::test_best_is_scored_on_the_test_file_with_fixed_masks_and_eval_only_too
- test_launch_paths.py::test_eval_only_evaluates_the_whole_model
- test_train_classifier.py::test_metrics_without_network_do_not_hang"""

import contextlib
import os
from pathlib import Path

from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from machinery.atomic_files import write_json
from machinery.data_files import from_pretrained


def format_metrics(metrics):
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def load_metric(name, fallback):
    """An `evaluate` metric's compute(), or `fallback` (the same numbers) when the hub cannot be
    reached: evaluate fetches metric code from the hub on first use."""
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        with contextlib.suppress(Exception):  # no network: the fallback
            import evaluate

            return evaluate.load(name).compute
    return fallback


def prepare_for_evaluation(accelerator, model, dataloaders):
    """The model and a list of dataloaders for evaluation alone (--eval_only, a test set): every
    process holds the whole model, in the run's mixed precision. Nothing to shard without an
    optimizer (FSDP2 and DeepSpeed prepare a model only with one)."""
    model = accelerator.prepare_model(model.to(accelerator.device), evaluation_mode=True)
    prepared = [accelerator.prepare_data_loader(dataloader) for dataloader in dataloaders]
    return model, prepared


def evaluate_only(accelerator, args, model, run_evaluation, eval_dataloader, test_dataloader=None):
    """--eval_only: the script's `run_evaluation(accelerator, model, dataloader)` on the
    validation data, and the test data if given (its metrics named test_*), into
    <output_dir>/eval_results.json. No training, no checkpoint."""
    dataloaders = [eval_dataloader] if test_dataloader is None else [eval_dataloader, test_dataloader]
    model, dataloaders = prepare_for_evaluation(accelerator, model, dataloaders)
    metrics = run_evaluation(accelerator, model, dataloaders[0])
    if test_dataloader is not None:
        metrics |= {f"test_{k}": v for k, v in run_evaluation(accelerator, model, dataloaders[1]).items()}
    accelerator.print(f"eval: {format_metrics(metrics)}")
    if accelerator.is_main_process:
        write_json(Path(args.output_dir) / "eval_results.json", metrics)
    return metrics


def score_best(accelerator, auto_class, best_dir, run_evaluation, test_dataloader):
    """--test_file after training: best/ loaded whole on every process, as users load it, scored
    by the script's `run_evaluation(accelerator, model, dataloader)`: its metrics, named test_*
    (None without test data)."""
    if test_dataloader is None:
        return None
    unset_hf_deepspeed_config()  # training is over: ZeRO-3 must not split the model it loads
    model, dataloaders = prepare_for_evaluation(accelerator, from_pretrained(auto_class, best_dir), [test_dataloader])
    return {f"test_{k}": v for k, v in run_evaluation(accelerator, model, dataloaders[0]).items()}
