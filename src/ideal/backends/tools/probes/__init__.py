"""Scripts that each tool's own Python runs (backends/tools/parity_run.py): never imported by `ideal`.

Each loads a round's export through the tool's own data pipeline, from the training config that
the preset rendered, and writes what the tool would train on as JSON:

    <tool's python> <probe>.py TRAINER_YAML OUT_JSON

    {"tool": "llamafactory", "version": "0.9.5",
     "datasets": [{"file": "/abs/export/add.jsonl", "rows": 23,
                   "kept": [{"index": 0, "input_ids": [...], "labels": [...]}, ...],
                   "dropped": [{"index": 4, "reason": "..."}]}, ...],
     "trained": 58,            # rows of the dataset its trainer builds from the whole config
     "notes": ["..."]}

`index` is the row's line in the dataset's file (0-based), `labels` unshifted with -100 where
no loss is taken (the Hugging Face convention, as ideal's). The probes import nothing of ideal and
only the standard library beside the tool, so they run in the tool's virtual environment as they
are.

    lf_rows.py       LLaMA-Factory's `get_dataset` over the rendered config
    axolotl_rows.py  axolotl's `load_datasets` over the rendered config
    trl_rows.py      TRL's dataset preparation (`trl-cli`) over the rendered config

May import: nothing of ideal (the standard library and the tool's own packages).
"""
