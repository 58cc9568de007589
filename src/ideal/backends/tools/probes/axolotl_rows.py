"""axolotl's data pipeline over a round's export (probes/__init__.py has the JSON written).

    <axolotl's python> axolotl_rows.py TRAINER_YAML OUT_JSON

The config is read by axolotl's own loader (validated and normalised as `axolotl train` reads it).
Each dataset is tokenized by its own prompt strategy, rows kept in their file's order with their
line as a column, then passed through its own length handling (`sequence_len`,
`excess_length_strategy`, `min_sample_len`) and, under `sample_packing`, its filter of rows without
a trained token; with `dataset_exact_deduplication`, a row identical to an earlier one (of any
dataset) is dropped as its deduplication drops it. `trained` is the length of the training set its
`load_datasets` builds from the whole config (merge, deduplication, val_set_size), as training
does.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile

INDEX = "ideal_row_index"


def main(argv: list[str]) -> int:
    config_path, out_path = argv
    import axolotl
    import yaml
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.loaders import load_tokenizer
    from axolotl.utils.data.sft import _load_and_process_single_dataset
    from axolotl.utils.data.shared import datasets_with_name_generator
    from axolotl.utils.data.utils import handle_long_seq_in_dataset

    with open(config_path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    with tempfile.TemporaryDirectory() as scratch:
        # nothing of the run is written: scratch output and prepared-data directories
        config.update(
            output_dir=os.path.join(scratch, "out"),
            dataset_prepared_path=os.path.join(scratch, "prepared"),
        )
        path = os.path.join(scratch, "config.yaml")
        with open(path, "w", encoding="utf-8") as handle:
            yaml.safe_dump(config, handle)
        cfg = load_cfg(path)
        tokenizer = load_tokenizer(cfg)
        trained = len(load_datasets(cfg=cfg).train_dataset)
        seen: set[str] = set()
        datasets = []
        for entry in datasets_with_name_generator(cfg.datasets):
            rows, _ = _load_and_process_single_dataset(
                dataset_config=entry, cfg=cfg, tokenizer=tokenizer, split="train", seed=cfg.seed
            )
            total = len(rows)
            rows = rows.add_column(INDEX, list(range(total)))
            rows = handle_long_seq_in_dataset(rows, cfg.sequence_len, cfg)
            if cfg.sample_packing:  # its packing filter: rows with no trained token
                rows = rows.filter(lambda r: any(t != -100 for t in r["labels"]))
            kept, dropped = [], []
            survivors = set()
            for row in rows:
                index = row.pop(INDEX)
                if cfg.dataset_exact_deduplication:
                    digest = hashlib.sha256(str(row).encode()).hexdigest()
                    if digest in seen:
                        dropped.append({"index": index, "reason": "a repeat (deduplication)"})
                        survivors.add(index)
                        continue
                    seen.add(digest)
                survivors.add(index)
                kept.append(
                    {
                        "index": index,
                        "input_ids": list(row["input_ids"]),
                        "labels": list(row["labels"]),
                    }
                )
            dropped += [
                {"index": i, "reason": "its length"} for i in range(total) if i not in survivors
            ]
            datasets.append(
                {
                    "file": str(entry.path),
                    "rows": total,
                    "kept": kept,
                    "dropped": sorted(dropped, key=lambda d: d["index"]),
                }
            )
        document = {
            "tool": "axolotl",
            "version": axolotl.__version__,
            "datasets": datasets,
            "trained": trained,
            "notes": [f"sequence_len {cfg.sequence_len}", f"chat_template {cfg.chat_template}"],
        }
    with open(out_path, "w", encoding="utf-8") as handle:
        json.dump(document, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
