"""Runs a list of training runs, each in a child process forked from this one, for the launch-path
tests.

    python tests/launch_worker.py PLAN.json

helpers.launch starts one worker per process of a job (RANK, WORLD_SIZE, MASTER_ADDR set as torchrun
sets them), and each worker forks one child per run: the children of all workers make up that run's
job, on a port of its own. The worker imports torch, transformers and the scripts once; a forked
child starts at once, and one job can SIGKILL itself in the middle of a run and be started again,
many times over, without paying for Python's start each time.

A run (one entry of PLAN.json's "runs"):
    script: "train_classifier", "finetune_gpt2" or "pretrain_mlm"; argv: its arguments
        (argv_by_rank: {"1": ...} for a process that gets others); log: file for its output
    engine: "one", "ddp", "fsdp2" or "deepspeed" (the caller puts the engine's flags in argv)
    kill_at_evaluation: SIGKILL every process when the first evaluation starts (after the epoch's
        last step, whose checkpoint is saved by then when --checkpointing_steps divides the epoch)
    signal_when_saved: [signal, step, output folder]: send the signal once a checkpoint of that
        step is saved
    port: the job's MASTER_PORT
Each run's exit status (negative: killed by that signal) and seconds go to PLAN.json's "results"
file (rank 0's)."""

import importlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import common  # noqa: E402
import finetune_gpt2  # noqa: E402, F401
import pretrain_mlm  # noqa: E402, F401
import train_classifier  # noqa: E402, F401


def kill_at_first_evaluation():
    def evaluate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    common.eval_loop = evaluate


def child(run):
    """The run itself, in the forked child: output to its log, then exit with the script's
    status."""
    code = 1
    try:
        log = os.open(run["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.environ["MASTER_PORT"] = str(run["port"])
        if run.get("kill_at_evaluation"):
            kill_at_first_evaluation()
        if run["engine"] == "fsdp2":
            import fsdp_on_cpu

            fsdp_on_cpu.use_fsdp2()
        if run["engine"] == "deepspeed":
            import deepspeed_on_cpu

            deepspeed_on_cpu.use_deepspeed(run["zero_stage"])
        argv = run.get("argv_by_rank", {}).get(os.environ.get("RANK", "0"), run["argv"])
        importlib.import_module(run["script"]).main(argv)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def saved_step(out):
    """The most optimizer steps of any checkpoint saved in `out` so far (0 if none)."""
    steps = [0]
    for state in Path(out).glob("checkpoints/step_*/training_state.json"):
        try:
            steps.append(json.loads(state.read_text())["state"]["completed_steps"])
        except (OSError, ValueError, KeyError):  # being written
            pass
    return max(steps)


def wait(pid, timeout, signal_when_saved=None):
    """The run's exit status. signal_when_saved = [signal, step, out]: send that signal to the
    run once a checkpoint of that step or more is in `out` (a SIGKILL at a random moment, a
    SIGTERM from a scheduler, a Ctrl-C)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if signal_when_saved and saved_step(signal_when_saved[2]) >= signal_when_saved[1]:
            os.kill(pid, signal_when_saved[0])
            signal_when_saved = None
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)  # a job whose other processes died while this one waited for them
    os.waitpid(pid, 0)
    return "timeout"


def main(plan_path):
    plan = json.loads(Path(plan_path).read_text())
    results = []
    for run in plan["runs"]:
        run["log"] = f"{run['log']}.rank{os.environ.get('RANK', '0')}"
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            child(run)
        started = time.monotonic()
        status = wait(pid, plan.get("timeout", 300), run.get("signal_when_saved"))
        results.append((status, round(time.monotonic() - started, 1)))
        if os.environ.get("RANK", "0") == "0":
            Path(plan["results"]).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
