"""LLaMA-Factory's data pipeline over a round's export (probes/__init__.py has the JSON written).

    <LLaMA-Factory's python> lf_rows.py TRAINER_YAML OUT_JSON

Each dataset of the config is read by LLaMA-Factory's loader (its sharegpt converter: the rows it
calls abnormal come out empty) and each row goes through its supervised processor alone, so that a
row it drops keeps its place; `trained` is the length of the training set its `get_dataset` builds
from the whole config (concatenation, val_size), as training does.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile


def main(argv: list[str]) -> int:
    config_path, out_path = argv
    import llamafactory
    import yaml
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.data.loader import _get_dataset_processor, _load_single_dataset
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    with open(config_path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    with tempfile.TemporaryDirectory() as scratch:
        # nothing of the run is written: a scratch output directory, no tokenized cache
        config.update(
            output_dir=os.path.join(scratch, "out"),
            overwrite_cache=True,
            report_to="none",
            do_train=True,
        )
        config.pop("tokenized_path", None)
        model_args, data_args, training_args, _, _ = get_train_args(config)
        module = load_tokenizer(model_args)
        tokenizer = module["tokenizer"]
        template = get_template_and_fix_tokenizer(tokenizer, data_args)
        trained = get_dataset(template, model_args, data_args, training_args, "sft", **module)
        processor = _get_dataset_processor(
            data_args, "sft", template, tokenizer, module.get("processor")
        )
        datasets = []
        names = list(data_args.dataset or [])
        for attr in get_dataset_list(names, data_args.dataset_dir):
            rows = _load_single_dataset(attr, model_args, data_args, training_args)
            kept, dropped = [], []
            for index, row in enumerate(rows):
                out = processor.preprocess_dataset({key: [value] for key, value in row.items()})
                if not out["input_ids"]:
                    dropped.append(
                        {"index": index, "reason": "dropped by its converter or processor"}
                    )
                    continue
                kept.append(
                    {
                        "index": index,
                        "input_ids": list(out["input_ids"][0]),
                        "labels": list(out["labels"][0]),
                    }
                )
            datasets.append(
                {
                    "file": os.path.join(data_args.dataset_dir, attr.dataset_name),
                    "rows": len(rows),
                    "kept": kept,
                    "dropped": dropped,
                }
            )
        document = {
            "tool": "llamafactory",
            "version": llamafactory.__version__,
            "datasets": datasets,
            "trained": len(trained["train_dataset"]),
            "notes": [f"template {data_args.template}", f"cutoff_len {data_args.cutoff_len}"],
        }
    with open(out_path, "w", encoding="utf-8") as handle:
        json.dump(document, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
