"""The second layer: the machinery behind the scripts' promises, one job a module. A learner never
needs to open it: a script and common.py say what each call does. An engineer who wants to know how
a promise is kept finds the module by its name; each one's docstring says which promise it keeps and
which tests prove it. Nothing here imports common.py or a script.

    command           a script run as a command: bad input becomes one line and exit code 2
    errors            UserError: a problem and its fix, in one line
    flags             the flags every script takes; the command line, without the Hub token
    colab             Google Drive: where it is mounted, and mounting it for --drive
    engines           DeepSpeed, FSDP2: what each needs before prepare()
    xla               TPUs: the gaps between XLA and what Accelerate and transformers assume
    waits             processes that wait for each other outside a collective
    output_lock       one run per output folder, seen by every machine
    signals           SIGTERM and Ctrl-C stop a run only after it saved
    atomic_files      files and folders that appear whole or not at all
    checkpoint_files  which checkpoints may be resumed, and how they are loaded safely
    sampling          the training order that makes a resumed run exact
    data_files        local files, hub data sets and models, each failure one line
    text_samples      the language models' text, of any size
    token_files       a corpus tokenized once into a flat file read through np.memmap
    streaming         text larger than the disk, resumed at the very next block
    throughput        tokens per second and model FLOPs utilization
    evaluation        --eval_only, --test_file with best/, metrics without the network
    fixed_masks       the masked LM's evaluation masks, drawn once and for all
    export            best/: the model folder, its model card, its loss curve, the Hub
    batch_finder      --auto_find_batch_size
    columns           the classifier's files, columns and labels
"""
