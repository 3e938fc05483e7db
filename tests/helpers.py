"""Tiny models and toy data, built inside the tests (no downloads)."""

import csv
import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FILLER = [f"w{i}" for i in range(40)]


def make_tiny_bert(path):
    """A 2-layer BERT with a word-level vocabulary, saved like a hub model."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "great", "awful", *FILLER]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)  # the same "pretrained" weights in every test session
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def toy_rows(n, seed, pair=False):
    """Sentences of filler words with one sentiment word; the label follows it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        cue = rng.choice(["good", "great"] if label == "pos" else ["bad", "awful"])
        words = rng.choices(FILLER, k=rng.randint(3, 12))
        words.insert(rng.randrange(len(words) + 1), cue)
        if pair:
            rows.append(
                {
                    "sentence1": " ".join(rng.choices(FILLER, k=rng.randint(2, 8))),
                    "sentence2": " ".join(words),
                    "label": label,
                }
            )
        else:
            rows.append({"text": " ".join(words), "label": label})
    return rows


def write_csv(path, rows, delimiter=","):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def offline_env(**extra):
    """The environment of a script the tests run: offline, and MKL on one thread. Tests compare
    runs to the bit; MKL's matrix products give other last bits when split over another number
    of threads, and MKL may choose to use fewer than it has (MKL_DYNAMIC). A CI run's weights once
    differed in their last bits from those of the same command, while its metrics matched."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env | {"MKL_NUM_THREADS": "1", **extra}


def script_command(script, *args):
    return [sys.executable, str(REPO / script), *map(str, args)]


def run_script(script, *args, check=True, timeout=300):
    proc = subprocess.run(
        script_command(script, *args), cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def digest(folder):
    """sha256 of every file under folder: to show that nothing in it changed."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------------
# GLUE's nine tasks, in the exact shape of their files (as GLUE's download script
# writes them) and of their hub data sets (nyu-mll/glue), with learnable toy content:
# the label follows a cue word (good/great vs bad/awful) in the last text column.
# ---------------------------------------------------------------------------

TWO = ("bad", "good")  # cue word by label, for two classes
MNLI_LABELS = ("entailment", "neutral", "contradiction")
MNLI_CUES = {"entailment": "good", "neutral": "great", "contradiction": "bad"}


def toy_pair(rng, cue, quote=False):
    """Two sentences of filler words; the second holds the cue. Some carry the quote characters
    and words ("NA", "null") that real GLUE sentences have, a quote inside one sentence and one
    that opens the other (as in SST-2's `" the film ...`): a reader that takes quotes for CSV
    quoting would join rows."""
    first = " ".join(rng.choices(FILLER, k=rng.randint(2, 8)))
    words = rng.choices(FILLER, k=rng.randint(2, 8))
    words.insert(rng.randrange(len(words) + 1), cue)
    if quote:
        first = f'he said " {first} " , NA'
        words.insert(0, '"')
    return first, " ".join(words)


def glue_file_lines(task, n, seed, dev=False):
    """The lines of a GLUE task's train.tsv (dev.tsv / dev_matched.tsv with dev=True)."""
    rng = random.Random(seed)
    header = {
        "cola": None,  # CoLA's train and dev files have no header row
        "sst2": "sentence\tlabel",
        "mrpc": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
        "qqp": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
        "qnli": "index\tquestion\tsentence\tlabel",
        "rte": "index\tsentence1\tsentence2\tlabel",
        "wnli": "index\tsentence1\tsentence2\tlabel",
        "mnli": "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
        "sentence2_parse\tsentence1\tsentence2\t"
        + ("label1\tlabel2\tlabel3\tlabel4\tlabel5\t" if dev else "label1\t")
        + "gold_label",
        "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
    }[task]
    lines = [header] if header else []
    for i in range(n):
        y = rng.randint(0, 1)
        s1, s2 = toy_pair(rng, rng.choice([TWO[y], ("awful", "great")[y]]), quote=i % 7 == 3)
        nli = ("not_entailment", "entailment")[y]
        if task == "cola":
            fields = ["gj04", str(y), "" if y else "*", s2]
        elif task == "sst2":
            fields = [s2 + " ", str(y)]  # SST-2's sentences end with a space
        elif task == "mrpc":
            fields = [str(y), str(1000 + 2 * i), str(1001 + 2 * i), s1, s2]
        elif task == "qqp":
            fields = [str(i), str(2 * i), str(2 * i + 1), s1 + " ?", s2 + " ?", str(y)]
        elif task == "qnli":
            fields = [str(i), s1 + " ?", s2, nli]
        elif task in ("rte", "wnli"):
            fields = [str(i), s1, s2, nli if task == "rte" else str(y)]
        elif task == "mnli":
            gold = rng.choice(MNLI_LABELS)
            s1, s2 = toy_pair(rng, MNLI_CUES[gold])
            votes = [gold] * (5 if dev else 1)
            fields = [str(i), str(3 * i), f"{3 * i}{gold[0]}", "fiction", f"( {s1} )", f"( {s2} )", "(ROOT)", "(ROOT)"]
            fields += [s1, s2, *votes, gold]
        else:  # stsb: a similarity score from 0 to 5
            score = (3.5 if y else 0.5) + rng.random() * 1.5
            fields = [str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", s1, s2, f"{score:.3f}"]
        lines.append("\t".join(fields))
    if task == "qqp" and not dev:
        # A question with a line break in it: GLUE's QQP has a few such rows, cut in two.
        lines.insert(5, "9999\t19998\t19999\tWhy does this question")
        lines.insert(6, "hold a line break ?\tw1 good w2 ?\t1")
    return lines


def glue_test_lines(task, n, seed=3):
    """The lines of a GLUE task's test.tsv (MNLI: test_matched.tsv), as GLUE's download script
    writes them: no label, an `index` column (QQP: `id`), and a header even where the training
    file has none (CoLA)."""
    rng = random.Random(seed)
    header = {
        "cola": "index\tsentence",
        "sst2": "index\tsentence",
        "mrpc": "index\t#1 ID\t#2 ID\t#1 String\t#2 String",
        "qqp": "id\tquestion1\tquestion2",
        "qnli": "index\tquestion\tsentence",
        "rte": "index\tsentence1\tsentence2",
        "wnli": "index\tsentence1\tsentence2",
        "mnli": "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
        "sentence1_parse\tsentence2_parse\tsentence1\tsentence2",
        "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2",
    }[task]
    lines = [header]
    for i in range(n):
        s1, s2 = toy_pair(rng, rng.choice(["good", "bad", "great", "awful"]), quote=i % 7 == 3)
        fields = {
            "cola": [str(i), s2],
            "sst2": [str(i), s2 + " "],
            "mrpc": [str(i), str(3000 + 2 * i), str(3001 + 2 * i), s1, s2],
            "qqp": [str(i), s1 + " ?", s2 + " ?"],
            "qnli": [str(i), s1 + " ?", s2],
            "mnli": [str(i), str(3 * i), f"{3 * i}n", "fiction", f"( {s1} )", f"( {s2} )", "(ROOT)", "(ROOT)", s1, s2],
            "stsb": [str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", s1, s2],
        }.get(task, [str(i), s1, s2])
        lines.append("\t".join(fields))
    return lines


def write_glue_test(task, folder, n=30):
    folder = Path(folder)
    path = folder / ("test_matched.tsv" if task == "mnli" else "test.tsv")
    path.write_text("\n".join(glue_test_lines(task, n)) + "\n", encoding="utf-8")
    return path


def write_glue_task(task, folder, n_train=200, n_dev=40):
    """train.tsv and dev.tsv (MNLI: dev_matched.tsv) of `task` in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dev_name = "dev_matched.tsv" if task == "mnli" else "dev.tsv"
    for name, n, seed, dev in (("train.tsv", n_train, 1, False), (dev_name, n_dev, 2, True)):
        (folder / name).write_text("\n".join(glue_file_lines(task, n, seed, dev)) + "\n", encoding="utf-8")
    return folder / "train.tsv", folder / dev_name


# nyu-mll/glue on the hub: text columns and label names per task (None: a float score).
GLUE_HUB = {
    "cola": (["sentence"], ["unacceptable", "acceptable"]),
    "sst2": (["sentence"], ["negative", "positive"]),
    "mrpc": (["sentence1", "sentence2"], ["not_equivalent", "equivalent"]),
    "qqp": (["question1", "question2"], ["not_duplicate", "duplicate"]),
    "stsb": (["sentence1", "sentence2"], None),
    "mnli": (["premise", "hypothesis"], list(MNLI_LABELS)),
    "qnli": (["question", "sentence"], ["entailment", "not_entailment"]),
    "rte": (["sentence1", "sentence2"], ["entailment", "not_entailment"]),
    "wnli": (["sentence1", "sentence2"], ["not_entailment", "entailment"]),
}


def glue_hub_dataset(task, n_train=200, n_dev=40):
    """A DatasetDict with the splits, columns and features of nyu-mll/glue's `task`."""
    import datasets

    columns, names = GLUE_HUB[task]
    label = datasets.Value("float32") if names is None else datasets.ClassLabel(names=names)
    features = datasets.Features({**{c: datasets.Value("string") for c in columns}, "label": label})
    features["idx"] = datasets.Value("int32")
    rng = random.Random(task)

    def split(n, test=False):
        rows = {c: [] for c in features}
        for i in range(n):
            y = rng.randint(0, 1 if names is None else len(names) - 1)
            cue = MNLI_CUES[names[y]] if task == "mnli" else TWO[y]
            texts = toy_pair(rng, cue)[-len(columns) :]
            for c, t in zip(columns, texts):
                rows[c].append(t)
            value = (3.5 if y else 0.5) + rng.random() * 1.5 if names is None else y
            rows["label"].append(-1 if test and names else value)
            rows["idx"].append(i)
        return datasets.Dataset.from_dict(rows, features=features)

    if task == "mnli":
        splits = {"train": split(n_train), "validation_matched": split(n_dev), "validation_mismatched": split(n_dev)}
        splits |= {"test_matched": split(10, True), "test_mismatched": split(10, True)}
    else:
        splits = {"train": split(n_train), "validation": split(n_dev), "test": split(10, True)}
    return datasets.DatasetDict(splits)


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(script, *args, nproc=2, nnodes=1, node_rank=0, port=None, wrapper=None):
    """`torchrun` for CPU processes (gloo): one machine, or node `node_rank` of `nnodes` on
    localhost."""
    # torchrun as a module of this interpreter: the `torchrun` on PATH may belong to another Python
    # (an IDE or a CI system runs <venv>/bin/python without activating the venv).
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    command += ["--nnodes", str(nnodes), "--node_rank", str(node_rank)]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(port or free_port())]
    if wrapper:
        command.append(str(REPO / "tests" / wrapper))
    return command + [str(REPO / script), *map(str, args)]


def torchrun(script, *args, check=True, **options):
    proc = subprocess.run(
        torchrun_command(script, *args, **options),
        cwd=REPO,
        env=offline_env(ACCELERATE_USE_CPU="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"torchrun {script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def with_classifier_head(model_dir, target, labels):
    """A copy of a saved encoder with a sequence-classification head for `labels` already in it
    (drawn once, here), so that loading it for classification draws nothing at random."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(1)
    label2id = {name: i for i, name in enumerate(labels)}
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id
    )
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(target)
    return Path(target)


def without_dropout(model_dir, target):
    """A copy of a saved model with dropout off: runs that split their batches otherwise, or draw
    their random numbers on other processes, can then end at the same weights."""
    import json
    import shutil

    target = Path(shutil.copytree(model_dir, target))
    config = json.loads((target / "config.json").read_text())
    for key in config:
        if key.endswith(("dropout_prob", "_pdrop", "dropout")):
            config[key] = 0.0
    (target / "config.json").write_text(json.dumps(config))
    return target


def launch(runs, folder, nproc=1, timeout=300, distributed=None):
    """Run `runs` (dicts: see tests/launch_worker.py) one after another as one job of `nproc`
    processes on this machine, each run forked from a worker that imported everything once;
    returns each run's exit status (and writes each run's seconds into its dict). `distributed`:
    a process group even for one process (as torchrun)."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, run in enumerate(runs):
        run.setdefault("port", free_port())
        run.setdefault("log", str(folder / f"run{i}-{run['script']}.log"))
        run["argv"] = [str(a) for a in run["argv"]]
        run["argv_by_rank"] = {str(r): [str(a) for a in argv] for r, argv in run.get("argv_by_rank", {}).items()}
    plan = folder / "plan.json"
    plan.write_text(json.dumps({"runs": runs, "results": str(folder / "results.json"), "timeout": timeout}))
    env = offline_env(ACCELERATE_USE_CPU="1")
    distributed = nproc > 1 if distributed is None else distributed
    if distributed:  # as torchrun sets them; each run's children meet on the run's own MASTER_PORT
        env.update(MASTER_ADDR="127.0.0.1", WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
    workers = []
    for rank in range(nproc):
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank)) if distributed else env
        command = [sys.executable, str(REPO / "tests" / "launch_worker.py"), str(plan)]
        workers.append(subprocess.Popen(command, cwd=REPO, env=rank_env))
    for worker in workers:
        worker.wait(timeout=timeout * len(runs) + 60)
    results = json.loads((folder / "results.json").read_text())
    for run, (_, seconds) in zip(runs, results):
        run["seconds"] = seconds
    return [status for status, _ in results]


def log_of(run, rank=0):
    return Path(f"{run['log']}.rank{rank}").read_text()
